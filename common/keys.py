"""Wire keys: every name that crosses between server and sites, in one place.

The run id a message carries, node-config keys
(``flower-supernode --node-config`` or the simulation's partition id), the record names of a
message, and the metric names a site may send. The server accepts from a site *only* the
metric names in :data:`ALLOWED_REPLY_METRICS` (train numbers, task metrics with the
``val.`` / ``test.`` prefixes, and the noisy sums of an evaluation release) and the site-info
keys in :data:`SITE_INFO_KEYS`, which is how "aggregate metrics only" is enforced.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "with_ledger_epsilon",
    "ledger_epsilon",
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
    "CFG_SCHEMA",
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
    "ERR_FAILED",
    "ERR_DIVERGED",
    "TASK_METRICS",
    "S_RUN_EPSILON",
    "S_NOISE",
    "NOISE_OS_ENTROPY",
    "NOISE_REPRODUCIBLE",
    "S_EVALUATION",
    "EVAL_DP",
    "EVAL_EXACT",
    "M_NUM_EXAMPLES",
    "M_STEPS",
    "M_TRAIN_LOSS",
    "METRIC_PREFIXES",
    "EVAL_SPLITS",
    "HIST_MAX_BINS",
    "R_HIST",
    "R_BIN_OFFSET",
    "R_LOSS_SUM",
    "R_BRIER_SUM",
    "hist_key",
    "bin_offset_key",
    "RELEASE_METRICS",
    "is_release_metric",
    "PERSONAL_PREFIX",
    "M_PERSONAL_OWN",
    "is_personal_metric",
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
CFG_SCHEMA = "schema"  # the federation's feature schema (JSON), to name what differs
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
# What this run added to the dataset's ε (S_EPSILON is the lifetime total, history included).
S_RUN_EPSILON = "run-epsilon"
# Where the DP randomness came from: NOISE_OS_ENTROPY at a real site; NOISE_REPRODUCIBLE only
# where a simulated site's own site.toml asks for it ([simulation] noise_seed).
S_NOISE = "noise"
NOISE_OS_ENTROPY = "os-entropy"
NOISE_REPRODUCIBLE = "reproducible"
# How an evaluation was released: EVAL_DP (noisy histogram, charged to the ledger) or
# EVAL_EXACT (only where a simulated site's own site.toml asks for it).
S_EVALUATION = "evaluation"
EVAL_DP = "dp"
EVAL_EXACT = "exact"
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
        S_RUN_EPSILON,
        S_NOISE,
        S_EVALUATION,
        S_AUDIT_KEY,
        S_AUDIT_HEAD,
    }
)

# Error codes of a site's error reply (the reason starts with "<site-id>: ").
ERR_BUDGET = 4001
ERR_POLICY = 4002
ERR_DATA = 4003
ERR_CONFIG = 4004
ERR_FAILED = 4005  # the round failed at the site after its charge (RoundFailed)
ERR_DIVERGED = 4006  # local training diverged after the charge (TrainingDiverged)

# Metrics a site may send (aggregate numbers only; never a patient-level value).
M_NUM_EXAMPLES = "num-examples"
M_STEPS = "steps"
M_TRAIN_LOSS = "train-loss"

METRIC_PREFIXES = ("val.", "test.")
# A site's personalized model (client/personal/): its metrics, derived from a second DP
# release under the evaluation's charge, as ``personal.<split>.<metric>``. They are that
# site's alone: the server reports them per site and never adds them into global metrics.
PERSONAL_PREFIX = "personal."
# 1 where a site reports its own personalized model, 0 where its validation split found the
# global model at least as good and the site kept that
# (fedcare.client.local.keep_better_on_validation).
M_PERSONAL_OWN = "personal.own"
#: The evaluation splits, ``METRIC_PREFIXES`` without the dot.
EVAL_SPLITS = tuple(p.rstrip(".") for p in METRIC_PREFIXES)
# ``threshold``: the decision threshold ``accuracy`` and ``balanced_accuracy`` used, chosen on
# the validation split (fedcare.models.metrics.youden_threshold,
# fedcare.models.evaluation.threshold_from_release).
TASK_METRICS = (
    "auroc",
    "auprc",
    "accuracy",
    "balanced_accuracy",
    "brier",
    "ece",
    "loss",
    "n",
    "threshold",
)

# An evaluation release (models/evaluation.py): per split, the noisy sums the server adds up
# over sites to compute global metrics. ``<split>.hist.<b>.<y>``: patients in score bin ``b``
# with label ``y``; ``<split>.bin_offset.<b>``: their scaled positions inside bin ``b``;
# ``<split>.loss_sum`` and ``<split>.brier_sum``: clipped log-loss / L and Brier terms.
HIST_MAX_BINS = 100  # the most score bins a release may have (the wire format's bound)
R_HIST = "hist"
R_BIN_OFFSET = "bin_offset"
R_LOSS_SUM = "loss_sum"
R_BRIER_SUM = "brier_sum"


def hist_key(split: str, b: int, y: int) -> str:
    """``<split>.hist.<b>.<y>``: the release's count of patients in score bin ``b``, label ``y``."""
    return f"{split}.{R_HIST}.{b}.{y}"


