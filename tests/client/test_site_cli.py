"""``fedcare site keygen`` and ``fedcare site check``, against a real TLS server on
127.0.0.1 that uses the certificates ``init_certificates`` wrote."""

from __future__ import annotations

import datetime as dt
import inspect
import re
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from fedcare.client.site_checks import Check
from fedcare.client.site_cli import run_site_checks, site_check, site_keygen
from fedcare.client.site_config import SiteConfig, load_site_config
from fedcare.common.certs import CertPaths, generate_node_keypair, init_certificates
from fedcare.common.errors import ConfigError
from fedcare.common.run_signing import RUN_PUBLIC_KEY_NAME, write_public_key
from tests.common.test_certs import TLSServer

# --------------------------------------------------------------------------------------
# Fixtures: one synthetic site, one PKI, one node key, TLS servers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny valid site folder written by the synthetic generator (site id ``site-0``)."""
    from fedcare.simulations.synth import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("synth") / "sites"
    config = SynthConfig(
        patients_per_site=30,
        n_genes=12,
        image_size=16,
        image_format="npy",
        table_format="csv",
        simulated=False,  # a deployed hospital's site.toml: no [simulation] opt-ins
    )
    synthesize(out, n_sites=1, seed=0, config=config)
    return out / "site-0"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    """Covers fl.example.org and 127.0.0.1 only: ``localhost`` is a name it does not cover."""
    return init_certificates(
        out=tmp_path_factory.mktemp("pki"),
        hosts=["fl.example.org", "127.0.0.1"],
        include_loopback=False,
    )


@pytest.fixture(scope="module")
def tls_server(pki: CertPaths) -> Iterator[TLSServer]:
    with TLSServer.from_files(pki.server_cert, pki.server_key) as server:
        yield server


@dataclass
class Site:
    """A deployed site's folder; :meth:`config` (re)writes its site-config.toml."""

    base: Path
    server_port: int

    @property
    def config_path(self) -> Path:
        return self.base / "site-config.toml"

    def config(self, changes: dict[str, Any] | None = None) -> Path:
        """Write the valid config with ``changes`` (dotted key -> value; None removes)."""
        raw: dict[str, Any] = {
            "site_id": "site-0",
            "data": "data",
            "state_dir": "state",
            "device": "cpu",
            "privacy": {"epsilon": 8.0},
            "policy": {"allowed_tasks": ["readmission"]},
            "superlink": {
                "address": f"127.0.0.1:{self.server_port}",
                "root_certificates": "certs/ca.crt",
                "auth_private_key": "keys/supernode",
                "run_signing_key": f"certs/{RUN_PUBLIC_KEY_NAME}",
            },
        }
        for dotted, value in (changes or {}).items():
            *tables, key = dotted.split(".")
            target = raw
            for t in tables:
                target = target[t]
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
        self.config_path.write_text(tomli_w.dumps(raw), encoding="utf-8")
        return self.config_path


@pytest.fixture
def site(tmp_path: Path, synth_site: Path, pki: CertPaths, tls_server: TLSServer) -> Site:
    """Data copy, CA copy, node key; the config points at the TLS server."""
    base = tmp_path / "st"
    shutil.copytree(synth_site, base / "data")
    (base / "certs").mkdir()
    shutil.copy(pki.ca_cert, base / "certs" / "ca.crt")
    write_public_key(Ed25519PrivateKey.generate(), base / "certs" / RUN_PUBLIC_KEY_NAME)
    generate_node_keypair(out=base / "keys")
    deployed = Site(base, tls_server.port)
    deployed.config()
    return deployed


@dataclass(frozen=True)
class Ran:
    """A command's outcome; ``flat`` is its output as words (rich boxes and folds cells)."""

    exit_code: int
    output: str
    exception: BaseException | None

    @property
    def flat(self) -> str:
        return " ".join(re.sub(r"[\u2500-\u257f]", " ", self.output).split())


def invoke(command: Any, args: list[str]) -> Ran:
    app = typer.Typer()
    app.command()(command)
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    return Ran(result.exit_code, result.output, result.exception)


def check(site: Site, *extra: str) -> Ran:
    return invoke(site_check, [str(site.config_path), *extra])


def checks_of(site: Site) -> dict[str, list[Check]]:
    return by_name(run_site_checks(load_site_config(site.config_path)))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def by_name(checks: list[Check]) -> dict[str, list[Check]]:
    out: dict[str, list[Check]] = {}
    for c in checks:
        out.setdefault(c.name, []).append(c)
    return out


# --------------------------------------------------------------------------------------
# site check
# --------------------------------------------------------------------------------------


