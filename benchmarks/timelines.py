"""Does the timeline model beat the event aggregates on the temporal synthetic task?

Four synthetic hospitals with :class:`~fedcare.simulations.synth.SynthConfig`
``(temporal_signal=True)`` (:mod:`fedcare.simulations.synth.timeline`): the label
``infection`` is carried by the order and timing of a blood culture and an antibiotic start
(antibiotics within 24 h after the culture), which the per-patient event aggregates
(mean, min, max, last, count) cannot see. Two tasks share that label:

* ``infection`` -- the EHR table and the event aggregates; default model ``ehr_mlp``;
* ``infection_timeline`` -- the same, plus the ``stay`` timeline (the latest 48 vital
  signs, cultures and antibiotic starts); default model ``timeline`` (self-attention over
  the events, :mod:`fedcare.models.timeline`).

Each is trained as a FedAvg federation under DP-SGD at ε = 8 (the run config's DP recipe:
10 rounds of one local epoch) and as the non-private pooled baseline, for several seeds (a
seed re-splits the same cohort and seeds the initial model and the DP noise). The metric is
the test AUROC over every site's test patients (:mod:`benchmarks.utility`, whose in-process
federation and prediction log this reuses: the real ServerApp and ClientApp handlers, one
site after another). The margin is the timeline task's AUROC minus the aggregate task's,
paired by seed.

Run from the repository root::

    .venv/bin/python -m benchmarks.timelines              # 3 seeds
    .venv/bin/python -m benchmarks.timelines --seeds 1 --rounds 3   # a quick look
    .venv/bin/python -m benchmarks.timelines --local-epochs 5       # more DP steps per round

The markdown table goes to stdout; every run's numbers to ``--out`` (default
``benchmarks/results/timelines.json``).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.utility import (
    METHODS,
    Dataset,
    Method,
    RunResult,
    _atomic_json,
    _resplit,
    run_method,
    sites_loaded_once,
)
from fedcare.common.spec import SPEC_FILENAME
from fedcare.simulations.synth import SynthConfig, synthesize
from fedcare.simulations.synth.timeline import TASK, TIMELINE_TASK

__all__ = ["COHORT", "TASKS", "main", "summarize", "render_markdown"]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "timelines.json"
COHORT = SynthConfig(temporal_signal=True, patients_per_site=1000)
"""Four hospitals of about 1,000 patients (seed 0); a benchmark seed re-splits them."""
TASKS = {"aggregates": TASK, "timeline": TIMELINE_TASK}
RUNS = (("fedavg", 8.0), ("pooled", math.inf))


def _write(out: Path, seed: int) -> list[Path]:
    if not (out / "site-0" / SPEC_FILENAME).is_file():
        synthesize(out, n_sites=4, seed=0, config=COHORT, force=True)
    folders = sorted(p for p in out.iterdir() if (p / SPEC_FILENAME).is_file())
    for folder in folders:
        _resplit(folder, seed)
    return folders


def _auroc(result: RunResult) -> float:
    return float(result.metrics["global"]["test.auroc"])


def summarize(results: Sequence[RunResult]) -> dict[str, Any]:
    """Per (method, ε): mean and sd of each task's AUROC and of the paired margin."""
    out: dict[str, Any] = {}
    for method, epsilon in RUNS:
        key = f"{method} ε={'inf' if math.isinf(epsilon) else f'{epsilon:g}'}"
        by_task: dict[str, dict[int, float]] = {name: {} for name in TASKS}
        for r in results:
            if r.method == method:
                by_task[r.dataset][r.seed] = _auroc(r)
        seeds = sorted(set(by_task["aggregates"]) & set(by_task["timeline"]))
        if not seeds:
            continue
        margins = [by_task["timeline"][s] - by_task["aggregates"][s] for s in seeds]
        row = {"seeds": len(seeds)}
        for name, values in (
            *((n, [by_task[n][s] for s in seeds]) for n in TASKS),
            ("margin", margins),
        ):
            row[name] = {
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else None,
                "values": values,
            }
        out[key] = row
    return out


def _cell(stats: dict[str, Any]) -> str:
    sd = stats["sd"]
    return f"{stats['mean']:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def render_markdown(summary: dict[str, Any], header: str) -> str:
    """The README table: test AUROC of each input, and the margin (mean ± sd over seeds)."""
    lines = [
        header,
        "",
        "| training | aggregates (`ehr_mlp`) | timeline (`timeline`) | margin | seeds |",
        "|---|---|---|---|---|",
    ]
    for key, row in summary.items():
        lines.append(
            f"| {key} | {_cell(row['aggregates'])} | {_cell(row['timeline'])} | "
            f"{_cell(row['margin'])} | {row['seeds']} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.timelines", description=__doc__)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds (default: 10)")
    p.add_argument(
        "--local-epochs", type=int, default=1, help="local epochs per round (default: 1)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if min(args.seeds, args.threads, args.local_epochs, args.rounds or 1) < 1:
        print(
            "benchmarks.timelines: --seeds, --rounds, --local-epochs and --threads must be >= 1",
            file=sys.stderr,
        )
        return 2
    methods = {
        "fedavg": Method(
            "fedavg", "federated", {"strategy": "fedavg", "local-epochs": args.local_epochs}
        ),
        "pooled": METHODS["pooled"],
    }
    torch.set_num_threads(args.threads)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("flwr", "server", "client"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Expected Opacus warnings on every make_private; they would bury the progress lines.
    warnings.filterwarnings(
        "ignore",
        message=r"(Secure RNG turned off|Full backward hook is firing|Using a non-full backward)",
        category=UserWarning,
    )
    warnings.filterwarnings("ignore", message=r"Optimal order is the largest alpha")
    results: list[RunResult] = []
    t_start = time.monotonic()
    flower_run = 0
    with tempfile.TemporaryDirectory(prefix="fedcare-timelines-") as tmp:
        work = Path(tmp)
        for seed in range(args.seeds):
            folders = _write(work / "sites", seed)
            with sites_loaded_once() as load:
                sites = [load(f) for f in folders]
                for name, task in TASKS.items():
                    dataset = Dataset(name, task, _write)
                    for method, epsilon in RUNS:
                        flower_run += 1
                        result = run_method(
                            methods[method],
                            dataset,
                            folders,
                            sites,
                            seed=seed,
                            epsilon=epsilon,
                            rounds=args.rounds,
                            work=work / f"s{seed}-{name}-{method}",
                            flower_run_id=flower_run,
                        )
                        results.append(result)
                        print(
                            f"[timelines] seed {seed} {name} {method}: AUROC "
                            f"{_auroc(result):.3f}; {result.seconds:.1f} s",
                            file=sys.stderr,
                            flush=True,
                        )
    wall = time.monotonic() - t_start
    summary = summarize(results)
    command = "python -m benchmarks.timelines " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    payload = {
        "command": command.strip(),
        "cohort": COHORT.model_dump(mode="json"),
        "wall_s": round(wall, 1),
        "torch_threads": args.threads,
        "local_epochs": args.local_epochs,
        "summary": summary,
        "runs": [asdict(r) for r in results],
    }
    _atomic_json(args.out, payload)
    header = (
        f"Command: `{command.strip()}`; {args.seeds} seed(s); wall {wall / 60:.1f} min, "
        f"torch {torch.__version__}."
    )
    print(render_markdown(summary, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
