"""site-config.toml: parsing, path resolution, the policy it maps to, and its file checks."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from fedcare.client.policy import SitePolicy
from fedcare.client.site_config import (
    SITE_CONFIG_FILENAME,
    SiteConfig,
    SiteConfigProblem,
    load_site_config,
    split_address,
)
from fedcare.common.certs import generate_node_keypair, init_certificates
from fedcare.common.errors import ConfigError, PolicyViolation
from fedcare.common.run_signing import RUN_PUBLIC_KEY_NAME, write_public_key

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "site-config.example.toml"


def minimal() -> dict[str, Any]:
    return {
        "site_id": "st-mary",
        "data": "data",
        "state_dir": "state",
        "privacy": {"epsilon": 8.0},
        "superlink": {"address": "fl.example.org:9092"},
    }


def write(folder: Path, raw: dict[str, Any], name: str = SITE_CONFIG_FILENAME) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(tomli_w.dumps(raw), encoding="utf-8")
    return path


def with_(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``raw`` with ``dotted`` set to ``value``."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    *tables, key = dotted.split(".")
    target = out
    for t in tables:
        target = target.setdefault(t, {})
    target[key] = value
    return out


# --------------------------------------------------------------------------------------
# The shipped example
# --------------------------------------------------------------------------------------


def test_the_example_parses() -> None:
    cfg = load_site_config(EXAMPLE)
    assert cfg.site_id == "st-mary"
    assert cfg.data == Path("/srv/fedcare/site")
    assert cfg.superlink.root_certificates == EXAMPLE.parent / "certs" / "ca.crt"
    assert cfg.superlink.auth_private_key == EXAMPLE.parent / "keys" / "supernode"
    assert cfg.ledger is None
    assert cfg.ledger_path() == Path("/var/lib/fedcare/ledger.sqlite")
    assert cfg.policy().epsilon_budget == 8.0
    assert cfg.superlink.host == "fl.example-hospital.org" and cfg.superlink.port == 9092
    assert not cfg.superlink.insecure


def test_the_example_documents_every_field() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    sections = {"privacy", "policy", "superlink", "supernode"}
    for name, field in SiteConfig.model_fields.items():
        key = field.alias or name
        if key in sections:
            assert re.search(rf"^\[{key}\]$", text, re.M), key
            inner = field.annotation
            assert isinstance(inner, type)
            for sub_name, sub in inner.model_fields.items():  # type: ignore[attr-defined]
                if sub.exclude:  # a retired key, kept only to explain its refusal
                    continue
                assert re.search(rf"^#? ?{sub_name} = ", text, re.M), f"{key}.{sub_name}"
        else:
            assert re.search(rf"^{key} = ", text, re.M), key


# --------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = minimal()
    raw["ledger"] = "db/ledger.sqlite"
    raw["superlink"] |= {"root_certificates": "certs/ca.crt", "auth_private_key": "keys/node"}
    path = write(tmp_path / "etc" / "fedcare", raw)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_site_config(Path(os.path.relpath(path, elsewhere)))
    base = tmp_path / "etc" / "fedcare"
    assert cfg.data == base / "data"
    assert cfg.state_dir == base / "state"
    assert cfg.ledger_path() == base / "db" / "ledger.sqlite"
    assert cfg.superlink.root_certificates == base / "certs" / "ca.crt"
    assert cfg.superlink.auth_private_key == base / "keys" / "node"


def test_absolute_and_home_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    raw = with_(minimal(), "data", "~/site")
    raw["state_dir"] = str(tmp_path / "abs-state")
    cfg = load_site_config(write(tmp_path / "cfg", raw))
    assert cfg.data == tmp_path / "home" / "site"
    assert cfg.state_dir == tmp_path / "abs-state"


def test_a_folder_means_its_site_config_toml(tmp_path: Path) -> None:
    write(tmp_path, minimal())
    assert load_site_config(tmp_path).site_id == "st-mary"


def test_empty_optional_paths_mean_unset(tmp_path: Path) -> None:
    raw = minimal()
    raw["ledger"] = ""
    raw["superlink"] |= {"root_certificates": "", "auth_private_key": ""}
    cfg = load_site_config(write(tmp_path, raw))
    assert cfg.ledger is None and cfg.ledger_path() == tmp_path / "state" / "ledger.sqlite"
    assert cfg.superlink.root_certificates is None
    assert cfg.superlink.auth_private_key is None


def test_defaults(tmp_path: Path) -> None:
    cfg = load_site_config(write(tmp_path, minimal()))
    assert cfg.device == "auto"
    assert cfg.supernode.port == 9094
    assert cfg.privacy.delta == 1e-5 and cfg.privacy.require_dp
    assert cfg.rules.allowed_tasks is None and cfg.rules.allowed_models is None


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_site_config(write(tmp_path, minimal()))
    with pytest.raises(ValidationError):
        cfg.site_id = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------


def test_policy_maps_every_field_of_site_policy(tmp_path: Path) -> None:
    raw = minimal()
    raw["privacy"] = {
        "epsilon": 3.5,
        "delta": 1e-6,
        "accountant": "rdp",
        "min_noise_multiplier": 0.9,
        "require_dp": False,
        "max_run_epsilon": 1.5,
        "evaluation_noise_multiplier": 7.0,
    }
    raw["policy"] = {
        "allowed_tasks": ["readmission", "mortality"],
        "allowed_models": ["ehr_mlp"],
        "max_local_epochs": 2,
        "min_count": 25,
        "max_rounds": 12,
        "max_evaluations_per_run": 4,
    }
    policy = load_site_config(write(tmp_path, raw)).policy()
    expected = SitePolicy(
        epsilon_budget=3.5,
        delta=1e-6,
        accountant="rdp",
        min_noise_multiplier=0.9,
        require_dp=False,
        allowed_tasks=("readmission", "mortality"),
        allowed_models=("ehr_mlp",),
        max_local_epochs=2,
        min_count=25,
        max_run_epsilon=1.5,
        max_rounds=12,
        max_evaluations=4,
        evaluation_noise_multiplier=7.0,
    )
    assert policy == expected
    assert policy.model_fields_set == set(SitePolicy.model_fields)  # nothing left to a default


def test_omitted_lists_allow_everything_and_listed_ones_restrict(tmp_path: Path) -> None:
    open_policy = load_site_config(write(tmp_path / "a", minimal())).policy()
    open_policy.check_request(
        site_id="s", task="anything", model="any_model", local_epochs=1, dp_enabled=True
    )
    raw = with_(minimal(), "policy.allowed_tasks", ["readmission"])
    closed = load_site_config(write(tmp_path / "b", raw)).policy()
    with pytest.raises(PolicyViolation, match="mortality"):
        closed.check_request(
            site_id="s", task="mortality", model="m", local_epochs=1, dp_enabled=True
        )


# --------------------------------------------------------------------------------------
# Errors: the file, the dotted field, the fix
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dotted", "value", "match"),
    [
        ("privacy.epsilon", 0, "greater than 0"),
        ("privacy.epsilon", -1.0, "greater than 0"),
        ("privacy.delta", 1.0, "less than 1"),
        ("privacy.delta", 0.0, "greater than 0"),
        ("privacy.accountant", "gdp", "prv"),
        ("privacy.min_noise_multiplier", -0.1, "greater than or equal to 0"),
        ("supernode.port", 0, "greater than or equal to 1"),
        ("supernode.port", 70000, "less than or equal to 65535"),
        ("supernode.isolation", "subprocess", "no longer a choice"),
        ("superlink.address", "fl.example.org", "not host:port; add the port"),
        ("superlink.address", "https://fl.example.org:9092", "URL prefix"),
        ("superlink.address", "fl.example.org:99999", "1..65535"),
        ("superlink.address", "fl.example.org:http", "1..65535"),
        ("superlink.address", "::1:9092", "IPv6 address in brackets"),
        ("superlink.address", "bad_host!:9092", "neither an IP address nor a valid host name"),
        ("device", "gpu", "'auto', 'cpu' or 'cuda'"),
        ("site_id", "st mary", "letters, digits"),
        ("data", "", "give a folder path"),
        ("policy.allowed_tasks", [], "omit the key to allow every task"),
        ("policy.allowed_tasks", ["readmission", " "], "empty"),
        ("policy.allowed_models", ["a", "a"], "more than once"),
        ("policy.allowed_models", [], "omit the key to allow every model"),
        ("policy.max_local_epochs", 0, "greater than or equal to 1"),
        ("policy.min_count", 0, "greater than or equal to 1"),
        ("privacy.epsilom", 3.0, "unknown key.*did you mean 'epsilon'"),
        ("superlink.adress", "x:1", "unknown key.*did you mean 'address'"),
        ("devise", "cpu", "unknown key.*did you mean 'device'"),
        ("zzz", 1, "unknown key.*known keys: site_id"),
    ],
)
def test_bad_fields_name_the_file_and_the_dotted_field(
    tmp_path: Path, dotted: str, value: Any, match: str
) -> None:
    path = write(tmp_path, with_(minimal(), dotted, value))
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    message = str(info.value)
    line = next(x for x in message.splitlines() if f"field {dotted}:" in x)
    assert line.startswith(f"{path}: field {dotted}: ")
    assert re.search(match, line), line


@pytest.mark.parametrize("missing", ["privacy.epsilon", "superlink.address", "site_id", "data"])
def test_missing_required_fields_say_where_they_are_documented(
    tmp_path: Path, missing: str
) -> None:
    raw = minimal()
    *tables, key = missing.split(".")
    (raw[tables[0]] if tables else raw).pop(key)
    with pytest.raises(ConfigError, match=rf"field {missing}: missing; add it.*example"):
        load_site_config(write(tmp_path, raw))


def test_insecure_with_root_certificates_is_a_conflict(tmp_path: Path) -> None:
    raw = minimal()
    raw["superlink"] |= {"insecure": True, "root_certificates": "ca.crt"}
    with pytest.raises(ConfigError, match=r"field superlink: .*remove root_certificates"):
        load_site_config(write(tmp_path, raw))


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    raw = with_(with_(minimal(), "privacy.epsilon", -1), "supernode.port", 0)
    with pytest.raises(ConfigError) as info:
        load_site_config(write(tmp_path, raw))
    assert "privacy.epsilon" in str(info.value) and "supernode.port" in str(info.value)


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "site-config.toml"
    bad.write_text("site_id = \n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(bad))}: not valid TOML"):
        load_site_config(bad)
    with pytest.raises(ConfigError, match=r"no such file.*site-config\.example\.toml"):
        load_site_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("fl.example.org:9092", ("fl.example.org", 9092)),
        ("10.0.0.5:1", ("10.0.0.5", 1)),
        ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
        ("localhost:9092", ("localhost", 9092)),
    ],
)
def test_split_address(address: str, expected: tuple[str, int]) -> None:
    assert split_address(address) == expected


# --------------------------------------------------------------------------------------
# check_files
# --------------------------------------------------------------------------------------


@pytest.fixture
def deployed(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A config folder with a data folder (site.toml only), CA and node key, all valid."""
    base = tmp_path / "site"
    (base / "data").mkdir(parents=True)
    (base / "data" / "site.toml").write_text("site_id = 'st-mary'\n", encoding="utf-8")
    init_certificates(out=base / "pki", hosts=["fl.example.org"])
    generate_node_keypair(out=base / "keys")
    write_public_key(Ed25519PrivateKey.generate(), base / "pki" / RUN_PUBLIC_KEY_NAME)
    raw = minimal()
    raw["superlink"] |= {
        "root_certificates": "pki/ca.crt",
        "auth_private_key": "keys/supernode",
        "run_signing_key": f"pki/{RUN_PUBLIC_KEY_NAME}",
    }
    return base, raw


