"""Survival utility: the federated DP model's C-index against the pooled non-private model.

For each real time-to-event dataset of :mod:`fedcare.simulations.realdata.survival` (GBSG2,
WHAS500, GSE7390, split into hospitals and written as site folders), each seed and ε this
trains

* ``fedavg``: the federation, DP-SGD at every site with the run's ``target-epsilon``, the
  real ServerApp logic (:func:`fedcare.server.app.run_federation`) driving the real ClientApp
  handlers in this process (:class:`benchmarks.utility.InProcessGrid`, as
  :mod:`benchmarks.utility` runs it), with the discrete-time hazard model
  (:mod:`fedcare.models.survival`) over the dataset's model (the ``model`` of its run
  config: GSE7390's linear risk score ``genomics_linear``) or else the default model of the
  task's modality;
* ``pooled``: one non-private model of the same architecture on every site's training
  patients (:func:`fedcare.simulations.baselines.pooled`), trained for as many epochs;
* ``reference``: where the federation trains another model than the task's default (e.g.
  the 77-parameter linear risk score ``genomics_linear`` on GSE7390), also the pooled
  non-private model of the default architecture, so a smaller federated model is held to the
  better of the two pooled references.

**What is measured**: Harrell's C-index (:func:`fedcare.models.survival_metrics.
concordance_index`, checked against scikit-survival by the tests) of each model on the union
of the sites' test patients; the federation's per-patient predictions are the ones its final
evaluation made (recorded by :class:`benchmarks.utility.PredictionLog`, which only observes),
the pooled model's are computed here on the same patients. The sites evaluate exactly (their
``site.toml`` opts in), so the number is the model's, not a DP release's. The goal (issue 16):
the federated DP C-index within 0.03 of the pooled one at ε 8, mean over 5 seeds.

A test split of GSE7390 holds about 30 patients and 6 events, so one seed's C-index is
uncertain by about ±0.15. The table therefore also gives the paired gap's 95% t-interval
over the seeds, and the C-index over every seed's test predictions together (each seed's
model scores its own test patients; with 20 seeds 638 predictions and 168 events) with
a 95% bootstrap interval over those predictions.

A **seed** sets every site's split and noise seed and the run's ``seed`` (initial model).

Run from the repository root::

    .venv/bin/python -m benchmarks.survival                    # 3 datasets, 5 seeds, ε 8
    .venv/bin/python -m benchmarks.survival --datasets gbsg2 --seeds 1 --rounds 3
    .venv/bin/python -m benchmarks.survival --datasets gse7390 --seeds 20
    .venv/bin/python -m benchmarks.survival --datasets gse7390 --seeds 20 --recipe

(the genomics MLP at full batch: ``--model genomics_mlp --set learning-rate=3.0 --set
num-server-rounds=5``; the linear score at the run-config defaults: ``--model
genomics_linear --recipe``).

**Settings**: the task's default model and the run-config defaults (the recipe of
``client/recipe.py``), except where a dataset names its own (:attr:`~fedcare.simulations.
realdata.survival.SurvivalDataset.run_config`): GSE7390's two small hospitals train the
linear risk score ``genomics_linear`` by full-batch DP gradient descent (``batch-size``
above every site's train split, so each step is the whole split at Poisson rate 1; 10
rounds at learning rate 1). The dataset's model is the pooled model's architecture too.
``--model`` names another model, ``--set KEY=VALUE`` changes any other run-config key of
the federation (``batch-size=full``: the largest site's train split), ``--recipe`` drops the
dataset's settings and model; none of them ever changes how the pooled references train
(the non-private recipe for ``--rounds`` epochs).

The markdown table goes to stdout; every run's numbers to ``--out`` (default
``benchmarks/results/survival.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch.utils.data import ConcatDataset, DataLoader

from benchmarks.utility import InProcessGrid, PredictionLog, _server_identity, sites_loaded_once
from fedcare.client.local import SiteTrainer, settings_from_run
from fedcare.client.policy import SitePolicy
from fedcare.client.training import fit, make_optimizer, predict, resolve_device
from fedcare.common.errors import ConfigError
from fedcare.common.federation import FederationConfig
from fedcare.common.files import write_private_atomic
from fedcare.models import build_model, default_model_for
from fedcare.models.survival import event_probability
from fedcare.models.survival_metrics import concordance_index
from fedcare.server.app import run_federation
from fedcare.simulations.realdata import MANIFEST_FILENAME, write_real_sites
from fedcare.simulations.realdata import dataset as real_dataset

__all__ = [
    "DATASETS",
    "dataset_model",
    "dataset_run_config",
    "parse_overrides",
    "run_configs",
    "run_seed",
    "summarize",
    "main",
]

DATASETS = ("gbsg2", "whas500", "gse7390")
GOAL = 0.03
BOOTSTRAP = 1000
"""Resamples of the bootstrap interval of the C-index over every seed's test predictions."""


