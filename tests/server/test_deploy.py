"""The centre's deployment, without starting it: ``server/deploy.py``'s command lines and
files, ``server/deploy_cli.py``'s settings checks and submission, ``server/certs_cli.py``'s
run-signing key.

Real SuperLinks, gateways and executors run in ``tests/security/test_centre_port.py`` and
``tests/integration``; here every command line is read option by option, every refusal is
checked to come before anything is written, and ``flwr`` itself is replaced where a
submission would call it.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from fedcare.common.errors import ConfigError, PolicyViolation
from fedcare.common.federation import RUN_CONFIG_DEFAULTS, FederationConfig
from fedcare.common.processes import module_command, venv_bin
from fedcare.common.run_signing import (
    RUN_KEY_NAME,
    RUN_PUBLIC_KEY_NAME,
    RUN_SIGNATURE_KEY,
    verify_run,
)
from fedcare.common.tomlcompat import tomllib
from fedcare.server import deploy_cli
from fedcare.server.certs_cli import certs_init
from fedcare.server.deploy import (
    CERT_FILES,
    LOOPBACK,
    SuperLinkSettings,
    centre_children,
    certificate_files,
    connection_config,
    executor_command,
    gateway_command,
    prepare_database,
    superlink_command,
    write_superexec_secret,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _certs(folder: Path) -> Path:
    """A certificate folder as ``fedcare certs init`` leaves it (contents unread here)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in CERT_FILES.values():
        (folder / name).write_text("-----BEGIN PLACEHOLDER-----\n", encoding="ascii")
    return folder


def _options(cmd: list[str], program: list[str]) -> dict[str, str | bool]:
    """A command line after ``program`` as {option: value, or True for a flag}."""
    assert cmd[: len(program)] == program, cmd
    out: dict[str, str | bool] = {}
    rest = cmd[len(program) :]
    i = 0
    while i < len(rest):
        option = rest[i]
        assert option.startswith("--"), (option, cmd)
        assert option not in out, f"{option} given twice: {cmd}"
        if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            out[option] = rest[i + 1]
            i += 2
        else:
            out[option] = True
            i += 1
    return out


# ------------------------------------------------------------------ settings


def test_certificates_are_required_unless_insecure_and_named_when_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        certificate_files(None, who="the gateway")
    assert "the gateway needs --certs DIR" in str(info.value)
    assert "fedcare certs init" in str(info.value) and "--insecure" in str(info.value)

    folder = _certs(tmp_path / "pki")
    (folder / "server.key").unlink()
    with pytest.raises(ConfigError) as info:
        certificate_files(folder, who="the SuperLink")
    message = str(info.value)
    assert str(folder / "server.key") in message and str(folder / "ca.crt") not in message
    assert f"fedcare certs init --out {folder}" in message

    (folder / "server.key").write_text("x", encoding="ascii")
    assert certificate_files(folder, who="x") == {
        "ca": folder / "ca.crt",
        "cert": folder / "server.crt",
        "key": folder / "server.key",
    }


@pytest.mark.parametrize(
    "port, control_port, words",
    [
        (0, 9093, "--port 0 is not a TCP port"),
        (9092, 65536, "--control-port 65536 is not a TCP port"),
        (-1, 9093, "--port -1 is not a TCP port"),
        (9100, 9100, "--port and --control-port are both 9100"),
    ],
)
def test_ports_are_checked_before_any_command_is_built(
    tmp_path: Path, port: int, control_port: int, words: str
) -> None:
    settings = SuperLinkSettings(
        certs=_certs(tmp_path), port=port, control_port=control_port, database=tmp_path / "s.db"
    )
    for build in (superlink_command, gateway_command, centre_children):
        with pytest.raises(ConfigError, match=words):
            build(settings)


def test_the_secret_file_sits_beside_the_database(tmp_path: Path) -> None:
    settings = SuperLinkSettings(certs=None, database=tmp_path / "state" / "centre.db")
    assert settings.secret_file == tmp_path / "state" / "centre.superexec-secret"
    assert settings.control_address == f"{LOOPBACK}:9093"