def test_a_complete_site_passes_against_the_tls_server(site: Site) -> None:
    (site.base / "state").mkdir()
    result = check(site)
    assert result.exit_code == 0, result.output
    assert "site site-0: ready: 0 error(s), 0 warning(s)" in result.flat
    checks = checks_of(site)
    assert all(c.status == "ok" for cs in checks.values() for c in cs), checks
    assert {
        "data",
        "state_dir",
        "superlink.root_certificates",
        "superlink.auth_private_key",
        "superlink.run_signing_key",
        "data.validation",
        "site_id",
        "privacy",
        "superlink",
        "superlink health",
    } <= set(checks)
    assert "certificate verified for '127.0.0.1'" in checks["superlink"][0].detail


def test_the_ca_fingerprint_is_shown_for_comparison(site: Site, pki: CertPaths) -> None:
    import hashlib

    from cryptography import x509

    der = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    reference = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    assert reference in check(site).flat


def test_a_closed_port_names_the_address_and_the_fix(site: Site) -> None:
    port = closed_port()
    site.config({"superlink.address": f"127.0.0.1:{port}"})
    result = check(site)
    assert result.exit_code == 1
    assert f"connection to 127.0.0.1:{port} refused" in result.flat
    assert "is the SuperLink running" in result.flat and "firewall" in result.flat
    assert "NOT ready" in result.flat


def test_a_wrong_ca_is_an_error(site: Site, tmp_path: Path) -> None:
    other = init_certificates(out=tmp_path / "other", hosts=["fl.example.org"])
    shutil.copy(other.ca_cert, site.base / "certs" / "ca.crt")
    result = check(site)
    assert result.exit_code == 1
    assert "certificate verify failed" in result.flat
    assert "not signed by the CA" in result.flat and "wrong CA" in result.flat


def test_a_name_the_certificate_does_not_cover(site: Site) -> None:
    site.config({"superlink.address": f"localhost:{site.server_port}"})
    [superlink] = checks_of(site)["superlink"]
    assert superlink.status == "error"
    assert "hostname mismatch" in superlink.detail
    assert "it covers: fl.example.org, 127.0.0.1" in superlink.detail
    assert "fedcare certs init --host localhost" in superlink.fix


def test_an_expired_server_certificate(site: Site, tmp_path: Path) -> None:
    old = init_certificates(
        out=tmp_path / "old",
        hosts=["127.0.0.1"],
        days=1,
        valid_from=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
    )
    shutil.copy(old.ca_cert, site.base / "certs" / "ca.crt")
    with TLSServer.from_files(old.server_cert, old.server_key) as expired:
        site.config({"superlink.address": f"127.0.0.1:{expired.port}"})
        checks = checks_of(site)
    [superlink] = checks["superlink"]
    assert superlink.status == "error" and "expired" in superlink.detail
    assert "renew" in superlink.fix
    # the local CA copy is expired too, and says so
    assert any(c.status == "error" for c in checks["superlink.root_certificates"])


def test_a_plain_text_server_is_not_tls(site: Site) -> None:
    with TLSServer(None) as plain:
        site.config({"superlink.address": f"127.0.0.1:{plain.port}"})
        result = check(site, "--timeout", "3")
    assert result.exit_code == 1
    assert "does not speak TLS" in result.flat and "--insecure" in result.flat


def test_insecure_prints_a_loud_warning_and_still_connects(site: Site) -> None:
    (site.base / "state").mkdir()
    with TLSServer(None) as plain:
        site.config(
            {
                "superlink.address": f"127.0.0.1:{plain.port}",
                "superlink.insecure": True,
                "superlink.root_certificates": None,
            },
        )
        result = check(site)
    assert result.exit_code == 0, result.output
    assert result.flat.startswith("WARNING: insecure = true — TLS is OFF")
    assert "superlink.insecure warning" in result.flat
    assert "plain text, no TLS" in result.flat
    assert "answered GET /health with 200" in result.flat


def test_no_connect_skips_the_superlink(site: Site) -> None:
    (site.base / "state").mkdir()
    site.config({"superlink.address": f"127.0.0.1:{closed_port()}"})
    result = check(site, "--no-connect")
    assert result.exit_code == 0, result.output
    assert "superlink skipped not contacted" in result.flat


def test_site_id_mismatch_and_unknown_allowed_task(site: Site) -> None:
    site.config({"site_id": "st-mary", "policy.allowed_tasks": ["readmision"]})
    result = check(site)
    assert result.exit_code == 1
    assert "site-config says 'st-mary'" in result.flat and "says 'site-0'" in result.flat
    assert "task 'readmision' is not defined in site.toml" in result.flat


