"""A deployed site's own configuration: ``site-config.toml``.

One file, owned by the hospital, says where its data and durable state live, what it allows
(its privacy budget and policy, enforced whatever a run asks), and how its SuperNode reaches
the coordinating centre's SuperLink (address, CA certificate, node-authentication key).
``fedcare site check`` validates it; ``fedcare site start`` runs a SuperNode from it; the
ClientApp reads it through the node config ``site-config``.

Relative paths are resolved against the folder that holds the file; ``~`` is expanded.
Every field is documented in ``deploy/site-config.example.toml``::

    site_id = "st-mary"
    data = "/srv/fedcare/site"
    state_dir = "/var/lib/fedcare"

    [privacy]
    epsilon = 8.0

    [superlink]
    address = "fl.example-hospital.org:9092"
    root_certificates = "certs/ca.crt"
    auth_private_key = "keys/supernode"
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedcare.client.policy import SitePolicy
from fedcare.common.audit import AuditLogError, load_public_key_file
from fedcare.common.certs import describe_certificate, load_node_private_key
from fedcare.common.errors import ConfigError, format_validation_error
from fedcare.common.run_files import LEDGER_NAME
from fedcare.common.spec import SPEC_FILENAME
from fedcare.common.tomlcompat import tomllib

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

__all__ = [
    "SITE_CONFIG_FILENAME",
    "EXAMPLE_PATH",
    "SiteConfigProblem",
    "PrivacySection",
    "PolicySection",
    "SuperLinkSection",
    "SuperNodeSection",
    "SiteConfig",
    "load_site_config",
    "split_address",
]

SITE_CONFIG_FILENAME = "site-config.toml"
#: Where the commented example lives in the repository (named in error messages).
EXAMPLE_PATH = "deploy/site-config.example.toml"
_BASE_DIR = "base_dir"  # validation-context key: the folder relative paths resolve against
_NAME = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class SiteConfigProblem:
    """One thing wrong with a site's configuration, found by :meth:`SiteConfig.check_files`.

    Attributes
    ----------
    severity:
        ``"error"`` stops the site from working; ``"warning"`` may not.
    field:
        The dotted config field concerned (``superlink.auth_private_key``).
    message:
        What is wrong.
    fix:
        How to fix it.
    """

    severity: Literal["error", "warning"]
    field: str
    message: str
    fix: str


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) to ``(host, port)``; ``ValueError`` says what is wrong.

    Examples
    --------
    >>> split_address("fl.example.org:9092")
    ('fl.example.org', 9092)
    >>> split_address("[::1]:9092")
    ('::1', 9092)
    """
    text = address.strip()
    if "://" in text:
        raise ValueError(
            f"{address!r} has a URL prefix; give host:port only (e.g. fl.example.org:9092)"
        )
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{address!r} is not host:port; add the port (e.g. {text}:9092)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as e:
            raise ValueError(f"{address!r}: {host!r} is not an IPv6 address") from e
    elif ":" in host:
        raise ValueError(f"{address!r}: write an IPv6 address in brackets, e.g. [::1]:9092")
    else:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            labels = host.rstrip(".").split(".")
            if not all(_NAME.match(label) for label in labels):
                raise ValueError(
                    f"{address!r}: {host!r} is neither an IP address nor a valid host name"
                ) from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{address!r}: port {port_text!r} is not a number in 1..65535")
    return host, int(port_text)


def _resolve(value: Any, info: ValidationInfo) -> Any:
    """Expand ``~`` and make a relative path absolute against the config file's folder."""
    if isinstance(value, str):
        if not value.strip():
            return value
        value = Path(value)
    if isinstance(value, Path):
        value = value.expanduser()
        base = (info.context or {}).get(_BASE_DIR)
        if base is not None and not value.is_absolute():
            value = Path(base) / value
    return value