# ------------------------------------------------------------------ command lines


def test_the_superlink_serves_tls_with_node_auth_on_loopback_only(tmp_path: Path) -> None:
    folder = _certs(tmp_path / "pki")
    settings = SuperLinkSettings(
        certs=folder, host="0.0.0.0", port=9500, control_port=9501, database=tmp_path / "sl.db"
    )
    opts = _options(superlink_command(settings), [venv_bin("flower-superlink")])
    assert opts == {
        "--ssl-ca-certfile": str((folder / "ca.crt").resolve()),
        "--ssl-certfile": str((folder / "server.crt").resolve()),
        "--ssl-keyfile": str((folder / "server.key").resolve()),
        "--enable-supernode-auth": True,
        "--disable-runtime-dependency-installation": True,
        "--host": "127.0.0.1",  # never the public host: the gateway faces the network
        "--port": "9501",
        "--database": str((tmp_path / "sl.db").resolve()),
        "--isolation": "process",
        "--superexec-auth-secret-file": str((tmp_path / "sl.superexec-secret").resolve()),
    }


def test_node_auth_can_be_turned_off_with_tls_kept(tmp_path: Path) -> None:
    settings = SuperLinkSettings(certs=_certs(tmp_path), node_auth=False, database=tmp_path / "d")
    opts = _options(superlink_command(settings), [venv_bin("flower-superlink")])
    assert "--enable-supernode-auth" not in opts and "--ssl-certfile" in opts


def test_plain_text_drops_tls_and_node_auth_and_needs_no_certificates(tmp_path: Path) -> None:
    settings = SuperLinkSettings(certs=None, insecure=True, database=tmp_path / "d.db")
    opts = _options(superlink_command(settings), [venv_bin("flower-superlink")])
    assert opts["--insecure"] is True
    assert not {
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--enable-supernode-auth",
    } & set(opts)
    assert (opts["--host"], opts["--isolation"]) == ("127.0.0.1", "process")
    assert "--superexec-auth-secret-file" in opts


@pytest.mark.parametrize(
    "host, listen",
    [("0.0.0.0", "0.0.0.0:9600"), ("::", "[::]:9600"), ("fl.example.org", "fl.example.org:9600")],
)
def test_the_gateway_listens_publicly_and_forwards_to_the_loopback_superlink(
    tmp_path: Path, host: str, listen: str
) -> None:
    folder = _certs(tmp_path / "pki")
    settings = SuperLinkSettings(certs=folder, host=host, port=9600, control_port=9601)
    opts = _options(gateway_command(settings), module_command("fedcare.server.gateway"))
    assert opts == {
        "--listen": listen,
        "--upstream": "127.0.0.1:9601",
        "--certs": str(folder.resolve()),
    }
    insecure = SuperLinkSettings(certs=None, insecure=True, port=9600, control_port=9601)
    opts = _options(gateway_command(insecure), module_command("fedcare.server.gateway"))
    assert opts == {"--listen": "0.0.0.0:9600", "--upstream": "127.0.0.1:9601", "--insecure": True}


def test_the_executor_takes_tasks_with_the_secret_over_tls_or_plain(tmp_path: Path) -> None:
    folder = _certs(tmp_path / "pki")
    settings = SuperLinkSettings(certs=folder, control_port=9701, database=tmp_path / "x.db")
    opts = _options(executor_command(settings), module_command("fedcare.server.executor"))
    assert opts == {
        "--runtime-api-address": "127.0.0.1:9701",
        "--superexec-auth-secret-file": str((tmp_path / "x.superexec-secret").resolve()),
        "--root-certificates": str((folder / "ca.crt").resolve()),
    }
    plain = SuperLinkSettings(
        certs=None, insecure=True, control_port=9701, database=tmp_path / "x.db"
    )
    opts = _options(executor_command(plain), module_command("fedcare.server.executor"))
    assert opts["--insecure"] is True and "--root-certificates" not in opts


