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
  patients (:func:`fedcare.simulations.baselines.pooled`), trained for as many epochs.

**What is measured**: Harrell's C-index (:func:`fedcare.models.survival_metrics.
concordance_index`, checked against scikit-survival by the tests) of each model on the union
of the sites' test patients; the federation's per-patient predictions are the ones its final
evaluation made (recorded by :class:`benchmarks.utility.PredictionLog`, which only observes),
the pooled model's are computed here on the same patients. The sites evaluate exactly (their
``site.toml`` opts in), so the number is the model's, not a DP release's. The goal (issue 16):
the federated DP C-index within 0.03 of the pooled one at ε 8, mean over 5 seeds.

A **seed** sets every site's split and noise seed and the run's ``seed`` (initial model).

Run from the repository root::

    .venv/bin/python -m benchmarks.survival                    # 3 datasets, 5 seeds, ε 8
    .venv/bin/python -m benchmarks.survival --datasets gbsg2 --seeds 1 --rounds 3

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
from torch.utils.data import ConcatDataset, DataLoader

from benchmarks.utility import InProcessGrid, PredictionLog, _server_identity, sites_loaded_once
from fedcare.client.local import SiteTrainer, settings_from_run
from fedcare.client.policy import SitePolicy
from fedcare.client.training import fit, make_optimizer, predict, resolve_device
from fedcare.common.federation import FederationConfig
from fedcare.common.files import write_private_atomic
from fedcare.models import build_model
from fedcare.models.survival import event_probability
from fedcare.models.survival_metrics import concordance_index
from fedcare.server.app import run_federation
from fedcare.simulations.realdata import dataset as real_dataset
from fedcare.simulations.realdata import write_real_sites

__all__ = ["DATASETS", "run_seed", "main"]

DATASETS = ("gbsg2", "whas500", "gse7390")
GOAL = 0.03


def _c_index(y: np.ndarray, hazards: np.ndarray) -> float:
    return concordance_index(y[:, 1], y[:, 0], event_probability(hazards))


def _run_config(name: str, root: Path, n_sites: int, *, seed: int, epsilon: float, rounds: int):
    task = real_dataset(name).task
    config: dict[str, Any] = {
        "task": task,
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


def _pooled_c_index(sites: Sequence[Any], cfg: FederationConfig) -> float:
    """The pooled non-private model's test C-index (as :func:`simulations.baselines.pooled`
    trains it: per-site encoders, one model on every site's train patients, clipped steps)."""
    train, _ = settings_from_run(cfg, proximal_mu=0.0)
    trainers = [
        SiteTrainer(site=s, policy=SitePolicy(require_dp=False), ledger=None, seed=cfg.seed)
        for s in sites
    ]
    data = [t.task_data(cfg.task) for t in trainers]
    definition = trainers[0].definition(cfg.task, train.model)
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
    return _c_index(y, p)


def run_seed(name: str, *, seed: int, epsilon: float, rounds: int, work: Path) -> dict[str, Any]:
    """One dataset and seed: the federated and pooled test C-index, and the run's ε."""
    folders = write_real_sites(real_dataset(name), work / "sites", seed=seed, force=True)
    base = _run_config(
        name, folders[0].parent, len(folders), seed=seed, epsilon=epsilon, rounds=rounds
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
    pooled = _pooled_c_index(sites, cfg)
    run_eps = [s.get("privacy", {}).get("run_epsilon") for s in record.get("sites", {}).values()]
    return {
        "dataset": name,
        "seed": seed,
        "epsilon": epsilon,
        "rounds": rounds,
        "federated_c_index": federated,
        "pooled_c_index": pooled,
        "test_patients": int(y.shape[0]),
        "test_events": int(y[:, 1].sum()),
        "site_run_epsilon": run_eps,
        "seconds": {"federated": fed_seconds, "pooled": time.perf_counter() - t1},
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


def _table(results: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| dataset | seeds | test patients (events), seed 0 | pooled non-private C-index | "
        "federated DP C-index (ε 8) | gap | within 0.03 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["dataset"] for r in results):
        rows = [r for r in results if r["dataset"] == name]
        fed = [r["federated_c_index"] for r in rows]
        pool = [r["pooled_c_index"] for r in rows]
        gap = statistics.mean(pool) - statistics.mean(fed)
        lines.append(
            f"| {name} | {len(rows)} | {rows[0]['test_patients']} ({rows[0]['test_events']}) | "
            f"{statistics.mean(pool):.3f} ± {_sd(pool):.3f} | "
            f"{statistics.mean(fed):.3f} ± {_sd(fed):.3f} | {gap:+.3f} | "
            f"{'yes' if gap <= GOAL else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/survival.json"))
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []
    for name in args.datasets:
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory(prefix=f"survival-{name}-") as tmp:
                r = run_seed(
                    name, seed=seed, epsilon=args.epsilon, rounds=args.rounds, work=Path(tmp)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