def _optional_path(value: Any, info: ValidationInfo) -> Any:
    """``""`` (TOML has no null) means unset."""
    if isinstance(value, str) and not value.strip():
        return None
    return _resolve(value, info)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PrivacySection(_Section):
    """``[privacy]``: the site's privacy budget (see :class:`~fedcare.client.policy.SitePolicy`)."""

    epsilon: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    accountant: Literal["prv", "rdp"] = "prv"
    min_noise_multiplier: float = Field(default=0.3, ge=0, allow_inf_nan=False)
    require_dp: bool = True
    #: The most ε one run may add (default: the whole budget ``epsilon``).
    max_run_epsilon: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    #: Noise of each private evaluation release (``models/evaluation.py``), charged.
    evaluation_noise_multiplier: float = Field(default=5.0, gt=0, allow_inf_nan=False)


class PolicySection(_Section):
    """``[policy]``: what the site allows; an omitted list allows everything."""

    allowed_tasks: tuple[str, ...] | None = None
    allowed_models: tuple[str, ...] | None = None
    max_local_epochs: int = Field(default=5, ge=1)
    min_count: int = Field(default=10, ge=1)
    max_rounds: int = Field(default=100, ge=1)
    max_evaluations_per_run: int = Field(default=25, ge=0)

    @field_validator("allowed_tasks", "allowed_models")
    @classmethod
    def _names(cls, value: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        if value is None:
            return None
        what = "tasks" if info.field_name == "allowed_tasks" else "models"
        if not value:
            raise ValueError(
                f"an empty list would allow no {what[:-1]} at all; omit the key to allow "
                f"every {what[:-1]}, or list the {what} allowed"
            )
        names = tuple(v.strip() for v in value)
        if not all(names):
            raise ValueError(f"an entry is empty; list {what} by name")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"lists {', '.join(dupes)} more than once; list each once")
        return names


class SuperLinkSection(_Section):
    """``[superlink]``: how the SuperNode reaches the coordinating centre."""

    address: str
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    #: The centre's run-signing public key (run-signing.pub): the site trains only for
    #: runs it signed (``common/run_signing.py``). Required to train.
    run_signing_key: Path | None = None
    insecure: bool = False

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        split_address(value)
        return value.strip()

    @field_validator("root_certificates", "auth_private_key", "run_signing_key", mode="before")
    @classmethod
    def _paths(cls, value: Any, info: ValidationInfo) -> Any:
        return _optional_path(value, info)

    @model_validator(mode="after")
    def _tls(self) -> SuperLinkSection:
        if self.insecure and self.root_certificates is not None:
            raise ValueError(
                "insecure = true turns TLS off, but root_certificates is set; remove "
                "root_certificates, or set insecure = false (insecure is for local tests only)"
            )
        return self

    @property
    def host(self) -> str:
        """The SuperLink's host name or IP address (without brackets)."""
        return split_address(self.address)[0]

    @property
    def port(self) -> int:
        return split_address(self.address)[1]


class SuperNodeSection(_Section):
    """``[supernode]``: the local SuperNode process.

    Its Runtime API listens on 127.0.0.1:``port``, where only fedcare's site worker (holding
    the site's SuperExec secret) takes its tasks. There is no isolation choice: a SuperNode
    that launched Flower's executor would run code from the bundle a run ships.
    """

    port: int = Field(default=9094, ge=1, le=65535)
    poll_interval: float = Field(default=0.5, ge=0.05, le=3.0)
    """Seconds between the SuperNode's requests for a message while none comes (Flower's own
    fixed wait is 3 s, :mod:`fedcare.client.supernode`); each is one small HTTPS request."""

    isolation: None = Field(default=None, exclude=True)
    """Gone: kept only to explain why an old site-config's line is refused."""

    @field_validator("isolation", mode="before")
    @classmethod
    def _no_isolation(cls, value: Any) -> None:
        raise ValueError(
            "isolation is no longer a choice: `fedcare site start` always runs the SuperNode "
            "with process isolation and fedcare's own site worker as its only executor "
            "(Flower's would run code a run ships); remove the isolation line"
        )