def test_the_centre_is_three_processes_and_only_the_superlink_ends_it(tmp_path: Path) -> None:
    settings = SuperLinkSettings(certs=_certs(tmp_path), database=tmp_path / "c.db")
    children = centre_children(settings)
    assert [(c.name, c.restart) for c in children] == [
        ("superlink", False),
        ("gateway", True),
        ("executor", True),
    ]
    assert list(children[0].command) == superlink_command(settings)
    assert list(children[1].command) == gateway_command(settings)
    assert list(children[2].command) == executor_command(settings)


# ------------------------------------------------------------------ files


def test_the_superexec_secret_is_fresh_hex_and_private(tmp_path: Path) -> None:
    settings = SuperLinkSettings(certs=None, database=tmp_path / "superlink.db")
    path = write_superexec_secret(settings)
    first = path.read_text(encoding="ascii")
    assert path == settings.secret_file and _mode(path) == 0o600
    assert len(first) == 64 and int(first, 16) >= 0  # 32 random bytes as hex
    assert write_superexec_secret(settings).read_text(encoding="ascii") != first


def test_an_unwritable_database_folder_is_one_config_error_naming_the_option(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="ascii")
    settings = SuperLinkSettings(certs=None, database=blocker / "superlink.db")
    with pytest.raises(ConfigError, match="--database folder this user can write"):
        write_superexec_secret(settings)
    with pytest.raises(ConfigError, match=r"--database .*cannot create it"):
        prepare_database(blocker / "superlink.db")


def test_the_flwr_cli_connection_is_the_loopback_control_port(tmp_path: Path) -> None:
    ca = tmp_path / "pki" / "ca.crt"
    assert connection_config(address="127.0.0.1:9093", ca_cert=None, insecure=True) == {
        "address": "127.0.0.1:9093",
        "insecure": True,
    }
    assert connection_config(address="127.0.0.1:9093", ca_cert=ca, insecure=False) == {
        "address": "127.0.0.1:9093",
        "root-certificates": str(ca.resolve()),
    }
    with pytest.raises(ConfigError, match="needs the CA certificate"):
        connection_config(address="127.0.0.1:9093", ca_cert=None, insecure=False)


# ------------------------------------------------------------------ fedcare server start


def test_server_start_refuses_missing_certificates_before_writing_anything(tmp_path: Path) -> None:
    database = tmp_path / "centre" / "superlink.db"
    with pytest.raises(ConfigError, match="needs --certs DIR"):
        deploy_cli.server_start(
            certs=None,
            host=None,
            port=9092,
            control_port=9093,
            database=database,
            name="127.0.0.1",
            insecure=False,
            no_node_auth=False,
        )
    assert not (tmp_path / "centre").exists()  # no database, no secret


def test_server_start_refuses_clashing_ports_before_writing_anything(tmp_path: Path) -> None:
    database = tmp_path / "centre" / "superlink.db"
    with pytest.raises(ConfigError, match="must differ"):
        deploy_cli.server_start(
            certs=None,
            host=None,
            port=9092,
            control_port=9092,
            database=database,
            name="127.0.0.1",
            insecure=True,
            no_node_auth=False,
        )
    assert not (tmp_path / "centre").exists()


# ------------------------------------------------------------------ fedcare server submit


def _run_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "runs" / "run.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


GOOD_RUN = 'spec-path = "spec/site.toml"\nrun-id = "trial-7"\nnum-server-rounds = 3\n'


def test_relative_paths_in_a_run_file_are_taken_from_its_folder(tmp_path: Path) -> None:
    path = _run_file(
        tmp_path,
        GOOD_RUN + f'run-dir = "out/trial"\naudit-key = "{tmp_path / "abs.pem"}"\n',
    )
    overrides = deploy_cli._read_overrides(path)
    folder = path.parent.resolve()
    assert overrides["spec-path"] == str(folder / "spec" / "site.toml")
    assert overrides["run-dir"] == str(folder / "out" / "trial")
    assert overrides["audit-key"] == str(tmp_path / "abs.pem")  # absolute: as given
    assert (overrides["run-id"], overrides["num-server-rounds"]) == ("trial-7", 3)


