"""Survival utility: the federated DP model's C-index against the pooled non-private model.

For each real time-to-event dataset of :mod:`fedcare.simulations.realdata.survival` (GBSG2,
WHAS500, GSE7390, split into hospitals and written as site folders), each seed and ε this
trains

* ``fedavg``: the federation, DP-SGD at every site with the run's ``target-epsilon``, the
  real ServerApp logic (:func:`fedcare.server.app.run_federation`) driving the real ClientApp
  handlers in this process (:class:`benchmarks.utility.InProcessGrid`, as
  :mod:`benchmarks.utility` runs it), with the discrete-time hazard model
  (:mod:`fedcare.models.survival`) over the default model of the task's modality;
* ``pooled``: one non-private model of the same architecture on every site's training
  patients (:func:`fedcare.simulations.baselines.pooled`), trained for as many epochs;
* ``reference``: where ``--model`` names another model than the task's default (e.g. this
  benchmark's 77-parameter linear risk score :data:`LINEAR` on GSE7390), also the pooled
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
    .venv/bin/python -m benchmarks.survival --datasets gse7390 --seeds 20 --model genomics_linear

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
from fedcare.common.federation import FederationConfig
from fedcare.common.files import write_private_atomic
from fedcare.models import available_models, build_model, default_model_for
from fedcare.models.survival import event_probability
from fedcare.models.survival_metrics import concordance_index
from fedcare.server.app import run_federation
from fedcare.simulations.realdata import dataset as real_dataset
from fedcare.simulations.realdata import write_real_sites

__all__ = ["DATASETS", "run_seed", "summarize", "main"]

DATASETS = ("gbsg2", "whas500", "gse7390")
GOAL = 0.03
BOOTSTRAP = 1000
"""Resamples of the bootstrap interval of the C-index over every seed's test predictions."""


LINEAR = "genomics_linear"
"""A benchmark-only model (``--model genomics_linear``): the linear risk score ``w . x + b``
over the genomics vector (77 parameters on GSE7390), to test whether a smaller model closes
the DP gap on small sites. It did not (README, *Survival*), so fedcare does not ship it."""


def _register_linear() -> None:
    """Register :data:`LINEAR` in this process (never on import: only when asked for)."""
    from torch import nn

    from fedcare.models.registry import HParams, feature_dim, register_model

    class LinearConfig(HParams):
        """No hyper-parameters."""

    @register_model(LINEAR, modalities=("genomics",), ghost_clipping=True, ghost_norm_only=True)
    class GenomicsLinear(nn.Module):
        """Linear risk score over the genomics vector: ``(B, g) -> (B,)``."""

        Config = LinearConfig

        def __init__(self, in_features: int) -> None:
            super().__init__()
            self.linear = nn.Linear(in_features, 1)

        @classmethod
        def from_config(cls, *, input_dims: Any, config: LinearConfig) -> GenomicsLinear:
            return cls(feature_dim(input_dims, "genomics", model=LINEAR))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x).squeeze(-1)


def _c_index(y: np.ndarray, hazards: np.ndarray) -> float:
    return concordance_index(y[:, 1], y[:, 0], event_probability(hazards))


def _run_config(
    name: str, root: Path, n_sites: int, *, seed: int, epsilon: float, rounds: int, model: str = ""
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


def run_seed(
    name: str, *, seed: int, epsilon: float, rounds: int, work: Path, model: str = ""
) -> dict[str, Any]:
    """One dataset and seed: the federated and pooled test C-index, and the run's ε;
    ``model``: another registered model than the dataset's."""
    folders = write_real_sites(real_dataset(name), work / "sites", seed=seed, force=True)
    base = _run_config(
        name,
        folders[0].parent,
        len(folders),
        seed=seed,
        epsilon=epsilon,
        rounds=rounds,
        model=model,
    )
    cfg = FederationConfig.from_run_config(
        {
            **base,
            "run-id": f"survival-{name}-s{seed}",
            "run-dir": str(work / "run"),
            "state-root": str(work / "state"),
        }
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
    y_pool, p_pool = _pooled_predictions(sites, cfg)
    pool_seconds = time.perf_counter() - t1
    default = default_model_for(real_dataset(name).modalities)
    reference: dict[str, Any] = {}
    if cfg.model and cfg.model != default:
        y_ref, p_ref = _pooled_predictions(sites, cfg, architecture=default)
        reference = {
            "model": default,
            "c_index": _c_index(y_ref, p_ref),
            "test": _test_rows(y_ref, p_ref),
        }
    run_eps = [s.get("privacy", {}).get("run_epsilon") for s in record.get("sites", {}).values()]
    return {
        "dataset": name,
        "seed": seed,
        "epsilon": epsilon,
        "rounds": rounds,
        "model": cfg.model or default,
        "federated_c_index": federated,
        "pooled_c_index": _c_index(y_pool, p_pool),
        "reference_pooled": reference,
        "test_patients": int(y.shape[0]),
        "test_events": int(y[:, 1].sum()),
        "test": {"federated": _test_rows(y, p), "pooled": _test_rows(y_pool, p_pool)},
        "site_run_epsilon": run_eps,
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
        lines.append(
            f"| {row['dataset']} ({row['model']}) | {len(row['seeds'])} | "
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
        help=f"a registered model (or {LINEAR}, this benchmark's) instead of the default",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/survival.json"))
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()  # restored: main() may run inside another process
    try:
        torch.set_num_threads(args.threads)
        if args.model == LINEAR and LINEAR not in available_models():
            _register_linear()
        results: list[dict[str, Any]] = []
        for name in args.datasets:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                with tempfile.TemporaryDirectory(prefix=f"survival-{name}-") as tmp:
                    r = run_seed(
                        name,
                        seed=seed,
                        epsilon=args.epsilon,
                        rounds=args.rounds,
                        work=Path(tmp),
                        model=args.model,
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
