"""What a real deployment costs per round, against the same run in simulation.

The same federation (``--sites`` synthetic hospitals, ``readmission``, DP, ``--rounds``
rounds, one local epoch) runs

1. **in simulation**: :func:`fedcare.simulations.runner.run_experiment` (Flower's simulation engine;
   each site is a long-lived Ray actor that imported torch once);
2. **as a deployment on 127.0.0.1**: ``fedcare server start`` (TLS, node authentication,
   the Fleet-only gateway, fedcare's ServerApp executor) and one ``fedcare site start`` per
   site (SuperNode + fedcare's long-lived site worker, which keeps torch and the site's
   data loaded between messages), the run submitted with ``flwr run``.

Per-round time is the gap between consecutive ``progress.jsonl`` entries (the server writes
one after each round's training, aggregation and federated evaluation). Round r's evaluation
travels with round r + 1's train message (``server/guard.py``), so a round is one message
exchange, and the last round two: its training, then the run's final evaluation in a message
of its own (a cost per run, like round 0's initial evaluation). The per-round figure is the
median over rounds 2..R-1 (round 1 is left out: it includes the simulation's Ray start and the
workers' first load of their data); the last round's gap is reported on its own. The
**overhead** of a deployment is its time minus the simulation's within the same repeat (same
sites, same compute, the same message flow); the table gives the medians over ``--repeats``.
Goal (issue 11): <= 2 s per round.

It also measures what an idle site costs: the CPU time of one site's processes (SuperNode,
worker) over ``--idle`` seconds, starting ``BUSY_WINDOW_S`` (10 s) after the run ended (a site
polls faster for that long after its last message), as a share of one core.

Run from the repository root::

    .venv/bin/python -m benchmarks.deployment_overhead                 # 3 sites x 3 rounds
    .venv/bin/python -m benchmarks.deployment_overhead --repeats 1 --rounds 4

The markdown goes to stdout and to ``--out`` (default
``benchmarks/results/deployment_overhead.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from fedcare.client.supernode import BUSY_WINDOW_S
from fedcare.common.processes import family_pids
from fedcare.simulations.runner import run_experiment
from fedcare.simulations.scenario import Scenario
from tests.integration._deployment import Deployment

TASK = "readmission"


def _round_gaps(progress: Path) -> dict[int, float]:
    """Round -> seconds since the previous round's progress entry, rounds 2..R."""
    entries = [json.loads(x) for x in progress.read_text().splitlines() if x.strip()]
    by_round = {int(e["round"]): float(e["elapsed_s"]) for e in entries}
    return {
        r: by_round[r] - by_round[r - 1] for r in sorted(by_round) if r - 1 in by_round and r >= 2
    }


def _split(gaps: dict[int, float]) -> tuple[float, float]:
    """(median gap of rounds 2..R-1, the last round's gap)."""
    last = max(gaps)
    return statistics.median(g for r, g in gaps.items() if r < last), gaps[last]


def _simulate(
    root: Path, *, sites: int, rounds: int, patients: int
) -> tuple[float, dict[int, float]]:
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


def _cpu_seconds(pids: set[int]) -> float:
    """User + system CPU seconds of ``pids`` so far (clock ticks from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def _idle_share(dep: Deployment, seconds: float) -> float:
    """CPU share of one core used by site 0's processes while nothing runs (measured once
    the site's fast polling after its last message, BUSY_WINDOW_S, is over)."""
    time.sleep(BUSY_WINDOW_S)
    pids = family_pids(dep.processes["site-0"].proc.pid)
    before, start = _cpu_seconds(pids), time.perf_counter()
    time.sleep(seconds)
    return (_cpu_seconds(pids) - before) / (time.perf_counter() - start)