@pytest.mark.parametrize(
    "text, words",
    [
        ("num-server-rounds = 3\n", "set spec-path to a site.toml"),
        (GOOD_RUN + "colour = 'blue'\n", "colour: unknown key"),
        (GOOD_RUN + "num-server-rounds = 0\n", "not valid TOML"),  # a key given twice
        ('spec-path = "s.toml"\nnum-server-rounds = 0\n', "num-server-rounds"),
        (GOOD_RUN + 'run-signature = "forged"\n', "remove run-signature"),
        ("spec-path = [", "not valid TOML"),
    ],
)
def test_a_bad_run_file_is_one_config_error_naming_the_file(
    tmp_path: Path, text: str, words: str
) -> None:
    path = _run_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        deploy_cli._read_overrides(path)
    assert str(path) in str(info.value) and words in str(info.value)


def test_a_missing_run_file_says_where_to_write_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file; write the run's settings there"):
        deploy_cli._read_overrides(tmp_path / "nowhere.toml")


def test_submit_without_the_run_key_stops_before_calling_flwr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(deploy_cli, "_flwr_json", lambda args, env: calls.append(args) or {})
    with pytest.raises(ConfigError, match="run-signing.key"):
        deploy_cli.server_submit(
            run_file=_run_file(tmp_path, GOOD_RUN),
            connection="fedcare",
            run_key=tmp_path / "missing.key",
            wait=False,
        )
    assert calls == []


def _signing_key(tmp_path: Path) -> tuple[Path, bytes]:
    """A run-signing key as ``fedcare certs init`` writes it, and its raw public half."""
    pki = tmp_path / "pki"
    pki.mkdir()
    certs_init(out=pki, host=["127.0.0.1"], days=30, force=False)
    public = base64.b64decode((pki / RUN_PUBLIC_KEY_NAME).read_text(encoding="ascii"))
    return pki / RUN_KEY_NAME, public


def test_submit_sends_a_thin_app_and_a_run_config_signed_by_the_run_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key, public = _signing_key(tmp_path)
    seen: dict[str, Any] = {}

    def fake_flwr(args: list[str], env: dict[str, str]) -> dict[str, Any]:
        assert args[0] == "run"
        app, connection = Path(args[1]), args[2]
        seen["connection"], seen["format"] = connection, args[args.index("--format") + 1]
        seen["files"] = sorted(p.name for p in app.iterdir())
        seen["pyproject"] = tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))
        run_config = Path(args[args.index("--run-config") + 1])
        seen["overrides"] = tomllib.loads(run_config.read_text(encoding="utf-8"))
        seen["env"] = env
        return {"success": True, "run-id": 4711}

    monkeypatch.setattr(deploy_cli, "_flwr_json", fake_flwr)
    deploy_cli.server_submit(
        run_file=_run_file(tmp_path, GOOD_RUN), connection="centre", run_key=key, wait=False
    )
    assert (seen["connection"], seen["format"]) == ("centre", "json")
    assert seen["files"] == ["pyproject.toml"]  # a thin app: no code shipped
    components = seen["pyproject"]["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "fedcare.server.app:app",
        "clientapp": "fedcare.client.app:app",
    }
    assert seen["env"]["FLWR_TELEMETRY_ENABLED"] == "0"
    # What a site checks (client/app.py): Flower's fusion of the app's defaults with the
    # overrides, validated into its typed form.
    fused = FederationConfig.from_run_config(
        {**RUN_CONFIG_DEFAULTS, **seen["overrides"]}
    ).to_run_config()
    assert fused[RUN_SIGNATURE_KEY]
    verify_run(fused, public, site_id="site-x")  # raises if the signature does not hold
    tampered = {**fused, "num-server-rounds": 30}
    with pytest.raises(PolicyViolation, match="does not match this configuration"):
        verify_run(tampered, public, site_id="site-x")
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(PolicyViolation):
        verify_run(fused, other, site_id="site-x")
    assert "flwr run id 4711" in capsys.readouterr().out