def test_key_mode_and_broken_data_are_errors(site: Site) -> None:
    (site.base / "keys" / "supernode").chmod(0o640)
    (site.base / "data" / "ehr.csv").unlink()
    result = check(site)
    assert result.exit_code == 1
    assert f"chmod 600 {site.base / 'keys' / 'supernode'}" in result.flat
    assert "data: ehr.csv" in result.flat
    assert "fedcare data check" in result.flat


def test_missing_key_is_reported_with_keygen_fix(site: Site) -> None:
    site.config({"superlink.auth_private_key": "keys/nope"})
    result = check(site)
    assert result.exit_code == 1
    assert "keys/nope does not exist" in result.flat
    assert "fedcare site keygen --out" in result.flat


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"privacy.epsilom": 3.0}, "privacy.epsilom"),
        ({"superlink.address": "fl.example.org"}, "superlink.address"),
        ({"privacy.delta": 2.0}, "privacy.delta"),
    ],
)
def test_a_bad_config_names_file_and_field_and_fails(
    site: Site, change: dict[str, Any], field: str
) -> None:
    path = site.config(change)
    result = check(site)
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError)
    assert f"{path}: field {field}:" in str(result.exception)


# --------------------------------------------------------------------------------------
# site keygen
# --------------------------------------------------------------------------------------


def test_keygen_writes_keys_and_prints_the_registration_commands(tmp_path: Path) -> None:
    out = tmp_path / "keys:ab:"  # rich would print ":ab:" as an emoji unless told not to
    result = invoke(site_keygen, ["--out", str(out), "--name", "st-mary"])
    assert result.exit_code == 0, result.output
    private, public = out / "st-mary", out / "st-mary.pub"
    serialization.load_ssh_private_key(private.read_bytes(), None)
    serialization.load_ssh_public_key(public.read_bytes())
    assert (private.stat().st_mode & 0o777) == 0o600
    assert "flwr supernode register st-mary.pub <superlink-connection> --name st-mary" in (
        result.flat
    )
    assert f'auth_private_key = "{private.resolve()}"' in result.flat
    again = invoke(site_keygen, ["--out", str(out), "--name", "st-mary"])
    assert isinstance(again.exception, ConfigError) and "--force" in str(again.exception)


def test_the_printed_register_command_matches_flowers_signature() -> None:
    """`flwr supernode register PUBLIC_KEY [SUPERLINK] --name NAME` in flwr 1.42."""
    from flwr.cli.supernode.register import register

    params = inspect.signature(register).parameters
    positional = [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional[1:3] == ["public_key", "superlink"]  # after typer's ctx
    assert "name" in params


def test_site_check_refuses_a_site_toml_with_simulation_opt_ins(
    synth_site: Path, tmp_path: Path
) -> None:
    """A deployed site must not run with reproducible noise or exact evaluation."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_site, data)
    spec = data / "site.toml"
    spec.write_text(
        spec.read_text(encoding="utf-8") + "\n[simulation]\nnoise_seed = 0\n", encoding="utf-8"
    )
    config = SiteConfig.model_validate(
        {
            "site_id": "site-0",
            "data": data,
            "state_dir": tmp_path / "state",
            "privacy": {"epsilon": 8.0},
            "superlink": {"address": "127.0.0.1:9092", "insecure": True},
        }
    )
    problems = [p for p in config.check_files() if p.field == "data"]
    assert [p.severity for p in problems] == ["error"]
    assert "[simulation]" in problems[0].message and "--for-deployment" in problems[0].fix


def test_peer_key_prints_the_line_another_hospital_pins(site: Site, tmp_path: Path) -> None:
    """``fedcare site peer-key``: the site's audit public key, as a peers-file line that the
    peers-file reader accepts and that equals the key in the site's state folder."""
    from cryptography.hazmat.primitives import serialization

    from fedcare.client.secagg import load_peers_file
    from fedcare.client.site_cli import site_peer_key

    ran = invoke(site_peer_key, [str(site.config_path)])
    assert ran.exit_code == 0, ran.output
    peers_file = tmp_path / "peers.toml"
    peers_file.write_text("[peers]\n" + ran.output, encoding="utf-8")
    pinned = load_peers_file(peers_file, origin="test")
    key_file = site.base / "state" / "audit-key.pem"
    private = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert pinned == {"site-0": raw}
    again = invoke(site_peer_key, [str(site.config_path)])
    assert again.output == ran.output  # the same key: made once, then read