def bin_offset_key(split: str, b: int) -> str:
    """``<split>.bin_offset.<b>``: the release's sum of positions inside score bin ``b``."""
    return f"{split}.{R_BIN_OFFSET}.{b}"


RELEASE_METRICS = frozenset(
    {f"{s}.{m}" for s in EVAL_SPLITS for m in (R_LOSS_SUM, R_BRIER_SUM)}
    | {hist_key(s, b, y) for s in EVAL_SPLITS for b in range(HIST_MAX_BINS) for y in (0, 1)}
    | {bin_offset_key(s, b) for s in EVAL_SPLITS for b in range(HIST_MAX_BINS)}
)
ALLOWED_REPLY_METRICS = frozenset(
    {M_NUM_EXAMPLES, M_TRAIN_LOSS, M_STEPS}
    | {f"{p}{m}" for p in METRIC_PREFIXES for m in TASK_METRICS}
    | RELEASE_METRICS
    | {f"{PERSONAL_PREFIX}{p}{m}" for p in METRIC_PREFIXES for m in TASK_METRICS}
    | {M_PERSONAL_OWN}
)


def is_release_metric(name: str) -> bool:
    """Whether ``name`` is one of an evaluation release's sums (not a derived metric)."""
    return name in RELEASE_METRICS


def is_personal_metric(name: str) -> bool:
    """Whether ``name`` is a metric of a site's personalized model (``personal.test.auroc``)."""
    return name.startswith(PERSONAL_PREFIX)


def is_allowed_metric(name: str) -> bool:
    """Whether a site may send a metric called ``name``."""
    return name in ALLOWED_REPLY_METRICS


# A refusal's reason may end with the site's ledger ε: a Flower error reply carries only a
# code and a reason, and the results should show a refusing site's ε, not "unknown".
_LEDGER_TAIL = re.compile(r" \[ledger epsilon=([0-9.eE+-]+) delta=([0-9.eE+-]+)\]\Z")


def with_ledger_epsilon(reason: str, *, epsilon: float, delta: float) -> str:
    """``reason`` ending with the site's ledger ε (read back by :func:`ledger_epsilon`).

    >>> r = with_ledger_epsilon("site-0: budget spent", epsilon=3.99, delta=1e-5)
    >>> r
    'site-0: budget spent [ledger epsilon=3.99 delta=1e-05]'
    >>> ledger_epsilon(r)
    ('site-0: budget spent', 3.99, 1e-05)
    """
    return f"{reason} [ledger epsilon={epsilon:.6g} delta={delta:g}]"


def ledger_epsilon(reason: str) -> tuple[str, float | None, float | None]:
    """``(reason without the tail, ε, δ)``; ``None`` for both when there is no valid tail."""
    match = _LEDGER_TAIL.search(reason)
    if match is None:
        return reason, None, None
    try:
        epsilon, delta = float(match.group(1)), float(match.group(2))
    except ValueError:
        return reason, None, None
    if not (math.isfinite(epsilon) and epsilon >= 0 and 0 < delta < 1):
        return reason, None, None
    return reason[: match.start()], epsilon, delta