@pytest.mark.parametrize("status, code", [("finished:completed", 0), ("finished:failed", 1)])
def test_submit_wait_follows_the_run_to_its_end(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    status: str,
    code: int,
) -> None:
    key, _ = _signing_key(tmp_path)
    capsys.readouterr()  # what certs init printed
    statuses = iter(["pending", "running", "running", status])
    asked: list[list[str]] = []

    def fake_flwr(args: list[str], env: dict[str, str]) -> dict[str, Any]:
        asked.append(args)
        if args[0] == "run":
            return {"success": True, "run-id": 9}
        return {"success": True, "runs": [{"status": next(statuses)}]}

    monkeypatch.setattr(deploy_cli, "_flwr_json", fake_flwr)
    monkeypatch.setattr(deploy_cli.time, "sleep", lambda s: None)  # no real waiting
    with pytest.raises(typer.Exit) as info:
        deploy_cli.server_submit(
            run_file=_run_file(tmp_path, GOOD_RUN), connection="c", run_key=key, wait=True
        )
    assert info.value.exit_code == code
    assert asked[1] == ["ls", "c", "--run-id", "9", "--format", "json"]
    lines = [line.split(" ", 1)[1] for line in capsys.readouterr().out.splitlines()[1:]]
    assert lines == ["pending", "running", status]  # each change once


# ------------------------------------------------------------------ flwr's JSON replies


def _completed(stdout: str, stderr: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(args=["flwr"], returncode=0, stdout=stdout, stderr=stderr)


@pytest.mark.parametrize(
    "stdout, stderr, words",
    [
        ("", "Connection refused", "`flwr ls c` failed: Connection refused"),
        ("banner {not json", "", "printed no JSON reply"),
        (
            'log line\n{"success": false, "error-message": "no such run"}',
            "",
            "failed: no such run; check the connection",
        ),
    ],
)
def test_flwr_failures_are_one_config_error_with_its_message(
    monkeypatch: pytest.MonkeyPatch, stdout: str, stderr: str, words: str
) -> None:
    monkeypatch.setattr(deploy_cli.subprocess, "run", lambda *a, **k: _completed(stdout, stderr))
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        deploy_cli._flwr_json(["ls", "c"], {})


def test_flwr_s_json_reply_is_read_after_any_leading_text(monkeypatch: pytest.MonkeyPatch) -> None:
    reply = {"success": True, "run-id": 3}
    monkeypatch.setattr(
        deploy_cli.subprocess,
        "run",
        lambda *a, **k: _completed("Loading...\n" + json.dumps(reply)),
    )
    assert deploy_cli._flwr_json(["run", "x"], {}) == reply


# ------------------------------------------------------------------ fedcare certs init


def test_certs_init_writes_a_private_run_signing_key_and_force_replaces_it(
    tmp_path: Path,
) -> None:
    key_path, public = _signing_key(tmp_path)
    assert _mode(key_path) == 0o600 and _mode(key_path.parent / RUN_PUBLIC_KEY_NAME) == 0o644
    key = load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    assert key.public_key().public_bytes_raw() == public  # the .pub is the key's own half
    certs_init(out=key_path.parent, host=["127.0.0.1"], days=30, force=True)
    assert (
        load_pem_private_key(key_path.read_bytes(), password=None).public_key().public_bytes_raw()
        != public
    )
    assert _mode(key_path) == 0o600


def test_private_files_stay_private_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        key_path, _ = _signing_key(tmp_path)
        secret = write_superexec_secret(SuperLinkSettings(certs=None, database=tmp_path / "s.db"))
    finally:
        os.umask(old)
    assert _mode(key_path) == 0o600 and _mode(secret) == 0o600
