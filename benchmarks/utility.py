"""What the models are worth: test utility of federated, local and pooled training under DP.

For each dataset, seed and ε this trains and evaluates

* ``local_only``: every site alone under the federation's DP budget
  (:func:`fedcare.simulations.baselines.local_only`, called as :mod:`fedcare.simulations.runner`
  calls it);
* ``fedavg`` and ``fedadam``: the federation with that strategy;
* a personalized federation (default ``ditto``; ``finetune`` and ``fedper`` too): FedAvg
  with ``personalization`` set, reporting the global model and every site's personal model;
* ``pooled``: one non-private model on every site's training patients
  (:func:`fedcare.simulations.baselines.pooled`; it does not depend on ε, so it runs once per seed);

on two sets of four hospitals:

* ``synthetic``: :func:`fedcare.simulations.synth.synthesize` (seed 0, default generator), task
  ``readmission`` (EHR only). The cohort is drawn once; a seed re-splits it;
* ``heart_disease``: the real UCI Heart Disease hospitals (Cleveland, Hungary, Switzerland,
  VA Long Beach) from :mod:`fedcare.simulations.realdata`, task ``heart_disease``.

A **seed** sets every site's ``[split] seed`` (and ``[simulation] noise_seed``) and the run
config's ``seed`` (the initial model; the baselines' initialisation and shuffling). ε is the
run config's ``target-epsilon``; ``inf`` means ``dp = false``. Everything else is the run
config's default (the DP recipe of :mod:`fedcare.client.recipe`: 10 rounds of one local epoch of
SGD); ``--rounds`` overrides the number of rounds.

**How a federation runs.** Not in Flower's simulation engine (Ray's start-up would cost more
than the training of these small models): the real ServerApp logic,
:func:`fedcare.server.app.run_federation`, drives an in-process grid (:class:`InProcessGrid`) that
answers every message with the real ClientApp handlers (:func:`fedcare.client.app.handle_train`,
:func:`fedcare.client.app.handle_evaluate`), one site after another, each with its own Flower
``Context`` (node config ``partition-id``) and under its own node id, as a SuperNode would.
Each run has its own run directory and state root, so every site starts from an empty
ledger. The simulated sites evaluate exactly (their ``site.toml`` opts in), so the metrics
are those of the models, not of a DP release.

One shortcut changes no number, only the time: each site is loaded from disk once per seed
instead of once per message (:func:`fedcare.client.app.load_site` answered from a cache, as a warm
site worker does). The accountant already computes each history's ε once per process
(:mod:`fedcare.client.accounting`).

**What is measured.** The **global** metrics are pooled over the sites' test patients: every
test patient scored by the model that serves their site (the global model of a federation,
the site's own model for local-only and for personal models), with one decision threshold
chosen on the pooled validation patients (Youden, as :func:`fedcare.models.metrics.split_metrics`
does), from the exact per-patient predictions the sites' evaluation made (recorded by a
wrapper that only observes). The server's own global metrics (pooled from the sites'
binned releases) are kept beside them in the JSON as a check. **Per site**, the test AUROC
of local-only, each federation's global model and the personal models. A metric a split
cannot define (a test split with one class) is left out of its mean; the table then says
from how many seeds the mean is.

Run from the repository root (``-m`` puts it first on ``sys.path``; opacus ships a top-level
package also named ``benchmarks``)::

    .venv/bin/python -m benchmarks.utility                       # both datasets, 5 seeds
    .venv/bin/python -m benchmarks.utility --datasets heart_disease --seeds 3
    .venv/bin/python -m benchmarks.utility --quick               # 1 seed, ε 8, 3 rounds

Progress goes to stderr, one line per run. The markdown tables go to stdout at the end, and
every run's numbers to ``--out`` (default ``benchmarks/results/utility.json``), rewritten
atomically after each run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tomli_w
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fedcare.client.app as client_app
from fedcare.client.data.loaders import load_site
from fedcare.client.data.site import SiteData
from fedcare.client.local import SiteTrainer, settings_from_run
from fedcare.client.policy import simulated_site_policy
from fedcare.common.federation import FederationConfig
from fedcare.common.files import atomic_file
from fedcare.common.spec import SPEC_FILENAME, SimulationSpec, load_site_spec
from fedcare.models.metrics import auroc, split_metrics
from fedcare.server.app import run_federation
from fedcare.simulations.baselines import local_only, pooled
from fedcare.simulations.realdata import dataset as real_dataset
from fedcare.simulations.realdata import write_real_sites
from fedcare.simulations.synth import SynthConfig, synthesize

__all__ = [
    "DATASETS",
    "METHODS",
    "Dataset",
    "Method",
    "InProcessGrid",
    "PredictionLog",
    "RunResult",
    "sites_loaded_once",
    "run_method",
    "summarize",
    "render_markdown",
    "main",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "utility.json"
EPSILONS = (1.0, 4.0, 8.0, math.inf)
METRICS = ("test.auroc", "test.accuracy", "test.balanced_accuracy")
SYNTH_SEED = 0
"""The synthetic cohort (a seed re-splits it, it does not redraw it)."""
SERVER_NODE_ID = 1
"""The node id the server's messages carry (Flower's SuperLink node id)."""
_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Dataset:
    """Four hospitals as site folders, and the task to learn on them."""

    name: str
    task: str
    write: Callable[[Path, int], list[Path]]
    """``write(folder, seed)``: the site folders for ``seed`` (split and noise seed)."""


def _write_heart_disease(out: Path, seed: int) -> list[Path]:
    return write_real_sites(real_dataset("heart_disease"), out, seed=seed, force=True)


def _resplit(folder: Path, seed: int) -> None:
    """Give a site its ``seed``-th split (and DP noise seed), leaving its data as it is."""
    spec = load_site_spec(folder)
    simulation = spec.simulation or SimulationSpec(exact_evaluation=True)
    spec = spec.model_copy(
        update={
            "split": spec.split.model_copy(update={"seed": seed}),
            "simulation": simulation.model_copy(update={"noise_seed": seed}),
        }
    )
    dumped = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    (folder / SPEC_FILENAME).write_bytes(tomli_w.dumps(dumped).encode("utf-8"))
    load_site_spec(folder)  # still a valid site.toml


def _write_synthetic(out: Path, seed: int) -> list[Path]:
    if not (out / "site-0" / SPEC_FILENAME).is_file():
        synthesize(out, n_sites=4, seed=SYNTH_SEED, config=SynthConfig(), force=True)
    folders = sorted(p for p in out.iterdir() if (p / SPEC_FILENAME).is_file())
    for folder in folders:
        _resplit(folder, seed)
    return folders


DATASETS: dict[str, Dataset] = {
    "synthetic": Dataset("synthetic", "readmission", _write_synthetic),
    "heart_disease": Dataset("heart_disease", "heart_disease", _write_heart_disease),
}


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One way to train: a federation (run-config overrides), or a baseline."""

    name: str
    kind: Literal["federated", "local_only", "pooled"]
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def personalization(self) -> str:
        return str(self.overrides.get("personalization", "none"))


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("local_only", "local_only"),
        Method("fedavg", "federated", {"strategy": "fedavg"}),
        Method("fedadam", "federated", {"strategy": "fedadam"}),
        Method("fedadam_lr0.1", "federated", {"strategy": "fedadam", "server-learning-rate": 0.1}),
        Method("ditto", "federated", {"strategy": "fedavg", "personalization": "ditto"}),
        Method("finetune", "federated", {"strategy": "fedavg", "personalization": "finetune"}),
        Method("fedper", "federated", {"strategy": "fedavg", "personalization": "fedper"}),
        Method("pooled", "pooled"),
    )
}
DEFAULT_METHODS = ("local_only", "fedavg", "fedadam", "ditto", "pooled")


