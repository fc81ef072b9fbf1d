"""What ``fedcare site check`` checks on the site's own machine, as data.

Each check is one :class:`Check` line (ok / warning / error / skipped, each problem with
its fix). :func:`local_checks` runs the checks that need no network: the files the
site's ``site-config.toml`` names, the site's data (the same validation as
``fedcare data check``) and the policy against that data. The SuperLink connection is
probed by :func:`fedcare.client.tls_probe.probe_superlink`; the command in
:mod:`fedcare.client.site_cli` runs both and prints the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fedcare.client.data.data_checks import ValidationReport, validate_site
from fedcare.client.site_config import SiteConfig
from fedcare.common.audit import public_key_fingerprint
from fedcare.common.certs import describe_certificate, load_node_private_key, ssh_fingerprint
from fedcare.common.spec import SPEC_FILENAME

__all__ = ["Status", "Check", "local_checks"]

Status = Literal["ok", "warning", "error", "skipped"]
#: The order of the file checks in the report (the config file's order).
_FILE_ORDER: tuple[str, ...] = (
    "data",
    "state_dir",
    "ledger",
    "superlink.root_certificates",
    "superlink.auth_private_key",
    "superlink.insecure",
)


@dataclass(frozen=True)
class Check:
    """One line of ``fedcare site check``.

    Attributes
    ----------
    name:
        What was checked (a config field, ``data``, ``superlink``...).
    status:
        ``ok``, ``warning``, ``error`` or ``skipped``.
    detail:
        What was found.
    fix:
        How to fix it (empty when there is nothing to fix).
    """

    name: str
    status: Status
    detail: str
    fix: str = ""


def _file_checks(config: SiteConfig) -> list[Check]:
    """:meth:`SiteConfig.check_files`, plus an ok line (with what matters) per clean field."""
    problems = config.check_files()
    checks = [Check(p.field, p.severity, p.message, p.fix) for p in problems]
    flagged = {p.field for p in problems if p.severity == "error"}
    link = config.superlink
    ok: list[tuple[str, Callable[[], str]]] = [
        ("data", lambda: f"{config.data} holds a {SPEC_FILENAME}"),
        ("state_dir", lambda: f"{config.state_dir} is writable"),
    ]
    if config.ledger is not None:
        ok.append(("ledger", lambda: f"{config.ledger} can be written"))
    ca_path, key_path = link.root_certificates, link.auth_private_key
    if ca_path is not None:

        def ca_detail() -> str:
            info = describe_certificate(ca_path)
            return (
                f"{info.subject}, valid until {info.not_after:%Y-%m-%d}; SHA-256 fingerprint "
                f"{info.fingerprint} (compare it with the one the coordinating centre announced)"
            )

        ok.append(("superlink.root_certificates", ca_detail))
    if key_path is not None:

        def key_detail() -> str:
            key = load_node_private_key(key_path)
            return (
                f"EC {key.curve.name} key, mode 0600; fingerprint "
                f"{ssh_fingerprint(key.public_key())}"
            )

        ok.append(("superlink.auth_private_key", key_detail))
    ok.append(
        (
            "superlink.run_signing_key",
            lambda: (
                "runs must be signed by the centre's key "
                f"{public_key_fingerprint(config.run_public_key())[:16]}..."
            ),
        )
    )
    for field, detail in ok:
        if field not in flagged and not any(c.name == field for c in checks):
            checks.append(Check(field, "ok", detail()))
    if link.insecure:
        checks.append(
            Check(
                "superlink.insecure",
                "warning",
                "TLS is OFF: model updates cross the network unencrypted and the SuperLink "
                "is not authenticated",
                "use insecure = true only for local tests; set insecure = false and "
                "root_certificates for a real deployment",
            )
        )
    elif link.root_certificates is None:
        checks.append(
            Check(
                "superlink.root_certificates",
                "ok",
                "not set: the system's trust store verifies the SuperLink's certificate",
                "",
            )
        )
    if link.auth_private_key is None:
        checks.append(
            Check(
                "superlink.auth_private_key",
                "warning",
                "no node-authentication key: a SuperLink started with "
                "--enable-supernode-auth refuses this site",
                "run `fedcare site keygen --out keys`, have the coordinating centre register "
                "keys/supernode.pub, and set auth_private_key",
            )
        )
    rank = {name: i for i, name in enumerate(_FILE_ORDER)}
    return sorted(checks, key=lambda c: rank.get(c.name, len(rank)))


def _data_checks(config: SiteConfig) -> tuple[list[Check], ValidationReport | None]:
    if not (config.data / SPEC_FILENAME).is_file():
        return [Check("data.validation", "skipped", f"no {SPEC_FILENAME} to validate")], None
    report = validate_site(config.data)
    checks = []
    for p in report.problems:
        where = ":".join(x for x in (p.file, p.column or "") if x)
        row = f" (row {p.row})" if p.row is not None else ""
        checks.append(Check(f"data: {where}", p.severity, f"{p.message}{row}", p.fix))
    if report.ok:
        s = report.summary
        held = ", ".join(f"{m} {n}" for m, n in s.modalities.items())
        checks.append(
            Check(
                "data.validation",
                "ok",
                f"{s.patients} patients ({held}); {len(report.warnings)} warning(s)",
            )
        )
    else:
        checks.append(
            Check(
                "data.validation",
                "error",
                f"{len(report.errors)} error(s) in {config.data}",
                f"fix them (details: fedcare data check {config.data})",
            )
        )
    if report.spec is not None:
        if report.spec.site_id != config.site_id:
            checks.append(
                Check(
                    "site_id",
                    "error",
                    f"site-config says {config.site_id!r} but {config.data / SPEC_FILENAME} "
                    f"says {report.spec.site_id!r}",
                    "make them the same (the site id names the site in the federation)",
                )
            )
        else:
            checks.append(Check("site_id", "ok", f"{config.site_id!r} matches {SPEC_FILENAME}"))
    return checks, report


def _policy_checks(config: SiteConfig, report: ValidationReport | None) -> list[Check]:
    checks = []
    rules = config.rules
    if rules.allowed_tasks is not None and report is not None and report.spec is not None:
        defined = {t.name for t in report.spec.tasks}
        for task in rules.allowed_tasks:
            if task not in defined:
                checks.append(
                    Check(
                        "policy.allowed_tasks",
                        "warning",
                        f"task {task!r} is not defined in {SPEC_FILENAME} (defined: "
                        f"{', '.join(sorted(defined)) or 'none'}); no run can use it",
                        "fix its spelling or remove it",
                    )
                )
    if rules.allowed_models is not None:
        from fedcare.models.registry import available_models  # importing models loads torch

        known = set(available_models())
        for model in rules.allowed_models:
            if model not in known:
                checks.append(
                    Check(
                        "policy.allowed_models",
                        "warning",
                        f"model {model!r} is not a registered model (registered: "
                        f"{', '.join(sorted(known))}); no run can use it",
                        "fix its spelling or remove it",
                    )
                )
    p = config.privacy
    checks.append(
        Check(
            "privacy",
            "ok" if p.require_dp else "warning",
            f"budget ε={p.epsilon:g} at δ={p.delta:g} ({p.accountant}), noise multiplier "
            f">= {p.min_noise_multiplier:g}, DP {'required' if p.require_dp else 'NOT required'}",
            "" if p.require_dp else "set require_dp = true outside a research sandbox",
        )
    )
    if config.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            checks.append(
                Check(
                    "device",
                    "error",
                    "device = 'cuda' but PyTorch sees no CUDA device on this machine",
                    "set device = 'auto' or 'cpu', or install the GPU driver and a CUDA build "
                    "of PyTorch",
                )
            )
    return checks


def local_checks(config: SiteConfig) -> list[Check]:
    """The checks that need no network, in report order: files, data, then policy.

    Parameters
    ----------
    config:
        The parsed ``site-config.toml``.
    """
    checks = _file_checks(config)
    data_checks, report = _data_checks(config)
    checks += data_checks
    checks += _policy_checks(config, report)
    return checks