def _problems(base: Path, raw: dict[str, Any]) -> list[SiteConfigProblem]:
    return load_site_config(write(base, raw)).check_files()


def test_a_complete_deployment_has_only_the_state_dir_warning(
    deployed: tuple[Path, dict[str, Any]],
) -> None:
    base, raw = deployed
    problems = _problems(base, raw)
    assert [(p.severity, p.field) for p in problems] == [("warning", "state_dir")]
    (base / "state").mkdir()
    assert _problems(base, raw) == []


def test_key_readable_by_others_is_an_error_with_chmod_fix(
    deployed: tuple[Path, dict[str, Any]],
) -> None:
    base, raw = deployed
    (base / "state").mkdir()
    (base / "keys" / "supernode").chmod(0o644)
    [problem] = _problems(base, raw)
    assert problem.severity == "error" and problem.field == "superlink.auth_private_key"
    assert "0644" in problem.message
    assert problem.fix == f"chmod 600 {base / 'keys' / 'supernode'}"


def test_missing_and_wrong_files_are_each_reported(deployed: tuple[Path, dict[str, Any]]) -> None:
    base, raw = deployed
    (base / "data" / "site.toml").unlink()
    (base / "keys" / "supernode").unlink()
    (base / "pki" / "ca.crt").write_text("garbage", encoding="utf-8")
    (base / "state").write_text("a file, not a folder", encoding="utf-8")
    (base / "pki" / RUN_PUBLIC_KEY_NAME).write_text("not a key", encoding="utf-8")
    problems = {p.field: p for p in _problems(base, raw)}
    assert set(problems) == {
        "data",
        "state_dir",
        "superlink.root_certificates",
        "superlink.auth_private_key",
        "superlink.run_signing_key",
    }
    assert all(p.severity == "error" for p in problems.values())
    assert "site.toml" in problems["data"].message
    assert "not a PEM certificate" in problems["superlink.root_certificates"].message
    assert "fedcare site keygen" in problems["superlink.auth_private_key"].fix


