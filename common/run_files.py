"""The names of the files fedcare keeps: a run directory's and a site's state folder's.

Every module that reads or writes one of these files takes its name from here, so a file is
found by one spelling everywhere.

A run directory (``fedcare simulate --out DIR``, or a deployment's ``run-dir``)::

    config.toml            the resolved configuration (simulations)      CONFIG_NAME
    sites.json             the site folders of a simulation              SITES_MANIFEST_NAME
    server_record.json     the ServerApp's full run record               RECORD_NAME
    summary.json           the versioned summary (common/summary.py)     SUMMARY_NAME
    metrics.csv            round, site, split, metric, value             METRICS_NAME
    progress.jsonl         one line per completed round                  PROGRESS_NAME
    checkpoint.pt          model, record and optimizer after each round  CHECKPOINT_NAME
    final_model.pt         the final global model                        FINAL_MODEL_NAME
    plots/                 the run's charts                              PLOTS_DIR
    audit/server.jsonl     the server's signed audit log                 SERVER_AUDIT_LOG
    audit/server-key.pem   its signing key (a deployment keeps it out)   SERVER_AUDIT_KEY
    audit/attacks.json     the membership-inference results              ATTACKS_NAME
    model_card.html        the model card (fedcare report model)         MODEL_CARD_NAME
    sites/                 synthesized site folders (simulations)        SITES_DIR
    state/                 the simulated sites' state folders            STATE_DIR
    baseline-ledgers/      the local-only baseline's throwaway ledgers   BASELINE_LEDGERS_DIR

A site's state folder (``<site folder>/.fedcare``, or ``<state-root>/<site id>``)::

    ledger.sqlite          the privacy ledger                            LEDGER_NAME
    releases/              the model releases kept for replay            RELEASES_DIR
    audit.jsonl            the site's signed audit log                   SITE_AUDIT_LOG
    audit-key.pem          its signing key                               SITE_AUDIT_KEY

Examples
--------
>>> from pathlib import Path
>>> Path("runs/demo") / RECORD_NAME
PosixPath('runs/demo/server_record.json')
>>> Path("hospital-a") / SITE_STATE_DIR / LEDGER_NAME
PosixPath('hospital-a/.fedcare/ledger.sqlite')
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CONFIG_NAME",
    "SITES_MANIFEST_NAME",
    "RECORD_NAME",
    "SUMMARY_NAME",
    "METRICS_NAME",
    "PROGRESS_NAME",
    "CHECKPOINT_NAME",
    "FINAL_MODEL_NAME",
    "PLOTS_DIR",
    "SERVER_AUDIT_LOG",
    "SERVER_AUDIT_KEY",
    "ATTACKS_NAME",
    "MODEL_CARD_NAME",
    "SITES_DIR",
    "STATE_DIR",
    "BASELINE_LEDGERS_DIR",
    "SITE_STATE_DIR",
    "LEDGER_NAME",
    "RELEASES_DIR",
    "SITE_AUDIT_LOG",
    "SITE_AUDIT_KEY",
]

# ------------------------------------------------------------------ a run directory
CONFIG_NAME: Final = "config.toml"
SITES_MANIFEST_NAME: Final = "sites.json"
RECORD_NAME: Final = "server_record.json"
SUMMARY_NAME: Final = "summary.json"
METRICS_NAME: Final = "metrics.csv"
PROGRESS_NAME: Final = "progress.jsonl"
CHECKPOINT_NAME: Final = "checkpoint.pt"
FINAL_MODEL_NAME: Final = "final_model.pt"
PLOTS_DIR: Final = "plots"
SERVER_AUDIT_LOG: Final = "audit/server.jsonl"
SERVER_AUDIT_KEY: Final = "audit/server-key.pem"
ATTACKS_NAME: Final = "audit/attacks.json"
MODEL_CARD_NAME: Final = "model_card.html"
SITES_DIR: Final = "sites"
STATE_DIR: Final = "state"
BASELINE_LEDGERS_DIR: Final = "baseline-ledgers"

# ------------------------------------------------------------------ a site's state folder
SITE_STATE_DIR: Final = ".fedcare"
"""The state folder inside a site's data folder, where no ``state-root`` is set."""
LEDGER_NAME: Final = "ledger.sqlite"
RELEASES_DIR: Final = "releases"
SITE_AUDIT_LOG: Final = "audit.jsonl"
SITE_AUDIT_KEY: Final = "audit-key.pem"
