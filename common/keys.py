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
    "CFG_EVALUATE_ROUND",
    "REC_EVAL_METRICS",
    "REC_EVAL_SITE",
    "REC_EVAL_REFUSAL",
    "REC_TRAIN_REFUSAL",
    "S_EVALUATED_ROUND",
    "F_CODE",
    "F_REASON",
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
    "R_GROUP",
    "R_GAP",
    "GROUP_METRICS",
    "GAP_METRICS",
    "MAX_GROUP_INDEX",
    "group_prefix",
    "gap_key",
    "is_group_metric",
    "is_group_release_metric",
    "PERSONAL_PREFIX",
    "M_PERSONAL_OWN",
    "is_personal_metric",
    "ALLOWED_REPLY_METRICS",
    "is_allowed_metric",
    "EXPLAIN_PREFIX",
    "EXPLAIN_N",
    "MAX_EXPLAIN_FEATURES",
    "explain_key",
    "is_explain_metric",
    "CURVE_PREFIX",
    "CURVE_AT_RISK",
    "CURVE_EVENTS",
    "CURVE_PREDICTED",
    "CURVE_PARTS",
    "MAX_CURVE_INTERVALS",
    "curve_key",
    "parse_curve_key",
    "is_curve_metric",
    "R_SURV_HIST",
    "surv_hist_key",
    "parse_surv_hist_key",
    "is_surv_hist_metric",
    "MT_SECAGG",
    "REC_SECAGG",
    "SA_STAGE",
    "SA_ADVERTISE",
    "SA_SHARE_KEYS",
    "SA_MASKED_INPUT",
    "SA_UNMASK",
    "SA_ROUND",
    "SA_THRESHOLD",
    "SA_NODES",
    "SA_ENC_KEY",
    "SA_MASK_KEY",
    "SA_COMMITMENT",
    "SA_SIGNATURE",
    "SA_SITE_KEY",
    "SA_BOXES",
    "SA_WEIGHT",
    "SA_SURVIVORS",
    "SA_DROPPED",
    "SA_KINDS",
    "SA_SHARES",
    "SA_MASKED",
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
# An evaluation folded into a training message (server/guard.py): the train message of round
# r + 1 carries CFG_EVALUATE_ROUND = r, and the site evaluates the model it received (the
# global model after round r) before it trains. Its reply carries that evaluation under
# REC_EVAL_METRICS + REC_EVAL_SITE (the records an evaluate reply has as "metrics" and "site",
# the site record naming S_EVALUATED_ROUND), or REC_EVAL_REFUSAL when the site refused it;
# where the training is refused after the evaluation, REC_TRAIN_REFUSAL replaces the update.
# A refusal record holds F_CODE (an ERR_* code) and F_REASON ("<site-id>: <why>").
CFG_EVALUATE_ROUND = "evaluate-round"
REC_EVAL_METRICS = "evaluate-metrics"
REC_EVAL_SITE = "evaluate-site"
REC_EVAL_REFUSAL = "evaluate-refusal"
REC_TRAIN_REFUSAL = "train-refusal"
S_EVALUATED_ROUND = "evaluated-round"
F_CODE = "code"
F_REASON = "reason"

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
        S_EVALUATED_ROUND,
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
    # A survival task's (fedcare.models.survival; fedcare.models.survival_metrics): Harrell's
    # C-index, the time-dependent AUC's KM-weighted mean, the integrated Brier score.
    "c_index",
    "td_auc",
    "ibs",
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


# Per-group evaluation (models/fairness.py): for a group attribute ``<a>`` of the schema
# (``[[schema.groups]]``, a name of ``[a-z][a-z0-9_]*``) and its group index ``<g>`` (the
# schema's order, the ``unknown`` group last), ``<split>.group.<a>.<g>.<metric>`` is a metric
# of that group's patients (GROUP_METRICS), ``<split>.group.<a>.<g>.<sum>`` its release's
# noisy sums (as a split's: hist.<b>.<y>, bin_offset.<b>, loss_sum, brier_sum), and
# ``<split>.gap.<a>.<metric>`` the largest difference of a metric across the released groups
# (GAP_METRICS). The group indices and bins are bounded: MAX_GROUP_INDEX, HIST_MAX_BINS.
R_GROUP = "group"
R_GAP = "gap"
#: ``tpr``/``fpr``: at the evaluation's decision threshold; ``calibration_error``: the mean
#: predicted probability minus the observed rate of positives (calibration in the large).
GROUP_METRICS = (
    "n",
    "auroc",
    "tpr",
    "fpr",
    "ece",
    "brier",
    "mean_predicted",
    "observed",
    "calibration_error",
    # A survival task's groups (models/survival_groups.py).
    "c_index",
    "td_auc",
)
GAP_METRICS = ("auroc", "tpr", "fpr", "ece", "calibration_error", "c_index", "td_auc")
MAX_GROUP_INDEX = 16  # common.spec.MAX_GROUPS groups, then "unknown"
_ATTR = r"[a-z][a-z0-9_]{0,31}"
_INDEX = r"(0|[1-9][0-9]?)"
_SPLIT = "|".join(EVAL_SPLITS)
_GROUP_PREFIX = rf"({_SPLIT})\.{R_GROUP}\.{_ATTR}\.(?P<g>{_INDEX})\."
_GROUP_DERIVED = re.compile(rf"{_GROUP_PREFIX}({'|'.join(GROUP_METRICS)})")
_GROUP_RELEASE = re.compile(
    rf"{_GROUP_PREFIX}({R_HIST}\.(?P<b>{_INDEX})\.[01]|{R_BIN_OFFSET}\.(?P<o>{_INDEX})"
    rf"|{R_LOSS_SUM}|{R_BRIER_SUM})"
)
_GAP = re.compile(rf"({_SPLIT})\.{R_GAP}\.{_ATTR}\.({'|'.join(GAP_METRICS)})")


