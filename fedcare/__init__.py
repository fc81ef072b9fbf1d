"""fedcare: federated learning for hospitals, with differential privacy at every site.

The Python API (:mod:`fedcare.api`); every function takes its options as keyword arguments
and returns a typed result:

simulate(out=..., scenario=..., sites=..., settings=..., in_process=...)
    Run a simulated federation (in this process with Flower's ``run_simulation``, or through
    ``flwr run``) -> SimulationResult: run dir, per-round and final metrics, ε per site.
load_site(folder)
    A site's folder, validated and loaded -> SiteData.
train_site(site, task=..., state_dir=..., rounds=..., target_epsilon=...)
    One site's private local training, charged to its ledger -> SiteTraining.
read_ledger(state_dir)
    A site's privacy ledger: charges and lifetime ε per dataset -> LedgerView.
verify_run(run_dir)
    A run's audit logs verified and cross-checked -> VerifyResult.
audit_run(run_dir, ...)
    Membership inference and the canary audit of a run -> AttackReport.
audit_report(run_dir, out=...)
    The run's audit verdict and HTML page -> ReportInputs.
synthesize(out, n_sites=..., config=SynthConfig(...))
    Synthetic hospitals in the formats real sites hold.
register_model, register_task_kind, register_strategy, load_plugins
    Plug-ins: a module named by ``FEDCARE_PLUGINS`` or a ``fedcare.plugins`` entry point
    registers a model, task kind or strategy in every process of a run.

``docs/api.md`` describes the API and plug-ins; ``docs/notebooks/quickstart.ipynb`` runs it.
The ``fedcare`` command lives in :mod:`fedcare.cli`.

The names are loaded when first used: importing ``fedcare`` alone stays light (every site
process imports it to hash fedcare's code for its audit log).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("fedcare")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

if TYPE_CHECKING:
    from fedcare.api import (
        LedgerView,
        Scenario,
        SimulationResult,
        SiteTraining,
        SynthConfig,
        audit_report,
        audit_run,
        load_plugins,
        load_site,
        read_ledger,
        register_model,
        register_strategy,
        register_task_kind,
        simulate,
        synthesize,
        train_site,
        verify_run,
    )

__all__ = [
    "__version__",
    "simulate",
    "SimulationResult",
    "load_site",
    "train_site",
    "SiteTraining",
    "read_ledger",
    "LedgerView",
    "verify_run",
    "audit_run",
    "audit_report",
    "synthesize",
    "SynthConfig",
    "Scenario",
    "register_model",
    "register_task_kind",
    "register_strategy",
    "load_plugins",
]

#: The names :mod:`fedcare.api` exports, loaded from it on first use.
_API = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("fedcare.api"), name)
    raise AttributeError(f"module 'fedcare' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