class SiteConfig(_Section):
    """The contents of a site's ``site-config.toml``. Frozen; unknown keys are errors.

    Paths are absolute once loaded by :func:`load_site_config` (relative ones are resolved
    against the file's folder). The ``[policy]`` table is the attribute ``rules``;
    :meth:`policy` turns it and ``[privacy]`` into the :class:`SitePolicy` the site enforces.
    """

    site_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    data: Path
    state_dir: Path
    ledger: Path | None = None
    #: Secure aggregation's pinned peers: a TOML file, site id -> each other hospital's
    #: audit public key (``client/secagg.py`` ``load_peers_file``), exchanged out of band.
    #: Without it the site refuses every secure-aggregation round.
    secagg_peers: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    privacy: PrivacySection
    rules: PolicySection = Field(default_factory=PolicySection, alias="policy")
    superlink: SuperLinkSection
    supernode: SuperNodeSection = Field(default_factory=SuperNodeSection)

    @field_validator("data", "state_dir", mode="before")
    @classmethod
    def _paths(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty; give a folder path")
        return _resolve(value, info)

    @field_validator("ledger", "secagg_peers", mode="before")
    @classmethod
    def _ledger(cls, value: Any, info: ValidationInfo) -> Any:
        return _optional_path(value, info)

    def secagg_roster(self) -> dict[str, bytes]:
        """The hospitals this site pins for secure aggregation: the peers file's, plus its
        own audit key (site id -> raw Ed25519 public key).

        Raises
        ------
        ConfigError
            No ``secagg_peers`` set, an unreadable or malformed peers file, or one giving
            this site another key than its own.
        """
        from fedcare.client.secagg import audit_keys, load_peers_file

        origin = f"site {self.site_id}: site-config secagg_peers"
        if self.secagg_peers is None:
            raise ConfigError(
                f"{origin} is not set, so this site cannot tell the other hospitals from sites "
                "the centre invents and refuses secure aggregation; set secagg_peers to a file "
                'with a [peers] table: site-id = "<hex of that hospital\'s audit public key>"'
            )
        peers = load_peers_file(self.secagg_peers, origin=f"{origin} ({self.secagg_peers})")
        own = audit_keys([(self.site_id, self.state_dir)])
        if self.site_id in peers and peers[self.site_id] != own[self.site_id]:
            raise ConfigError(
                f"{origin} ({self.secagg_peers}) gives this site ({self.site_id}) another key "
                f"than its own audit key in {self.state_dir}; fix the file"
            )
        return {**peers, **own}

    def ledger_path(self) -> Path:
        """The privacy ledger: ``ledger`` if set, else ``<state_dir>/ledger.sqlite``."""
        return self.ledger if self.ledger is not None else self.state_dir / LEDGER_NAME

    def policy(self) -> SitePolicy:
        """The :class:`SitePolicy` this site enforces (``[privacy]`` + ``[policy]``)."""
        return SitePolicy(
            epsilon_budget=self.privacy.epsilon,
            delta=self.privacy.delta,
            accountant=self.privacy.accountant,
            min_noise_multiplier=self.privacy.min_noise_multiplier,
            require_dp=self.privacy.require_dp,
            allowed_tasks=self.rules.allowed_tasks,
            allowed_models=self.rules.allowed_models,
            max_local_epochs=self.rules.max_local_epochs,
            min_count=self.rules.min_count,
            max_run_epsilon=(
                self.privacy.epsilon
                if self.privacy.max_run_epsilon is None
                else self.privacy.max_run_epsilon
            ),
            max_rounds=self.rules.max_rounds,
            max_evaluations=self.rules.max_evaluations_per_run,
            evaluation_noise_multiplier=self.privacy.evaluation_noise_multiplier,
        )

    # ----------------------------------------------------------------------------------
    # Files on disk (not checked at parse time: the file may be validated elsewhere)
    # ----------------------------------------------------------------------------------

    def check_files(self) -> list[SiteConfigProblem]:
        """Check every file and folder the config names; return every problem found.

        The data folder must hold a ``site.toml``; the state folder (and the ledger's) must
        be writable or creatable; the CA certificate must parse and be valid now; the
        node-authentication private key must be private (mode 0600), and an unencrypted
        OpenSSH EC key on a NIST curve. The data's contents are not checked here
        (``fedcare data check`` / ``fedcare site check`` do that).
        """
        problems: list[SiteConfigProblem] = []
        if not self.data.is_dir():
            problems.append(
                SiteConfigProblem(
                    "error",
                    "data",
                    f"{self.data} is not a folder",
                    f"set data to the folder holding the site's {SPEC_FILENAME}",
                )
            )
        elif not (self.data / SPEC_FILENAME).is_file():
            problems.append(
                SiteConfigProblem(
                    "error",
                    "data",
                    f"{self.data} holds no {SPEC_FILENAME}",
                    f"describe the site's files in {self.data / SPEC_FILENAME} "
                    "(see common/spec.py)",
                )
            )
        else:
            problems += _simulation_table(self.data / SPEC_FILENAME)
        problems += _writable_folder(self.state_dir, "state_dir")
        if self.ledger is not None:
            if self.ledger.is_dir():
                problems.append(
                    SiteConfigProblem(
                        "error",
                        "ledger",
                        f"{self.ledger} is a folder",
                        "set ledger to a file path (e.g. <state_dir>/ledger.sqlite) or remove it",
                    )
                )
            else:
                problems += _writable_folder(self.ledger.parent, "ledger")
        problems += self._check_ca()
        problems += self._check_key()
        problems += self._check_run_key()
        return problems

    def run_public_key(self) -> bytes:
        """The pinned run-signing public key (raw 32 bytes).

        Raises
        ------
        ConfigError
            None is pinned, or the file holds no Ed25519 public key.
        """
        path = self.superlink.run_signing_key
        if path is None:
            raise ConfigError(
                f"site {self.site_id}: site-config pins no run-signing key, so no run can be "
                "authorised; set [superlink] run_signing_key to the centre's run-signing.pub"
            )
        try:
            return load_public_key_file(path)
        except AuditLogError as e:
            raise ConfigError(
                f"site {self.site_id}: superlink.run_signing_key: {e}; copy the centre's "
                "run-signing.pub there"
            ) from e

    def _check_run_key(self) -> list[SiteConfigProblem]:
        try:
            self.run_public_key()
        except ConfigError as e:
            fix = "copy the centre's run-signing.pub (from `fedcare certs init`) and set it"
            return [SiteConfigProblem("error", "superlink.run_signing_key", str(e), fix)]
        return []

    def _check_ca(self) -> list[SiteConfigProblem]:
        path = self.superlink.root_certificates
        if path is None:
            return []
        field = "superlink.root_certificates"
        fix = "copy the ca.crt the coordinating centre made with `fedcare certs init`"
        if not path.is_file():
            return [SiteConfigProblem("error", field, f"{path} does not exist", fix)]
        try:
            info = describe_certificate(path)
        except ConfigError as e:
            return [SiteConfigProblem("error", field, str(e), fix)]
        problems = []
        if not info.is_ca:
            problems.append(
                SiteConfigProblem(
                    "warning",
                    field,
                    f"{path} is not a CA certificate ({info.subject})",
                    f"use the CA's certificate (ca.crt), not the server's; {fix}",
                )
            )
        if info.expired():
            problems.append(
                SiteConfigProblem(
                    "error",
                    field,
                    f"{path} is valid only from {info.not_before:%Y-%m-%d} to "
                    f"{info.not_after:%Y-%m-%d}",
                    "ask the coordinating centre for a current CA certificate "
                    "(`fedcare certs init --force`), or check this machine's clock",
                )
            )
        return problems

    def _check_key(self) -> list[SiteConfigProblem]:
        path = self.superlink.auth_private_key
        if path is None:
            return []
        field = "superlink.auth_private_key"
        if not path.is_file():
            return [
                SiteConfigProblem(
                    "error",
                    field,
                    f"{path} does not exist",
                    f"make a key pair with `fedcare site keygen --out {path.parent} "
                    f"--name {path.name}` and have the coordinating centre register its .pub",
                )
            ]
        problems = []
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            problems.append(
                SiteConfigProblem(
                    "error",
                    field,
                    f"{path} has mode {mode:04o}: other users of this machine can read it",
                    f"chmod 600 {path}",
                )
            )
        try:
            load_node_private_key(path)
        except ConfigError as e:
            problems.append(
                SiteConfigProblem("error", field, str(e), "use the key `fedcare site keygen` wrote")
            )
        return problems


def _simulation_table(spec_path: Path) -> list[SiteConfigProblem]:
    """A deployed site's ``site.toml`` must not carry the simulation-only ``[simulation]``
    opt-ins (reproducible DP noise, exact evaluation): the ClientApp refuses every round."""
    try:
        raw = tomllib.loads(spec_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return []  # `fedcare data check` reports an unreadable site.toml
    if "simulation" not in raw:
        return []
    return [
        SiteConfigProblem(
            "error",
            "data",
            f"{spec_path} has a [simulation] table (reproducible noise or exact evaluation), "
            "which only a simulated site may use; the site would refuse every round",
            "remove the [simulation] table (`fedcare data synth --for-deployment` writes "
            "synthetic hospitals without it)",
        )
    ]


def _writable_folder(folder: Path, field: str) -> list[SiteConfigProblem]:
    """A folder this process can create files in, or can create (its nearest parent is)."""
    if folder.exists():
        if not folder.is_dir():
            return [SiteConfigProblem("error", field, f"{folder} is a file", "set a folder path")]
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            return [
                SiteConfigProblem(
                    "error",
                    field,
                    f"cannot write in {folder} ({e.strerror})",
                    f"give the SuperNode's user write access to {folder}",
                )
            ]
        return []
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return [
            SiteConfigProblem(
                "error",
                field,
                f"{folder} does not exist and cannot be created ({parent} is not writable)",
                f"create {folder} and give the SuperNode's user write access to it",
            )
        ]
    return [
        SiteConfigProblem(
            "warning",
            field,
            f"{folder} does not exist yet",
            "nothing to do: it is created on first use (or create it now)",
        )
    ]


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _known_keys(loc: Sequence[int | str]) -> list[str]:
    """The keys allowed in the table at ``loc`` (aliases as written in the TOML)."""
    model: type[BaseModel] = SiteConfig
    for part in loc:
        fields = {(f.alias or name): f for name, f in model.model_fields.items()}
        field = fields.get(str(part))
        if field is None:
            return []
        inner = field.annotation
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return []
        model = inner
    return [f.alias or name for name, f in model.model_fields.items()]


def _site_id_problem(error: ErrorDetails) -> str | None:
    """The wording of a site id that is not one (pydantic would quote its pattern)."""
    if error["type"] == "string_pattern_mismatch" and tuple(error["loc"]) == ("site_id",):
        return f"{error['input']!r} is not a site id; use letters, digits, '_', '.' and '-' only"
    return None


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a ``site-config.toml`` (or the one inside a folder).

    Parameters
    ----------
    path:
        The file, or a folder holding ``site-config.toml``.

    Returns
    -------
    SiteConfig
        With every relative path resolved against the file's folder.

    Raises
    ------
    ConfigError
        Missing file, invalid TOML, or an invalid field; the message names the file and
        every offending dotted field, and says how to fix it.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / SITE_CONFIG_FILENAME
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such file; write the site's configuration there (start from "
            f"{EXAMPLE_PATH})"
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); fix the syntax") from e
    try:
        return SiteConfig.model_validate(raw, context={_BASE_DIR: path.resolve().parent})
    except ValidationError as e:
        message = format_validation_error(
            str(path),
            e,
            known_keys=_known_keys,
            reference=EXAMPLE_PATH,
            explain=_site_id_problem,
        )
        raise ConfigError(message) from e