def group_prefix(split: str, attribute: str, g: int) -> str:
    """``<split>.group.<attribute>.<g>``: the start of every key of one group's numbers."""
    return f"{split}.{R_GROUP}.{attribute}.{g}"


def gap_key(split: str, attribute: str, metric: str) -> str:
    """``<split>.gap.<attribute>.<metric>``: the largest difference across the groups."""
    return f"{split}.{R_GAP}.{attribute}.{metric}"


def _group_key_match(pattern: re.Pattern[str], name: str) -> bool:
    match = pattern.fullmatch(name)
    if match is None:
        return False
    bins = [match.groupdict().get(k) for k in ("b", "o")]
    return int(match["g"]) <= MAX_GROUP_INDEX and all(
        b is None or int(b) < HIST_MAX_BINS for b in bins
    )


def is_group_release_metric(name: str) -> bool:
    """Whether ``name`` is one of a group's release sums (``test.group.sex.0.hist.3.1``)."""
    return _group_key_match(_GROUP_RELEASE, name)


def is_group_metric(name: str) -> bool:
    """Whether ``name`` is a per-group metric, its release sums or a gap across groups."""
    return (
        _group_key_match(_GROUP_DERIVED, name)
        or is_group_release_metric(name)
        or _GAP.fullmatch(name) is not None
    )


def is_release_metric(name: str) -> bool:
    """Whether ``name`` is one of an evaluation release's sums (not a derived metric), a
    split's, a group's or an explanation's."""
    return (
        name in RELEASE_METRICS
        or is_group_release_metric(name)
        or is_explain_metric(name)
        or is_curve_metric(name)
        or is_surv_hist_metric(name)
    )


def is_personal_metric(name: str) -> bool:
    """Whether ``name`` is a metric of a site's personalized model (``personal.test.auroc``)."""
    return name.startswith(PERSONAL_PREFIX)


def is_allowed_metric(name: str) -> bool:
    """Whether a site may send a metric called ``name`` (:data:`ALLOWED_REPLY_METRICS`, a
    per-group key of :func:`is_group_metric`, or an explanation release's sum)."""
    return (
        name in ALLOWED_REPLY_METRICS
        or is_group_metric(name)
        or is_explain_metric(name)
        or is_curve_metric(name)
        or is_surv_hist_metric(name)
    )


# Feature attributions (models/explain.py): the last evaluation of a run with
# ``explain = true`` carries one noisy sum per feature, ``explain.<j>`` (``j``: the feature's
# index in models.explain.task_features' order, below MAX_EXPLAIN_FEATURES) and the noisy
# patient count ``explain.n``. Release sums: never a site's own metric, only pooled.
EXPLAIN_PREFIX = "explain."
EXPLAIN_N = "explain.n"
#: The most features an explanation may name (a genomics panel's genes included).
MAX_EXPLAIN_FEATURES = 4096
_EXPLAIN = re.compile(r"explain\.(n|0|[1-9][0-9]{0,3})")


def explain_key(j: int) -> str:
    """``explain.<j>``: the release's noisy sum of feature ``j``'s clipped attributions."""
    return f"{EXPLAIN_PREFIX}{j}"


def is_explain_metric(name: str) -> bool:
    """Whether ``name`` is one of an explanation release's sums (or its count)."""
    match = _EXPLAIN.fullmatch(name)
    return match is not None and (
        match.group(1) == "n" or int(match.group(1)) < MAX_EXPLAIN_FEATURES
    )


