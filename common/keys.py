"""Wire keys: every name that crosses between server and sites, in one place.

The run id a message carries, node-config keys
(``flower-supernode --node-config`` or the simulation's partition id), the record names of a
message, and the metric names a site may send. The server accepts from a site *only* the
metric names in :data:`ALLOWED_REPLY_METRICS` (train numbers, and task metrics with the
``val.`` / ``test.`` prefixes) and the site-info keys in :data:`SITE_INFO_KEYS`, which is how
"aggregate metrics only" is enforced.
"""

from __future__ import annotations

__all__ = [
    "RC_RUN_ID",
    "NC_PARTITION_ID",
    "NC_DATA_PATH",
    "NC_SITE_CONFIG",
    "REC_ARRAYS",
    "REC_CONFIG",
    "REC_METRICS",
    "CFG_FEDCARE_ROUND",
    "CFG_PROXIMAL_MU",
    "CFG_SCHEMA_FINGERPRINT",
    "CFG_AUDIT_HEAD",
    "CFG_AUDIT_KEY",
    "REC_SITE",
    "S_SITE_ID",
    "S_DP",
    "S_EPSILON",
    "S_DELTA",
    "S_ACCOUNTANT",
    "S_NOISE_MULTIPLIER",
    "S_SAMPLE_RATE",
    "S_STEPS",
    "S_REPLAYED",
    "S_AUDIT_KEY",
    "S_AUDIT_HEAD",
    "SITE_INFO_KEYS",
    "ERR_BUDGET",
    "ERR_POLICY",
    "ERR_DATA",
    "ERR_CONFIG",
    "TASK_METRICS",
    "M_NUM_EXAMPLES",
    "M_STEPS",
    "M_TRAIN_LOSS",
    "METRIC_PREFIXES",
    "ALLOWED_REPLY_METRICS",
    "is_allowed_metric",
]

# Run-config keys live in common/federation.py (FederationConfig); the run id also travels
# in every message's config so a site keys its ledger charges on it.
RC_RUN_ID = "run-id"

# Node config (per site).
NC_PARTITION_ID = "partition-id"
NC_DATA_PATH = "data-path"
NC_SITE_CONFIG = "site-config"  # a deployed site's site-config.toml (fedcare site start)

# Record names inside a Message's content.
REC_ARRAYS = "arrays"
REC_CONFIG = "config"
REC_METRICS = "metrics"
REC_SITE = "site"
CFG_FEDCARE_ROUND = "fedcare-round"
CFG_PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx in each round's config
CFG_SCHEMA_FINGERPRINT = "schema-fingerprint"
# The head ("<seq>:<sha256>") of the server's audit log when it sent the message; the site
# logs it, so cutting entries off the server's log shows (common/audit.py).
CFG_AUDIT_HEAD = "server-audit-head"
CFG_AUDIT_KEY = "server-audit-key"  # the fingerprint of the key the server's log is signed with

# The "site" ConfigRecord of a reply: who answered, and the privacy state of its dataset.
S_SITE_ID = "site-id"
S_DP = "dp"
S_EPSILON = "epsilon"
S_DELTA = "delta"
S_ACCOUNTANT = "accountant"
S_NOISE_MULTIPLIER = "noise-multiplier"
S_SAMPLE_RATE = "sample-rate"
S_STEPS = "steps"
S_REPLAYED = "replayed"
# The site's audit-log key (SHA-256 of its Ed25519 public key) and the head of its audit log
# after it logged the round; the server logs both (anchoring the site's log).
S_AUDIT_KEY = "audit-key-fingerprint"
S_AUDIT_HEAD = "audit-head"
SITE_INFO_KEYS = frozenset(
    {
        S_SITE_ID,
        S_DP,
        S_EPSILON,
        S_DELTA,
        S_ACCOUNTANT,
        S_NOISE_MULTIPLIER,
        S_SAMPLE_RATE,
        S_STEPS,
        S_REPLAYED,
        S_AUDIT_KEY,
        S_AUDIT_HEAD,
    }
)

# Error codes of a site's error reply (the reason starts with "<site-id>: ").
ERR_BUDGET = 4001
ERR_POLICY = 4002
ERR_DATA = 4003
ERR_CONFIG = 4004

# Metrics a site may send (aggregate numbers only; never a patient-level value).
M_NUM_EXAMPLES = "num-examples"
M_STEPS = "steps"
M_TRAIN_LOSS = "train-loss"

METRIC_PREFIXES = ("val.", "test.")
TASK_METRICS = ("auroc", "auprc", "accuracy", "balanced_accuracy", "brier", "ece", "loss", "n")
ALLOWED_REPLY_METRICS = frozenset(
    {M_NUM_EXAMPLES, M_TRAIN_LOSS, M_STEPS}
    | {f"{p}{m}" for p in METRIC_PREFIXES for m in TASK_METRICS}
)


def is_allowed_metric(name: str) -> bool:
    """Whether a site may send a metric called ``name``."""
    return name in ALLOWED_REPLY_METRICS