def _deploy(
    root: Path,
    *,
    sites: int,
    rounds: int,
    patients: int,
    evaluate_every: int = 1,
    idle_s: float = 0.0,
) -> tuple[float, dict[int, float], float]:
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
        idle = _idle_share(dep, idle_s) if idle_s > 0 else float("nan")
        return wall, gaps, idle
    finally:
        dep.stop_all()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patients", type=int, default=140)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--idle", type=float, default=20.0, help="idle window (s)")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/deployment_overhead.md")
    )
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error(
            "--rounds must be at least 3 (round 1 and the last round are left out of the "
            "per-round figure)"
        )

    rows = []
    idle_shares = []
    load_start = os.getloadavg()
    for rep in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="fedcare-bench-") as tmp:
            root = Path(tmp)
            d_wall, d_gaps, idle = _deploy(
                root / "deploy",
                sites=args.sites,
                rounds=args.rounds,
                patients=args.patients,
                idle_s=args.idle,
            )
            idle_shares.append(idle)
            e_wall, e_gaps, _ = _deploy(
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
        (s_round, s_last), (d_round, d_last), (e_round, e_last) = (
            _split(g) for g in (s_gaps, d_gaps, e_gaps)
        )
        rows.append(
            (rep + 1, s_wall, d_wall, e_wall, s_round, d_round, e_round, s_last, d_last, e_last)
        )
        print(
            f"repeat {rep + 1}: simulation {s_round:.1f} s/round, deployment {d_round:.1f} "
            f"s/round ({d_round - s_round:+.1f}), evaluating only at the end {e_round:.1f} "
            f"s/round; last round {s_last:.1f} / {d_last:.1f} / {e_last:.1f} s; idle site "
            f"{100 * idle:.1f} % of a core; load {os.getloadavg()[0]:.1f}"
        )

    load_end = os.getloadavg()
    lines = [
        "# Deployment overhead: real SuperLink + SuperNodes vs simulation",
        "",
        f"{args.sites} sites x {args.rounds} rounds, `{TASK}`, DP-SGD, 1 local epoch, "
        f"~{args.patients} patients per site; all processes on one {os.cpu_count()}-core "
        f"machine (load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the "
        "end). Per-round time = median gap between consecutive rounds' progress entries, "
        "rounds 2..R-1 (round r's evaluation goes with round r + 1's train message: one "
        "exchange per round); the last round (its training, then the run's final evaluation "
        "in a message of its own) is shown apart. Overhead = deployment minus simulation, "
        "within a repeat.",
        "",
        "| repeat | simulation s/round | deployment s/round | overhead s/round | "
        "deployment evaluate-every=R s/round | overhead s/round | "
        "last round sim / dep / dep-R (s) | walls sim / dep / dep-R (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rep, s_wall, d_wall, e_wall, s_round, d_round, e_round, s_last, d_last, e_last in rows:
        lines.append(
            f"| {rep} | {s_round:.2f} | {d_round:.2f} | {d_round - s_round:+.2f} | "
            f"{e_round:.2f} | {e_round - s_round:+.2f} | {s_last:.2f} / {d_last:.2f} / "
            f"{e_last:.2f} | {s_wall:.0f} / {d_wall:.0f} / {e_wall:.0f} |"
        )
    over = statistics.median(r[5] - r[4] for r in rows)
    over_e = statistics.median(r[6] - r[4] for r in rows)
    over_last = statistics.median(r[8] - r[7] for r in rows)
    ratio = statistics.median(r[5] / r[4] for r in rows)
    lines += [
        "",
        f"Median overhead per round: **{over:+.2f} s** (federated evaluation every round; "
        f"ratio deployment/simulation {ratio:.2f}), **{over_e:+.2f} s** (evaluate-every = R). "
        f"The last round, with the run's final evaluation: **{over_last:+.2f} s** over "
        "simulation (once per run).",
        "",
        f"Idle site (SuperNode + worker, {args.idle:g} s from {BUSY_WINDOW_S:g} s after the "
        "run, median of repeats): "
        f"**{100 * statistics.median(idle_shares):.1f} % of one core**.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