# --------------------------------------------------------------------------- in-process Flower


@contextlib.contextmanager
def _server_identity(run_id: int) -> Iterator[None]:
    """Play the server's task identity (Flower stamps every new message with it); give
    back whatever identity was there before."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SERVER_NODE_ID, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class InProcessGrid:
    """Just enough of a Flower grid: every message answered at once by the real ClientApp
    handlers, site after site, each site with its own ``Context`` and node id.

    ``pull_interval`` marks it, for :func:`fedcare.server.grid.prompt`, as a grid that needs no
    polling wrapper (as Flower's in-memory grid).
    """

    pull_interval = 0.0

    def __init__(self, cfg: FederationConfig, *, n_sites: int, run_id: int) -> None:
        run_config = cfg.to_run_config()
        self.contexts = {
            100 + pid: Context(
                run_id=run_id,
                node_id=100 + pid,
                node_config={"partition-id": pid, "num-partitions": n_sites},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for pid in range(n_sites)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            kind = message.metadata.message_type.split(".", 1)[0]
            handler = {"train": client_app.handle_train, "evaluate": client_app.handle_evaluate}
            saved = TaskIdentity._node_id
            TaskIdentity.node_id = node  # the site's side, for its reply
            try:
                replies.append(handler[kind](message, self.contexts[node]))
            finally:
                TaskIdentity._node_id = saved
        return replies


# --------------------------------------------------------------------------- shortcuts


@contextlib.contextmanager
def sites_loaded_once() -> Iterator[Callable[[Path], SiteData]]:
    """Answer the ClientApp's per-message ``load_site`` from a cache while the block runs
    (as a warm site worker keeps its site); yields the caching loader for the baselines."""
    original = client_app.load_site
    cache: dict[Path, SiteData] = {}

    def load(folder: Path | str) -> SiteData:
        key = Path(folder).resolve()
        if key not in cache:
            cache[key] = load_site(key)
        return cache[key]

    client_app.load_site = load  # type: ignore[assignment]
    try:
        yield load
    finally:
        client_app.load_site = original  # type: ignore[assignment]


Predictions = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


class PredictionLog:
    """The last per-patient predictions of each site's models, as its evaluation made them.

    Within one :meth:`SiteTrainer.evaluate_round` (or :meth:`SiteTrainer.evaluate`) the
    first predictions are of the model the server sent (``"global"``), any later ones of the
    site's personal model (``"personal"``). :meth:`recording` only observes: the wrapped
    methods return what they returned before.
    """

    def __init__(self) -> None:
        self.models: dict[str, dict[str, Predictions]] = {"global": {}, "personal": {}}
        self.models["served"] = {}

    @contextlib.contextmanager
    def recording(self) -> Iterator[PredictionLog]:
        evaluate_round = SiteTrainer.evaluate_round
        evaluate = SiteTrainer.evaluate
        predictions = SiteTrainer._predictions
        calls: dict[int, int] = {}  # trainer -> predictions made in its current evaluation

        def counted(method: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(method)
            def wrapper(trainer: SiteTrainer, *args: Any, **kwargs: Any) -> Any:
                calls[id(trainer)] = 0
                try:
                    return method(trainer, *args, **kwargs)
                finally:
                    calls.pop(id(trainer), None)

            return wrapper

        @functools.wraps(predictions)
        def recorded(trainer: SiteTrainer, *args: Any, **kwargs: Any) -> Predictions:
            ys, ps = predictions(trainer, *args, **kwargs)
            made = calls.get(id(trainer), 0)
            calls[id(trainer)] = made + 1
            role = "global" if made == 0 else "personal"
            self.models[role][trainer.site_id] = (
                {k: np.array(v) for k, v in ys.items()},
                {k: np.array(v) for k, v in ps.items()},
            )
            return ys, ps

        SiteTrainer.evaluate_round = counted(evaluate_round)  # type: ignore[method-assign]
        SiteTrainer.evaluate = counted(evaluate)  # type: ignore[method-assign]
        SiteTrainer._predictions = recorded  # type: ignore[method-assign,assignment]
        try:
            yield self
        finally:
            SiteTrainer.evaluate_round = evaluate_round  # type: ignore[method-assign]
            SiteTrainer.evaluate = evaluate  # type: ignore[method-assign]
            SiteTrainer._predictions = predictions  # type: ignore[method-assign]

    def serve(self, record: Mapping[str, Any]) -> None:
        """The model each site of a personalized run serves (role ``"served"``): its personal
        model where its last evaluation reported ``own = 1`` (its validation patients found
        it at least as good as the global one), else the global model."""
        if not self.models["personal"]:
            return
        served = {}
        for site_id, global_predictions in self.models["global"].items():
            site = record.get("sites", {}).get(site_id, {})
            own = (site.get("personal_metrics") or {}).get("own") == 1.0
            mine = self.models["personal"].get(site_id)
            served[site_id] = mine if own and mine is not None else global_predictions
        self.models["served"] = served

    def pooled_metrics(self, role: str) -> dict[str, float]:
        """Metrics of ``role``'s models over every site's patients (one threshold, chosen
        on the pooled validation patients)."""
        sites = self.models[role]
        if not sites:
            return {}
        splits = ("val", "test")
        ys = {s: np.concatenate([sites[k][0][s] for k in sorted(sites)]) for s in splits}
        ps = {s: np.concatenate([sites[k][1][s] for k in sorted(sites)]) for s in splits}
        return split_metrics(ys, ps)

    def site_counts(self) -> dict[str, list[int]]:
        """Each site's test patients and, of them, positives: ``[n, n_positive]``."""
        return {
            site_id: [int(ys["test"].size), int(ys["test"].sum())]
            for site_id, (ys, _) in sorted(self.models["global"].items())
        }

    def site_auroc(self, role: str) -> dict[str, float]:
        """Each site's test AUROC (sites whose test split has one class left out)."""
        out = {}
        for site_id, (ys, ps) in sorted(self.models[role].items()):
            y = ys["test"]
            if y.size and 0 < int(y.sum()) < y.size:
                out[site_id] = auroc(y, ps["test"])
        return out


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """One method on one dataset, seed and ε.

    ``metrics``: model role (``"global"``, and ``"personal"`` for a personalized run) ->
    pooled test metrics. ``sites``: role -> site id -> test AUROC. ``server_global``: the
    server's own global metrics of the last round (federations only). ``events``: the run
    record's events by kind (``rejected``, ``round-skipped``, ...): how many, and the first
    one's round, site and detail. ``site_test``: site id -> ``[test patients, positives]``.
    """

    dataset: str
    seed: int
    epsilon: float | None  # None: the method does not depend on ε (pooled)
    method: str
    seconds: float
    metrics: dict[str, dict[str, float]]
    sites: dict[str, dict[str, float]]
    server_global: dict[str, float] = field(default_factory=dict)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    rounds_completed: int | None = None
    site_test: dict[str, list[int]] = field(default_factory=dict)


def _run_config(
    dataset: Dataset, folders: Sequence[Path], *, seed: int, epsilon: float, rounds: int | None
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "task": dataset.task,
        "data-root": str(folders[0].parent),
        "seed": seed,
        "num-sites": len(folders),
        "min-sites": len(folders),
        "connect-timeout": 5,
    }
    if math.isinf(epsilon):
        config["dp"] = False
    else:
        config["target-epsilon"] = epsilon
    if rounds is not None:
        config["num-server-rounds"] = rounds
    return config


def _event_counts(events: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for event in events:
        kind = str(event.get("kind"))
        if kind not in out:
            first = {k: event.get(k) for k in ("round", "site_id", "detail")}
            out[kind] = {"count": 0, "first": first}
        out[kind]["count"] += 1
    return out


def _slim(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.startswith("test.")}


def run_method(
    method: Method,
    dataset: Dataset,
    folders: Sequence[Path],
    sites: Sequence[SiteData],
    *,
    seed: int,
    epsilon: float,
    rounds: int | None,
    work: Path,
    flower_run_id: int = 1,
) -> RunResult:
    """Train and evaluate ``method`` once; ``work`` is an empty folder for its files."""
    base = _run_config(dataset, folders, seed=seed, epsilon=epsilon, rounds=rounds)
    t0 = time.perf_counter()
    log = PredictionLog()
    pooled_metrics: dict[str, float] = {}
    with log.recording():
        if method.kind == "federated":
            tag = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
            cfg = FederationConfig.from_run_config(
                {
                    **base,
                    **method.overrides,
                    "run-id": f"utility-{dataset.name}-s{seed}-e{tag}-{method.name}",
                    "run-dir": str(work / "run"),
                    "state-root": str(work / "state"),
                }
            )
            grid = InProcessGrid(cfg, n_sites=len(folders), run_id=flower_run_id)
            with _server_identity(flower_run_id):
                # The record in its JSON form, as server_record.json holds it.
                record = run_federation(grid, cfg).to_dict()  # type: ignore[arg-type]
            last = max(record["rounds"], key=lambda e: e["round"]) if record["rounds"] else {}
            server_global = _slim(last.get("metrics", {}))
            events = _event_counts(record["events"])
            completed = int(record["rounds_completed"])
            log.serve(record)
        else:
            cfg = FederationConfig.from_run_config(base)
            train, dp = settings_from_run(cfg, proximal_mu=0.0)  # as simulations/runner.py
            if method.kind == "local_only":
                local_only(
                    sites,
                    task=cfg.task,
                    train=train,
                    dp=dp,
                    rounds=cfg.num_server_rounds,
                    seed=cfg.seed,
                    ledger_dir=work / "baseline-ledgers",
                    policy=simulated_site_policy(cfg),
                )
            elif method.kind == "pooled":
                pooled_metrics = pooled(
                    sites,
                    task=cfg.task,
                    train=train,
                    rounds=cfg.num_server_rounds,
                    seed=cfg.seed,
                    max_grad_norm=cfg.max_grad_norm,
                )
            else:
                raise ValueError(f"unknown method kind {method.kind!r}")
            server_global, events, completed = {}, {}, None
    seconds = time.perf_counter() - t0
    if method.kind == "pooled":
        metrics = {"global": _slim(pooled_metrics)}
        site_values: dict[str, dict[str, float]] = {}
    else:
        roles = ("global", "personal", "served") if log.models["personal"] else ("global",)
        metrics = {role: _slim(log.pooled_metrics(role)) for role in roles}
        site_values = {role: log.site_auroc(role) for role in roles}
    return RunResult(
        dataset=dataset.name,
        seed=seed,
        epsilon=None if method.kind == "pooled" else epsilon,
        method=method.name,
        seconds=round(seconds, 2),
        metrics=metrics,
        sites=site_values,
        server_global=server_global,
        events=events,
        rounds_completed=completed,
        site_test=log.site_counts(),
    )


# --------------------------------------------------------------------------- summary


def _mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: Sequence[float], seeds: int) -> str:
    if not values:
        return "n/a"
    mean, sd = _mean_sd(values)
    text = f"{mean:.3f}" if sd is None else f"{mean:.3f} ± {sd:.3f}"
    return text if len(values) == seeds else f"{text} (n={len(values)})"


def _eps_label(epsilon: float | None) -> str:
    if epsilon is None:
        return "—"
    return "∞ (no DP)" if math.isinf(epsilon) else f"{epsilon:g}"


def _rows(results: Sequence[RunResult]) -> list[tuple[str, float | None, str, str]]:
    """(method, ε, role, label) in table order: by ε, then method, pooled last."""
    seen: dict[tuple[str, float | None, str], None] = {}
    for r in results:
        for role in r.metrics:
            seen[(r.method, r.epsilon, role)] = None
    order = {name: i for i, name in enumerate(METHODS)}

    def key(row: tuple[str, float | None, str]) -> tuple[float, int, int]:
        method, eps, role = row
        return (math.inf if eps is None else eps, order.get(method, 99), role != "global")

    out = []
    for method, eps, role in sorted(seen, key=key):
        label = method
        if METHODS[method].personalization != "none":
            label = f"{method} ({_ROLE_LABELS[role]})"
        elif method == "pooled":
            label = "pooled (non-private)"
        out.append((method, eps, role, label))
    return out


_ROLE_LABELS = {
    "global": "global model",
    "personal": "personal models",
    "served": "served: personal where validation prefers it",
}


def summarize(results: Sequence[RunResult]) -> dict[str, Any]:
    """Mean, sd and count over seeds of every pooled metric and per-site AUROC."""
    out: dict[str, Any] = {}
    for name in sorted({r.dataset for r in results}):
        runs = [r for r in results if r.dataset == name]
        rows = []
        for method, eps, role, label in _rows(runs):
            group = [r for r in runs if r.method == method and r.epsilon == eps]
            row: dict[str, Any] = {"method": method, "epsilon": eps, "role": role, "label": label}
            for metric in METRICS:
                values = [r.metrics[role][metric] for r in group if metric in r.metrics[role]]
                row[metric] = _stats(values)
            sites = sorted({s for r in group for s in r.sites.get(role, {})})
            row["sites"] = {
                s: _stats([r.sites[role][s] for r in group if s in r.sites.get(role, {})])
                for s in sites
            }
            row["seeds"] = len(group)
            row["seconds_mean"] = round(statistics.fmean(r.seconds for r in group), 1)
            rows.append(row)
        out[name] = {"rows": rows, "site_test": _mean_counts(runs)}
    return out


def _mean_counts(runs: Sequence[RunResult]) -> dict[str, dict[str, float]]:
    """Per site, the mean over seeds of its test patients and of their negatives."""
    by_seed: dict[int, dict[str, list[int]]] = {}
    for r in runs:
        if r.site_test:
            by_seed.setdefault(r.seed, r.site_test)
    sites = sorted({s for counts in by_seed.values() for s in counts})
    out = {}
    for site in sites:
        pairs = [c[site] for c in by_seed.values() if site in c]
        out[site] = {
            "test": statistics.fmean(n for n, _ in pairs),
            "negatives": statistics.fmean(n - pos for n, pos in pairs),
        }
    return out


def _stats(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    mean, sd = _mean_sd(values)
    return {"mean": mean, "sd": sd, "n": len(values), "values": list(values)}


def _fmt(stats: Mapping[str, Any], seeds: int) -> str:
    return _cell(stats.get("values", []), seeds)


def render_markdown(summary: Mapping[str, Any], header: str) -> str:
    """The global and per-site tables of :func:`summarize`, one section per dataset."""
    lines = [header, ""]
    for name, section in summary.items():
        rows, counts = section["rows"], section["site_test"]
        task = DATASETS[name].task if name in DATASETS else "?"
        lines += [
            f"### {name} (task `{task}`): pooled test metrics, mean ± sd over seeds",
            "",
            "| ε | method | test AUROC | accuracy | balanced accuracy | s/run |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for row in rows:
            metric_cells = " | ".join(_fmt(row[m], row["seeds"]) for m in METRICS)
            lines.append(
                f"| {_eps_label(row['epsilon'])} | {row['label']} | {metric_cells} | "
                f"{row['seconds_mean']:.0f} |"
            )
        per_site = [r for r in rows if r["sites"]]
        if per_site:
            columns = list(dict.fromkeys(r["label"] for r in per_site))
            sites = sorted({s for r in per_site for s in r["sites"]})
            lines += [
                "",
                f"Per-site test AUROC ({name}), mean ± sd over seeds:",
                "",
                "| ε | site (test patients, negatives) | " + " | ".join(columns) + " |",
                "|---|---|" + "---:|" * len(columns),
            ]
            for eps in dict.fromkeys(r["epsilon"] for r in per_site):
                for site in sites:
                    cells: list[str] = []
                    for label in columns:
                        row = next(
                            (r for r in per_site if r["label"] == label and r["epsilon"] == eps),
                            None,
                        )
                        stats = (row or {}).get("sites", {}).get(site, {})
                        cells.append(_fmt(stats, row["seeds"]) if row else "")
                    c = counts.get(site)
                    where = f"{site} ({c['test']:.0f}, {c['negatives']:.1f})" if c else site
                    lines.append(f"| {_eps_label(eps)} | {where} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- CLI


def _atomic_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, mode=0o644) as f:  # a result to share, not a private 0600 file
        f.write((json.dumps(payload, indent=1, default=str) + "\n").encode("utf-8"))


def _parse_list(text: str, known: Iterable[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in known]
    if not items or unknown:
        raise ValueError(f"--{what}: unknown {unknown or 'empty list'}; use {', '.join(known)}")
    return items


def _parse_epsilons(text: str) -> list[float]:
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        value = float(item)
        if not (value > 0):
            raise ValueError(f"--epsilons: {item} is not > 0 (inf means no DP)")
        out.append(value)
    if not out:
        raise ValueError("--epsilons: give at least one ε, e.g. 1,4,8,inf")
    return out


def _machine() -> dict[str, Any]:
    from benchmarks.scale import machine_info

    info = machine_info()
    info["torch_threads"] = torch.get_num_threads()
    return info


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.utility",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
    )
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma list")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 5)")
    parser.add_argument(
        "--epsilons", default=None, help="comma list; inf = no DP (default 1,4,8,inf)"
    )
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma list of {', '.join(METHODS)}",
    )
    parser.add_argument("--rounds", type=int, default=None, help="default: the run config's")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON")
    parser.add_argument("--work", type=Path, default=None, help="keep site and run folders here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, ε 8, 3 rounds (unless given explicitly)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        datasets = _parse_list(args.datasets, DATASETS, "datasets")
        methods = _parse_list(args.methods, METHODS, "methods")
        seeds = args.seeds if args.seeds is not None else (1 if args.quick else 5)
        epsilons = _parse_epsilons(args.epsilons or ("8" if args.quick else "1,4,8,inf"))
        rounds = args.rounds if args.rounds is not None else (3 if args.quick else None)
        if seeds < 1 or (rounds is not None and rounds < 1) or args.threads < 1:
            raise ValueError("--seeds, --rounds and --threads must be >= 1")
    except ValueError as e:
        print(f"benchmarks.utility: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("flwr", "server", "client"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Opacus warns on every make_private (secure RNG off, ghost clipping's backward hooks);
    # both are expected here and would bury the progress lines.
    warnings.filterwarnings(
        "ignore",
        message=r"(Secure RNG turned off|Full backward hook is firing|Using a non-full backward)",
        category=UserWarning,
    )
    # Opacus's RDP bound inside the PRV accountant's domain search, at the largest noise.
    warnings.filterwarnings("ignore", message=r"Optimal order is the largest alpha")
    machine = _machine()
    command = "python -m benchmarks.utility " + " ".join(argv if argv is not None else sys.argv[1:])
    plan = {
        "datasets": datasets,
        "seeds": list(range(seeds)),
        "epsilons": [str(e) for e in epsilons],
        "methods": methods,
        "rounds": rounds or FederationConfig().num_server_rounds,
    }
    results: list[RunResult] = []
    t_start = time.monotonic()

    def save() -> None:
        _atomic_json(
            args.out,
            {
                "command": command,
                "plan": plan,
                "machine": machine | {"loadavg_now": [round(x, 2) for x in os.getloadavg()]},
                "wall_s": round(time.monotonic() - t_start, 1),
                "summary": summarize(results),
                "runs": [asdict(r) for r in results],
            },
        )

    flower_run = 0
    with tempfile.TemporaryDirectory(prefix="fedcare-utility-") as tmp:
        work = args.work or Path(tmp)
        for name in datasets:
            dataset = DATASETS[name]
            for seed in range(seeds):
                seed_dir = work / name / f"seed-{seed}"
                folders = dataset.write(work / name / "sites", seed)
                with sites_loaded_once() as load:
                    sites = [load(f) for f in folders]
                    todo = [(None, m) for m in methods if METHODS[m].kind == "pooled"] + [
                        (e, m) for e in epsilons for m in methods if METHODS[m].kind != "pooled"
                    ]
                    for eps, m in todo:
                        flower_run += 1
                        run_eps = math.inf if eps is None else eps
                        where = seed_dir / f"{_eps_label(eps).split()[0]}-{m}"
                        result = run_method(
                            METHODS[m],
                            dataset,
                            folders,
                            sites,
                            seed=seed,
                            epsilon=run_eps,
                            rounds=rounds,
                            work=where,
                            flower_run_id=flower_run,
                        )
                        results.append(result)
                        save()
                        _progress(result, time.monotonic() - t_start)
    save()
    summary = summarize(results)
    wall = time.monotonic() - t_start
    header = (
        f"Command: `{command.strip()}`; {seeds} seed(s), rounds {plan['rounds']}; wall "
        f"{wall / 60:.1f} min on {machine['available_cpus']} CPUs (load average "
        f"{machine['loadavg_start'][0]} at start, {os.getloadavg()[0]:.2f} at end), torch "
        f"{machine['torch']}, opacus {machine['opacus']}, {machine['date']}."
    )
    print(render_markdown(summary, header))
    print(f"results: {args.out}", file=sys.stderr)
    return 0


def _progress(r: RunResult, elapsed: float) -> None:
    parts = []
    for role, values in r.metrics.items():
        if "test.auroc" in values:
            tag = "" if role == "global" else f" {role}"
            parts.append(f"AUROC{tag} {values['test.auroc']:.3f}")
    kinds = ", ".join(f"{n['count']} {kind}" for kind, n in sorted(r.events.items()))
    note = f", events: {kinds}" if kinds else ""
    print(
        f"[utility] {r.dataset} seed {r.seed} ε={_eps_label(r.epsilon)} {r.method}: "
        f"{', '.join(parts) or 'no AUROC'}{note}; {r.seconds:.1f} s "
        f"(elapsed {elapsed / 60:.1f} min)",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