def _c_index(y: np.ndarray, hazards: np.ndarray) -> float:
    return concordance_index(y[:, 1], y[:, 0], event_probability(hazards))


RESERVED = frozenset(
    {
        "task",
        "model",
        "data-root",
        "seed",
        "num-sites",
        "min-sites",
        "connect-timeout",
        "dp",
        "target-epsilon",
        "run-id",
        "run-dir",
        "state-root",
    }
)
"""Run-config keys the benchmark sets itself (``--model``, ``--epsilon``, ``--seeds``...):
``--set`` refuses them. (``num-server-rounds`` may be set: the federation's rounds, while
``--rounds`` stays the pooled models' epochs.)"""

FULL_BATCH = "full"
"""``--set batch-size=full``: each site's whole training split in every step (Poisson rate
1), i.e. the largest site's train size as the run's batch size."""


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` run-config overrides (``--set``), VALUE read as an int, a float,
    ``true``/``false`` or else text; which keys exist and what they may hold is
    :class:`~fedcare.common.federation.FederationConfig`'s to check.

    Examples
    --------
    >>> parse_overrides(["batch-size=full", "learning-rate=1.5", "local-epochs=2"])
    {'batch-size': 'full', 'learning-rate': 1.5, 'local-epochs': 2}
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key or not text:
            raise ConfigError(f"--set {pair!r}: give KEY=VALUE, e.g. --set learning-rate=1.0")
        if key in RESERVED:
            raise ConfigError(
                f"--set {key}: the benchmark sets {key!r} itself; use its own option "
                "(--model, --epsilon, --seeds)"
            )
        value: Any
        if text in ("true", "false"):
            value = text == "true"
        else:
            try:
                value = int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    value = text
        if key == "batch-size" and isinstance(value, str) and value != FULL_BATCH:
            raise ConfigError(
                f"--set batch-size={text}: give a whole number or {FULL_BATCH!r} (each "
                "site's whole training split per step)"
            )
        out[key] = value
    return out


def dataset_run_config(name: str) -> dict[str, Any]:
    """The run-config settings dataset ``name``'s federation trains with (its ``run_config``
    but ``model``: GSE7390's full-batch DP gradient descent), applied under ``--set`` unless
    ``--recipe``."""
    settings = getattr(real_dataset(name), "run_config", {})
    return {k: v for k, v in settings.items() if k != "model"}


def dataset_model(name: str) -> str:
    """The model dataset ``name``'s run config names (GSE7390: ``genomics_linear``), or
    ``""`` for the task's default: the federation's and the pooled model's architecture
    unless ``--model`` or ``--recipe``."""
    return str(getattr(real_dataset(name), "run_config", {}).get("model", ""))


def _train_sizes(root: Path) -> list[int]:
    """Each written site's training-split size (``realdata.json``: what the writer split)."""
    manifest = json.loads((root / MANIFEST_FILENAME).read_text(encoding="utf-8"))
    return [int(s["split"]["train"]) for s in manifest["sites"]]


def _run_config(
    name: str,
    root: Path,
    n_sites: int,
    *,
    seed: int,
    epsilon: float,
    rounds: int,
    model: str = "",
    overrides: dict[str, Any] | None = None,
):
    dataset = real_dataset(name)
    config: dict[str, Any] = {
        "task": dataset.task,
        "model": model,
        "data-root": str(root),
        "seed": seed,
        "num-sites": n_sites,
        "min-sites": n_sites,
        "connect-timeout": 5,
        "num-server-rounds": rounds,
    }
    if math.isinf(epsilon):
        config["dp"] = False
    else:
        config["target-epsilon"] = epsilon
    for key, value in (overrides or {}).items():
        if key == "batch-size" and value == FULL_BATCH:
            value = max(_train_sizes(root))  # ceil(n / batch) = 1 at every site: q = 1
        config[key] = value
    return config


def _pooled_predictions(
    sites: Sequence[Any], cfg: FederationConfig, *, architecture: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The pooled non-private model's test targets and hazards (as
    :func:`simulations.baselines.pooled` trains it: per-site encoders, one model on every
    site's train patients, clipped steps); ``architecture``: another model than the run's."""
    train, _ = settings_from_run(cfg, proximal_mu=0.0)
    trainers = [
        SiteTrainer(site=s, policy=SitePolicy(require_dp=False), ledger=None, seed=cfg.seed)
        for s in sites
    ]
    data = [t.task_data(cfg.task) for t in trainers]
    definition = trainers[0].definition(cfg.task, architecture or train.model)
    n_train = sum(len(d.patient_ids.train) for d in data)
    train = train.for_site(n_train=n_train, model=definition.model, private=False)
    device = resolve_device(train.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    net = build_model(definition.model, input_dims=data[0].input_dims, generator=generator)
    model = definition.kind.wrap(net).to(device)
    loader: DataLoader[Any] = DataLoader(
        ConcatDataset([d.train for d in data]),
        batch_size=train.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    fit(
        model,
        loader,
        optimizer=make_optimizer(model.parameters(), train),
        criterion=definition.kind.make_loss(),
        epochs=cfg.num_server_rounds * train.epochs,
        device=device,
        clip_norm=cfg.max_grad_norm,
    )
    y, p = predict(model, ConcatDataset([d.test for d in data]), device=device)
    return y, p


def _test_rows(y: np.ndarray, hazards: np.ndarray) -> list[list[float]]:
    """``[time, event, risk]`` per test patient (public data; for the across-seed C-index)."""
    risk = event_probability(hazards)
    return [[float(t), float(e), float(r)] for (t, e), r in zip(y, risk, strict=True)]


def run_configs(
    name: str,
    root: Path,
    *,
    seed: int,
    epsilon: float,
    rounds: int,
    work: Path,
    model: str = "",
    overrides: dict[str, Any] | None = None,
) -> tuple[FederationConfig, FederationConfig]:
    """The federation's run config (with ``overrides``) and the pooled references' (without:
    the non-private recipe for ``rounds`` epochs) for the sites written under ``root``."""
    n_sites = len(_train_sizes(root))
    common = {
        "run-id": f"survival-{name}-s{seed}",
        "run-dir": str(work / "run"),
        "state-root": str(work / "state"),
    }
    fed, pooled = (
        FederationConfig.from_run_config(
            {
                **_run_config(
                    name,
                    root,
                    n_sites,
                    seed=seed,
                    epsilon=epsilon,
                    rounds=rounds,
                    model=model,
                    overrides=extra,
                ),
                **common,
            }
        )
        for extra in (overrides, None)
    )
    return fed, pooled


def run_seed(
    name: str,
    *,
    seed: int,
    epsilon: float,
    rounds: int,
    work: Path,
    model: str = "",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One dataset and seed: the federated and pooled test C-index, and the run's ε;
    ``model``: the registered model of the federation and of the pooled model (``""``: the
    task's default; :func:`dataset_model` is the dataset's); ``overrides``: run-config keys
    of the federation only (:func:`parse_overrides`). The pooled references are trained
    from the run config without them (the non-private recipe, ``rounds`` epochs), so a
    federated setting never changes what it is measured against."""
    folders = write_real_sites(real_dataset(name), work / "sites", seed=seed, force=True)
    cfg, pooled_cfg = run_configs(
        name,
        folders[0].parent,
        seed=seed,
        epsilon=epsilon,
        rounds=rounds,
        work=work,
        model=model,
        overrides=overrides,
    )
    t0 = time.perf_counter()
    log = PredictionLog()
    with sites_loaded_once() as load, log.recording():
        grid = InProcessGrid(cfg, n_sites=len(folders), run_id=1)
        with _server_identity(1):
            record = run_federation(grid, cfg).to_dict()  # type: ignore[arg-type]
        sites = [load(f) for f in folders]
    fed_seconds = time.perf_counter() - t0
    predictions = log.models["global"]
    y = np.concatenate([predictions[k][0]["test"] for k in sorted(predictions)])
    p = np.concatenate([predictions[k][1]["test"] for k in sorted(predictions)])
    federated = _c_index(y, p)
    t1 = time.perf_counter()
    y_pool, p_pool = _pooled_predictions(sites, pooled_cfg)
    pool_seconds = time.perf_counter() - t1
    default = default_model_for(real_dataset(name).modalities)
    reference: dict[str, Any] = {}
    if cfg.model and cfg.model != default:
        y_ref, p_ref = _pooled_predictions(sites, pooled_cfg, architecture=default)
        reference = {
            "model": default,
            "c_index": _c_index(y_ref, p_ref),
            "test": _test_rows(y_ref, p_ref),
        }
    run_eps = [s.get("privacy", {}).get("run_epsilon") for s in record.get("sites", {}).values()]
    mechanisms = [  # each site's DP-SGD per round: noise multiplier, Poisson rate, steps
        (s.get("privacy", {}).get("mechanisms") or [None])[0]
        for s in record.get("sites", {}).values()
    ]
    return {
        "dataset": name,
        "seed": seed,
        "epsilon": epsilon,
        "rounds": rounds,
        "model": cfg.model or default,
        "overrides": dict(overrides or {}),
        "federated_c_index": federated,
        "pooled_c_index": _c_index(y_pool, p_pool),
        "reference_pooled": reference,
        "test_patients": int(y.shape[0]),
        "test_events": int(y[:, 1].sum()),
        "test": {"federated": _test_rows(y, p), "pooled": _test_rows(y_pool, p_pool)},
        "site_run_epsilon": run_eps,
        "site_mechanisms": mechanisms,
        "seconds": {"federated": fed_seconds, "pooled": pool_seconds},
        "server_global": {
            k: v
            for k, v in (max(record["rounds"], key=lambda e: e["round"])["metrics"]).items()
            if k.startswith("test.")
        }
        if record["rounds"]
        else {},
    }


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _pooled_over_seeds(
    rows: Sequence[Sequence[Sequence[float]]], *, rng: np.random.Generator
) -> tuple[float, float, float]:
    """Harrell's C-index over every seed's ``[time, event, risk]`` test rows together, and a
    95% percentile-bootstrap interval (resampling the rows, :data:`BOOTSTRAP` times)."""
    a = np.array([r for seed_rows in rows for r in seed_rows], dtype=np.float64)
    point = concordance_index(a[:, 1], a[:, 0], a[:, 2])
    draws = []
    for _ in range(BOOTSTRAP):
        b = a[rng.integers(0, len(a), len(a))]
        if b[:, 1].any():
            draws.append(concordance_index(b[:, 1], b[:, 0], b[:, 2]))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return point, float(lo), float(hi)


def _t_interval(values: Sequence[float]) -> tuple[float, float]:
    """95% t-interval of the mean of ``values`` (``nan`` for fewer than two)."""
    if len(values) < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    mean = statistics.mean(values)
    return float(mean - half), float(mean + half)


def summarize(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset: each model's mean ± sd over seeds, the gap to the better pooled
    reference, its 95% t-interval, and the C-index over every seed's test rows."""
    out = []
    for name in dict.fromkeys(r["dataset"] for r in results):
        rows = [r for r in results if r["dataset"] == name]
        rng = np.random.default_rng(0)
        cols: dict[str, dict[str, Any]] = {}
        series = {
            key: ([r[f"{key}_c_index"] for r in rows], [r["test"][key] for r in rows])
            for key in ("federated", "pooled")
        }
        if all(r.get("reference_pooled") for r in rows):
            series["reference"] = (
                [r["reference_pooled"]["c_index"] for r in rows],
                [r["reference_pooled"]["test"] for r in rows],
            )
        for key, (values, tests) in series.items():
            point, lo, hi = _pooled_over_seeds(tests, rng=rng)
            cols[key] = {
                "mean": statistics.mean(values),
                "sd": _sd(values),
                "over_seeds": point,
                "over_seeds_ci": [lo, hi],
            }
        best = max((k for k in cols if k != "federated"), key=lambda k: cols[k]["mean"])
        gaps = [
            (r["reference_pooled"]["c_index"] if best == "reference" else r["pooled_c_index"])
            - r["federated_c_index"]
            for r in rows
        ]
        out.append(
            {
                "dataset": name,
                "seeds": [r["seed"] for r in rows],
                "model": rows[0].get("model", ""),
                "overrides": rows[0].get("overrides", {}),
                "reference_model": (rows[0].get("reference_pooled") or {}).get("model", ""),
                "test_patients": sum(r["test_patients"] for r in rows),
                "test_events": sum(r["test_events"] for r in rows),
                "columns": cols,
                "compared_with": best,
                "gap": statistics.mean(gaps),
                "gap_ci": list(_t_interval(gaps)),
            }
        )
    return out


def _cell(col: dict[str, Any]) -> str:
    lo, hi = col["over_seeds_ci"]
    return f"{col['mean']:.3f} ± {col['sd']:.3f} ({col['over_seeds']:.3f} [{lo:.2f}, {hi:.2f}])"


def _table(results: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| dataset (model) | seeds | test patients (events), all seeds | pooled non-private "
        "C-index | federated DP C-index | gap to the better pooled [95% CI] | within 0.03 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summarize(results):
        cols = row["columns"]
        pooled = _cell(cols["pooled"])
        if "reference" in cols:
            pooled += f"; {row['reference_model']}: {_cell(cols['reference'])}"
        lo, hi = row["gap_ci"]
        settings = "".join(f", {k} {v}" for k, v in row["overrides"].items())
        lines.append(
            f"| {row['dataset']} ({row['model']}{settings}) | {len(row['seeds'])} | "
            f"{row['test_patients']} ({row['test_events']}) | {pooled} | "
            f"{_cell(cols['federated'])} | {row['gap']:+.3f} [{lo:+.2f}, {hi:+.2f}] | "
            f"{'yes' if row['gap'] <= GOAL else 'no'} |"
        )
    lines.append(
        "\nCells: mean ± sd over seeds (C-index over every seed's test predictions together "
        "[95% bootstrap interval]). Gap: the better pooled reference minus federated, paired "
        "by seed [95% t-interval]."
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds FIRST..FIRST+N-1")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--model",
        default="",
        help="a registered model instead of the dataset's (GSE7390: genomics_linear) or else "
        "the task's default",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config key of the federation only (repeatable), e.g. learning-rate=1.0, "
        f"batch-size={FULL_BATCH} (each site's whole train split per step)",
    )
    parser.add_argument(
        "--recipe",
        action="store_true",
        help="ignore each dataset's own run config (GSE7390's linear score at full batch): "
        "the task's default model and the run-config defaults, as the earlier runs trained",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/survival.json"))
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    threads = torch.get_num_threads()  # restored: main() may run inside another process
    try:
        torch.set_num_threads(args.threads)
        results: list[dict[str, Any]] = []
        for name in args.datasets:
            chosen = {} if args.recipe else dataset_run_config(name)
            model = args.model or ("" if args.recipe else dataset_model(name))
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                with tempfile.TemporaryDirectory(prefix=f"survival-{name}-") as tmp:
                    r = run_seed(
                        name,
                        seed=seed,
                        epsilon=args.epsilon,
                        rounds=args.rounds,
                        work=Path(tmp),
                        model=model,
                        overrides={**chosen, **overrides},
                    )
                results.append(r)
                print(
                    f"{name} seed {seed}: federated {r['federated_c_index']:.3f}, pooled "
                    f"{r['pooled_c_index']:.3f} ({r['seconds']['federated']:.0f} s)",
                    file=sys.stderr,
                )
                args.out.parent.mkdir(parents=True, exist_ok=True)
                write_private_atomic(args.out, json.dumps(results, indent=2).encode())
        print(_table(results))
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