# Survival curves (models/survival_curves.py): a survival task's last evaluation carries its
# test split's noisy life table and predicted survival, ``curve.at_risk.<k>`` and
# ``curve.events.<k>`` (patients at risk at the start of interval ``k`` and events in it, for
# the leading intervals the site released) and ``curve.predicted.<k>`` (the sum of the
# patients' predicted survival at cut ``k + 1``), ``k`` below MAX_CURVE_INTERVALS. Release
# sums: never a site's own metric, only pooled.
CURVE_PREFIX = "curve."
CURVE_AT_RISK = "at_risk"
CURVE_EVENTS = "events"
CURVE_PREDICTED = "predicted"
CURVE_PARTS = (CURVE_AT_RISK, CURVE_EVENTS, CURVE_PREDICTED)
#: The most cuts (intervals) a survival curve release may describe.
MAX_CURVE_INTERVALS = 64
_CURVE = re.compile(rf"curve\.({'|'.join(CURVE_PARTS)})\.(0|[1-9][0-9]?)")


def curve_key(part: str, k: int) -> str:
    """``curve.<part>.<k>``: one number of a survival curve release.

    >>> curve_key(CURVE_AT_RISK, 3), parse_curve_key("curve.at_risk.3")
    ('curve.at_risk.3', ('at_risk', 3))
    """
    return f"{CURVE_PREFIX}{part}.{k}"


def parse_curve_key(name: str) -> tuple[str, int] | None:
    """``(part, k)`` of a survival curve release's key, or None for any other name."""
    match = _CURVE.fullmatch(name)
    if match is None or int(match.group(2)) >= MAX_CURVE_INTERVALS:
        return None
    return match.group(1), int(match.group(2))


def is_curve_metric(name: str) -> bool:
    """Whether ``name`` is one of a survival curve release's numbers."""
    return parse_curve_key(name) is not None


# A survival task's evaluation histogram (models/survival_pooled.py): per released split, the
# (noisy) count of its patients in risk bin ``b`` (below HIST_MAX_BINS), time interval ``k``
# (0..K, K at most MAX_CURVE_INTERVALS) and event ``e`` (0 censored, 1 event),
# ``<split>.surv_hist.<b>.<k>.<e>``. Release sums: never a site's own metric; the server sums
# the sites' histograms into the global (pooled) C-index and time-dependent AUC.
R_SURV_HIST = "surv_hist"
_SURV_HIST = re.compile(
    rf"(?P<split>{_SPLIT})\.{R_SURV_HIST}\.(?P<b>0|[1-9][0-9]?)\.(?P<k>0|[1-9][0-9]?)\.(?P<e>[01])"
)


def surv_hist_key(split: str, b: int, k: int, e: int) -> str:
    """``<split>.surv_hist.<b>.<k>.<e>``: one cell of a survival evaluation's histogram.

    >>> surv_hist_key("test", 3, 0, 1), parse_surv_hist_key("test.surv_hist.3.0.1")
    ('test.surv_hist.3.0.1', ('test', 3, 0, 1))
    """
    return f"{split}.{R_SURV_HIST}.{b}.{k}.{e}"


def parse_surv_hist_key(name: str) -> tuple[str, int, int, int] | None:
    """``(split, b, k, e)`` of a survival histogram cell's key, or None for any other name
    (a bin at or above HIST_MAX_BINS or an interval above MAX_CURVE_INTERVALS included)."""
    match = _SURV_HIST.fullmatch(name)
    if match is None:
        return None
    b, k = int(match["b"]), int(match["k"])
    if b >= HIST_MAX_BINS or k > MAX_CURVE_INTERVALS:
        return None
    return match["split"], b, k, int(match["e"])


def is_surv_hist_metric(name: str) -> bool:
    """Whether ``name`` is one cell of a survival evaluation's histogram."""
    return parse_surv_hist_key(name) is not None


# Secure aggregation (common/secagg.py; server/secagg.py drives it, client/secagg.py
# answers). Stage 1 rides on the train message as a REC_SECAGG record; stages 2-4 are
# messages of type MT_SECAGG. Every value lives in the REC_SECAGG ConfigRecord.
MT_SECAGG = "query.secagg"
REC_SECAGG = "secagg"
SA_STAGE = "stage"
SA_ADVERTISE = "advertise"
SA_SHARE_KEYS = "share-keys"
SA_MASKED_INPUT = "masked-input"
SA_UNMASK = "unmask"
SA_ROUND = "round"
SA_THRESHOLD = "threshold"
SA_NODES = "nodes"  # node ids, in the order of every list beside them
SA_ENC_KEY = "enc-key"
SA_MASK_KEY = "mask-key"
SA_COMMITMENT = "seed-commitment"
SA_SIGNATURE = "signature"  # the site key's Ed25519 signature of its advertised keys
SA_SITE_KEY = "site-key"  # the site key's public half (its audit key)
SA_BOXES = "boxes"  # AES-GCM ciphertexts of shares, one per node of SA_NODES
SA_WEIGHT = "weight"
SA_SURVIVORS = "survivors"
SA_DROPPED = "dropped"
SA_KINDS = "kinds"
SA_SHARES = "shares"
SA_MASKED = "masked"


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
