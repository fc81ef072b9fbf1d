"""What a real deployment costs per round, against the same run in simulation.

The same federation (``--sites`` synthetic hospitals, ``readmission``, DP, ``--rounds``
rounds, one local epoch) runs

1. **in simulation**: :func:`simulations.runner.run_experiment` (Flower's simulation engine;
   each site is a long-lived Ray actor that imported torch once);
2. **as a deployment on 127.0.0.1**: ``fedcare server start`` (TLS, node authentication) and
   one ``fedcare site start`` per site, the run submitted with ``flwr run`` -- every message
   starts a fresh ``flwr-clientapp`` process that imports Python, Flower, torch and fedcare
   (Flower's ``subprocess`` isolation: a crash or leak of one round cannot reach the next).

Per-round time is the gap between consecutive ``progress.jsonl`` entries (the server writes
one after each round's training, aggregation and federated evaluation); the figure is the
median over rounds 2..R and over ``--repeats`` runs (round 1 is left out: it includes the
simulation's Ray start). The ratio deployment / simulation is taken within one repeat.

It also times what every ClientApp process pays before it can work: ``python -c "import
client.app"`` (median of ``--imports`` runs), and the same with Opacus imported too, which is
what each process paid before fedcare imported Opacus only where DP-SGD needs it (an
evaluation never does).

Run from the repository root::

    .venv/bin/python -m benchmarks.deployment_overhead                 # 3 sites x 3 rounds
    .venv/bin/python -m benchmarks.deployment_overhead --repeats 1 --rounds 2

The markdown goes to stdout and to ``--out`` (default
``benchmarks/results/deployment_overhead.md``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from simulations.runner import run_experiment
from simulations.scenario import Scenario
from tests.integration._deployment import Deployment

TASK = "readmission"


def _round_gaps(progress: Path) -> list[float]:
    entries = [json.loads(x) for x in progress.read_text().splitlines() if x.strip()]
    by_round = {int(e["round"]): float(e["elapsed_s"]) for e in entries}
    rounds = sorted(by_round)
    return [by_round[r] - by_round[r - 1] for r in rounds if r - 1 in by_round and r >= 2]


def _simulate(root: Path, *, sites: int, rounds: int, patients: int) -> tuple[float, list[float]]:
    scenario = Scenario(
        name="bench",
        sites=sites,
        data_root=str(root / "data"),
        baselines=False,
        federation={
            "task": TASK,
            "num-server-rounds": rounds,
            "local-epochs": 1,
            "learning-rate": 0.01,
        },
    )
    start = time.perf_counter()
    run_experiment(scenario, out=root / "sim")
    wall = time.perf_counter() - start
    return wall, _round_gaps(root / "sim" / "progress.jsonl")


def _deploy(
    root: Path, *, sites: int, rounds: int, patients: int, evaluate_every: int = 1
) -> tuple[float, list[float]]:
    dep = Deployment.create(root, n_sites=sites, patients=patients)
    try:
        dep.start_server()
        for i in range(sites):
            dep.register(i)
            dep.start_site(i)
        start = time.perf_counter()
        run = dep.submit(
            "bench",
            **{
                "num-server-rounds": rounds,
                "num-sites": sites,
                "local-epochs": 1,
                "evaluate-every": evaluate_every,
            },
        )
        info = dep.wait(run, timeout=3600)
        wall = time.perf_counter() - start
        if info["status"] != "finished:completed":
            raise RuntimeError(f"deployment run failed: {info}")
        gaps = _round_gaps(dep.run_dir("bench") / "progress.jsonl")
        if evaluate_every > 1:  # the last round evaluates; rounds 2..R-1 show the saving
            gaps = gaps[:-1] or gaps
        return wall, gaps
    finally:
        dep.stop_all()


def _import_seconds(statement: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patients", type=int, default=140)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--imports", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/deployment_overhead.md")
    )
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is left out of the per-round figure)")

    rows = []
    for rep in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="fedcare-bench-") as tmp:
            root = Path(tmp)
            d_wall, d_gaps = _deploy(
                root / "deploy", sites=args.sites, rounds=args.rounds, patients=args.patients
            )
            e_wall, e_gaps = _deploy(
                root / "deploy-eval",
                sites=args.sites,
                rounds=args.rounds,
                patients=args.patients,
                evaluate_every=args.rounds,
            )
            # The simulation uses the same synthetic hospitals (same seed and size).
            s_wall, s_gaps = _simulate(
                root / "deploy", sites=args.sites, rounds=args.rounds, patients=args.patients
            )
        s_round, d_round, e_round = (statistics.median(g) for g in (s_gaps, d_gaps, e_gaps))
        rows.append((rep + 1, s_wall, d_wall, e_wall, s_round, d_round, e_round))
        print(
            f"repeat {rep + 1}: simulation {s_round:.1f} s/round, deployment {d_round:.1f} "
            f"s/round, deployment evaluating only at the end {e_round:.1f} s/round"
        )

    imports = {
        "python -c 'import flwr.clientapp'": _import_seconds("import flwr.clientapp", args.imports),
        "python -c 'import client.app' (now)": _import_seconds("import client.app", args.imports),
        "python -c 'import client.app, opacus' (before)": _import_seconds(
            "import client.app, opacus", args.imports
        ),
    }
    lines = [
        "# Deployment overhead: real SuperLink + SuperNodes vs simulation",
        "",
        f"{args.sites} sites x {args.rounds} rounds, `{TASK}`, DP-SGD, 1 local epoch, "
        f"~{args.patients} patients per site; all processes on one 2-core machine. Per-round "
        "time = median gap between consecutive rounds' progress entries (rounds 2..R).",
        "",
        "| repeat | simulation wall (s) | deployment wall (s) | deployment, evaluate-every=R, "
        "wall (s) | simulation s/round | deployment s/round | ratio | deployment "
        "evaluate-every=R s/round | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rep, s_wall, d_wall, e_wall, s_round, d_round, e_round in rows:
        lines.append(
            f"| {rep} | {s_wall:.1f} | {d_wall:.1f} | {e_wall:.1f} | {s_round:.1f} | "
            f"{d_round:.1f} | {d_round / s_round:.2f} | {e_round:.1f} | {e_round / s_round:.2f} |"
        )
    med = statistics.median(r[5] / r[4] for r in rows)
    med_e = statistics.median(r[6] / r[4] for r in rows)
    lines += [
        "",
        f"Median ratio deployment/simulation per round: **{med:.2f}** (federated evaluation "
        f"every round), **{med_e:.2f}** (evaluate-every = R: rounds without an evaluation "
        "message).",
        "",
        "What every ClientApp process pays before it works (median of "
        f"{args.imports} cold starts):",
        "",
        "| command | seconds |",
        "|---|---|",
        *[f"| `{k}` | {v:.2f} |" for k, v in imports.items()],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