def test_a_public_key_or_server_certificate_in_the_wrong_place(
    deployed: tuple[Path, dict[str, Any]],
) -> None:
    base, raw = deployed
    (base / "state").mkdir()
    raw["superlink"] |= {
        "auth_private_key": "keys/supernode.pub",
        "root_certificates": "pki/server.crt",
    }
    problems = {p.field: p for p in _problems(base, raw)}
    key = problems["superlink.auth_private_key"]
    assert key.severity == "error" and "not an OpenSSH private key" in key.message
    ca = problems["superlink.root_certificates"]
    assert ca.severity == "warning" and "not a CA certificate" in ca.message


def test_an_expired_ca_is_an_error(deployed: tuple[Path, dict[str, Any]]) -> None:
    import datetime as dt

    base, raw = deployed
    (base / "state").mkdir()
    init_certificates(
        out=base / "old",
        hosts=["fl.example.org"],
        days=1,
        valid_from=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
    )
    raw["superlink"]["root_certificates"] = "old/ca.crt"
    [problem] = _problems(base, raw)
    assert problem.severity == "error" and "valid only from 2019-12-31" in problem.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_state_dir_is_an_error(deployed: tuple[Path, dict[str, Any]]) -> None:
    base, raw = deployed
    locked = base / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        raw["state_dir"] = "locked"
        raw["ledger"] = "locked/sub/ledger.sqlite"
        problems = {p.field: p for p in _problems(base, raw)}
    finally:
        locked.chmod(0o700)
    assert problems["state_dir"].severity == "error"
    assert "cannot write" in problems["state_dir"].message
    assert problems["ledger"].severity == "error"
    assert "cannot be created" in problems["ledger"].message


def test_toml_example_round_trips_through_tomllib() -> None:
    raw = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert SiteConfig.model_validate(raw).site_id == raw["site_id"]


def test_a_site_without_a_pinned_run_signing_key_cannot_train(
    deployed: tuple[Path, dict[str, Any]],
) -> None:
    """No pinned key, no authorised run: site check says so, and the key is what it reads."""
    base, raw = deployed
    del raw["superlink"]["run_signing_key"]
    problems = {p.field: p for p in _problems(base, raw)}
    assert problems["superlink.run_signing_key"].severity == "error"
    assert "run-signing.pub" in problems["superlink.run_signing_key"].fix
