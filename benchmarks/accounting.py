"""What privacy accounting costs: one ε, one noise calibration, and a round's accounting.

Three measurements, each for this checkout's :mod:`fedcare.client.accounting` and, with
``--baseline REV``, for the same file at a git revision (``git show REV:client/accounting.py``,
loaded beside it as a separate module; its ``Mechanism`` is this checkout's, the class is
unchanged), taken in alternation so that drift on a shared machine hits both alike; the
round replay (3.) also gives each version's sites its own :mod:`fedcare.client.ledger` and
site code :mod:`fedcare.client.local` (``REV:client/ledger.py`` and ``REV:client/local.py``
for the baseline), so the ledger's SQLite and how often a round reads it are compared too:

1. **ε per call**: :func:`~fedcare.client.accounting.epsilon` of realistic histories (a round
   of a small site and its evaluation release, a long run at a large site, several runs, 20
   blocks), every per-process cache emptied first (the ε memo and the per-``(σ, q)`` RDP
   vectors): what a new history costs a fresh process.
2. **Calibration per call**: :func:`~fedcare.client.accounting.calibrate_noise` of realistic
   plans (σ from 0.5 to 12, q = batch / n for n from 100 to 2000, 12 to 600 planned steps,
   histories of 1 to 11 blocks), caches emptied first, with the number of ε it computed (the
   memo's misses).
3. **A round**: :func:`benchmarks.federation_overhead.measure_compute` replays a small
   federation in this process (``--sites`` synthetic hospitals of ``--patients``, task
   ``readmission``, DP at ε 8 with PRV, ``--rounds`` rounds, evaluation every round), and
   per round the seconds of privacy accounting (``calibrate_noise``, the plan's ε check and
   the ledger's calls, its SQLite transactions included; and of it, the accountant alone:
   the calibration and every ε, without the SQLite) are set against that round's compute
   (``train_round`` + ``evaluate``, accounting included), and so are the whole run's (all
   rounds, and rounds 2..R). The replay runs every
   site in one process, so sites of equal size share the ε memo; on its own, a site
   computes one new ε per round after the first (its charge's ε after; the ε before is the
   previous charge's, from the memo), whose cost is that of table 1.

Medians over ``--repeats``, in wall seconds, or with ``--clock cpu`` in this process's CPU
seconds (steadier where other jobs keep the machine busy; it leaves out the time the ledger
waits for its fsyncs). Run from the repository root (opacus installs a top-level package
also named ``benchmarks``)::

    .venv/bin/python -m benchmarks.accounting
    .venv/bin/python -m benchmarks.accounting --baseline HEAD --repeats 5

Writes ``benchmarks/results/accounting.json`` (``--out``) and prints a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import fedcare.client.accounting as current
from fedcare.client.accounting import Mechanism

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "accounting.json"
DELTA = 1e-5
M = Mechanism

#: ``--clock``: wall seconds, or this process's CPU seconds.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}

#: Per-process caches of the accounting module (those a version has), emptied before a call.
_CACHES = (
    "_memoized_epsilon",
    "_memoized_calibration",
    "_rdp_per_step",
    "_integer_rdp_per_step",
    "_grid_bound_of",
)

#: History name -> history. Evaluation releases are ``M(5.0, 1.0, k)`` (the site default).
EPSILON_CASES: dict[str, list[Mechanism]] = {
    "300 patients, round 1 + its evaluation": [M(1.1, 64 / 200, 4), M(5.0, 1.0, 1)],
    "300 patients, round 3 + 4 evaluations": [M(1.1, 64 / 200, 12), M(5.0, 1.0, 4)],
    "100 patients, 200 steps in one round": [M(2.0, 0.64, 200), M(5.0, 1.0, 2)],
    "2000 patients, 20 rounds x 30 steps": [M(0.8, 64 / 2000, 600), M(5.0, 1.0, 21)],
    "5 runs at 1000 patients": [
        *(M(0.8 + 0.2 * i, 64 / 1000, 60) for i in range(5)),
        M(5.0, 1.0, 20),
    ],
    "20 blocks": [M(1.0 + 0.05 * i, 0.02 + 0.001 * i, 50) for i in range(20)],
}

#: Plan name -> (target ε, q, planned steps, history).
CALIBRATION_CASES: dict[str, tuple[float, float, int, list[Mechanism]]] = {
    "300 patients, 3 rounds x 4 steps, ε 8": (8.0, 64 / 200, 12, [M(5.0, 1.0, 4)]),
    "300 patients, 3 rounds x 4 steps, ε 2": (2.0, 64 / 200, 12, [M(5.0, 1.0, 4)]),
    "100 patients, 3 rounds x 200 steps, ε 8": (8.0, 0.64, 600, [M(5.0, 1.0, 4)]),
    "2000 patients, 20 rounds x 30 steps, ε 8": (8.0, 64 / 2000, 600, [M(5.0, 1.0, 21)]),
    "second run after 5, 1000 patients, ε 8": (
        8.0,
        64 / 1000,
        60,
        [*(M(1.6 + 0.2 * i, 64 / 1000, 60) for i in range(5)), M(5.0, 1.0, 20)],
    ),
    "after 10 runs, 11 blocks, ε 8": (
        8.0,
        0.2,
        90,
        [M(5.0, 1.0, 21), *(M(1.0 + 0.1 * i, 0.05, 20) for i in range(10))],
    ),
}


# --------------------------------------------------------------------------- versions


def _module_at(rev: str, file: str, name: str) -> ModuleType:
    """``file`` at git revision ``rev``, loaded as a module named ``name``."""
    source = subprocess.run(
        ["git", "show", f"{rev}:{file}"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
        path = f.name
    try:
        name = name.replace("~", "_").replace("^", "_")
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise RuntimeError(f"cannot load {path} as a module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        os.unlink(path)
    return module


def load_revision(rev: str) -> ModuleType:
    """``client/accounting.py`` at git revision ``rev``, as a module of its own.

    Its ``Mechanism`` is replaced by this checkout's (the class is the same in every
    revision this benchmark compares), so the histories built here pass its checks.
    """
    module = _module_at(rev, "client/accounting.py", f"fedcare_accounting_at_{rev}")
    module.Mechanism = Mechanism  # type: ignore[attr-defined]
    return module


def load_ledger_revision(rev: str) -> ModuleType:
    """``client/ledger.py`` at git revision ``rev``, as a module of its own.

    It imports this checkout's accounting; its ``epsilon`` forwards to
    ``fedcare.client.ledger.epsilon``, which the round replay points at the version under
    test (:func:`accounting_of`) and times as the ledger's ε.
    """
    import fedcare.client.ledger as client_ledger

    module = _module_at(rev, "client/ledger.py", f"fedcare_ledger_at_{rev}")

    def forwarded(*args: Any, **kwargs: Any) -> float:
        return float(client_ledger.epsilon(*args, **kwargs))

    module.epsilon = forwarded  # type: ignore[attr-defined]
    return module


def load_local_revision(rev: str) -> ModuleType:
    """``client/local.py`` at git revision ``rev``, as a module of its own: the site code
    that calls the ledger (how often a round reads it), for the baseline's replay. It
    imports this checkout's other modules; its ``calibrate_noise`` and ``epsilon`` are
    pointed at the version under test by :func:`accounting_of`."""
    return _module_at(rev, "client/local.py", f"fedcare_local_at_{rev}")


def clear_caches(module: ModuleType) -> None:
    """Empty every per-process cache ``module`` has (see ``_CACHES``)."""
    for name in _CACHES:
        cached = getattr(module, name, None)
        if cached is not None:
            cached.cache_clear()


def _cold_ms(module: ModuleType, fn: Callable[[], object], clock: Callable[[], float]) -> float:
    """Milliseconds of one ``fn()`` on ``clock`` with ``module``'s caches emptied first."""
    clear_caches(module)
    t = clock()
    fn()
    return 1e3 * (clock() - t)


def _computed(module: ModuleType, fn: Callable[[], object]) -> int:
    """How many ε ``fn`` computed (misses of ``module``'s memo), caches emptied first."""
    clear_caches(module)
    fn()
    return int(module._memoized_epsilon.cache_info().misses)


def _epsilon(module: ModuleType, history: list[Mechanism]) -> float:
    return float(module.epsilon(history, delta=DELTA))


def _calibrate(module: ModuleType, plan: tuple[float, float, int, list[Mechanism]]) -> float:
    target, q, steps, history = plan
    return float(
        module.calibrate_noise(
            target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, history=history
        )
    )


# --------------------------------------------------------------------------- per call


def time_epsilon(
    versions: dict[str, ModuleType], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, dict[str, Any]]:
    """Per history: ε and median ms per version, alternating the versions per repeat."""
    out: dict[str, dict[str, Any]] = {}
    for name, history in EPSILON_CASES.items():
        row: dict[str, Any] = {"blocks": len(history), "steps": sum(m.steps for m in history)}
        samples: dict[str, list[float]] = {v: [] for v in versions}
        for _ in range(repeats):
            for label, module in versions.items():
                samples[label].append(_cold_ms(module, partial(_epsilon, module, history), clock))
        for label, module in versions.items():
            row[label] = {
                "epsilon": _epsilon(module, history),
                "ms": statistics.median(samples[label]),
            }
        out[name] = row
    return out


def time_calibration(
    versions: dict[str, ModuleType], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, dict[str, Any]]:
    """Per plan: σ, its reported ε, ε computed, and median ms per version."""
    out: dict[str, dict[str, Any]] = {}
    for name, plan in CALIBRATION_CASES.items():
        target, q, steps, history = plan
        row: dict[str, Any] = {"target_epsilon": target, "sample_rate": q, "steps": steps}
        samples: dict[str, list[float]] = {v: [] for v in versions}
        for _ in range(repeats):
            for label, module in versions.items():
                samples[label].append(_cold_ms(module, partial(_calibrate, module, plan), clock))
        for label, module in versions.items():
            sigma = _calibrate(module, plan)
            row[label] = {
                "sigma": sigma,
                "epsilon": _epsilon(module, [*history, M(sigma, q, steps)]),
                "epsilons_computed": _computed(module, partial(_calibrate, module, plan)),
                "ms": statistics.median(samples[label]),
            }
        out[name] = row
    return out


# --------------------------------------------------------------------------- a round


@contextlib.contextmanager
def accounting_of(
    module: ModuleType, ledger: ModuleType | None = None, local: ModuleType | None = None
) -> Iterator[None]:
    """Make the round's callers (and the replay's memo counters) use ``module``, the
    replay's sites the ``PrivacyLedger`` of ``ledger`` and the ``SiteTrainer`` of ``local``
    (default: this checkout's; the replay times the calls of that ``local``)."""
    import benchmarks.federation_overhead as replay
    import fedcare.client.ledger as client_ledger
    import fedcare.client.local as client_local

    site_code = local or client_local
    patched = [
        (site_code, "calibrate_noise"),
        (site_code, "epsilon"),
        (client_ledger, "epsilon"),
        (replay, "PrivacyLedger"),
        (replay, "SiteTrainer"),
        (replay, "client_local"),
        *((current, name) for name in _CACHES),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name in patched]
    replacements = {
        **{name: getattr(module, name) for _, name in patched if hasattr(module, name)},
        "PrivacyLedger": (ledger or client_ledger).PrivacyLedger,
        "SiteTrainer": site_code.SiteTrainer,
        "client_local": site_code,
    }
    for owner, name in patched:
        if name in replacements:  # an older version may lack a cache
            setattr(owner, name, replacements[name])
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def time_rounds(
    versions: dict[str, ModuleType],
    *,
    sites: int,
    patients: int,
    rounds: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
    ledgers: dict[str, ModuleType] | None = None,
    locals_: dict[str, ModuleType] | None = None,
) -> dict[str, Any]:
    """Per version: per round, median seconds of accounting and of compute over repeats.

    ``ledgers`` / ``locals_``: the ledger module a version's sites use
    (:func:`load_ledger_revision`) and its site code (:func:`load_local_revision`); this
    checkout's where none is given."""
    from benchmarks.federation_overhead import measure_compute
    from fedcare.common.federation import FederationConfig
    from fedcare.simulations.synth import SynthConfig, synthesize

    samples: dict[str, list[list[dict[str, float]]]] = {v: [] for v in versions}
    parts: dict[str, list[dict[str, tuple[int, float]]]] = {v: [] for v in versions}
    counts: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory(prefix="fedcare-accounting-") as tmp:
        work = Path(tmp)
        folders = synthesize(
            work / "sites",
            n_sites=sites,
            seed=0,
            config=SynthConfig(patients_per_site=patients),
            force=True,
        )
        cfg = FederationConfig(
            task="readmission", num_server_rounds=rounds, seed=0, data_root=str(work / "sites")
        )
        for i in range(repeats):
            for label, module in versions.items():
                for version in versions.values():
                    clear_caches(version)
                with accounting_of(module, (ledgers or {}).get(label), (locals_ or {}).get(label)):
                    compute = measure_compute(
                        folders,
                        cfg,
                        run_id=f"accounting-{label}-{i}",
                        state_root=work / f"state-{label}-{i}",
                        reload_repeats=1,
                        clock=clock,
                    )
                samples[label].append(compute.rounds)
                parts[label].append(compute.parts)
                counts[label] = (compute.epsilon_asked, compute.epsilon_computed)
    out: dict[str, Any] = {}
    for label in versions:
        per_round = []
        for r in range(rounds + 1):
            accounting = statistics.median(run[r]["accounting_s"] for run in samples[label])
            compute_s = statistics.median(
                run[r]["train_s"] + run[r]["evaluate_s"] for run in samples[label]
            )
            share = statistics.median(
                run[r]["accounting_s"] / (run[r]["train_s"] + run[r]["evaluate_s"])
                for run in samples[label]
            )
            # The accountant alone (calibration and every ε), without the ledger's SQLite.
            epsilon_s = statistics.median(run[r]["epsilon_s"] for run in samples[label])
            epsilon_share = statistics.median(
                run[r]["epsilon_s"] / (run[r]["train_s"] + run[r]["evaluate_s"])
                for run in samples[label]
            )
            per_round.append(
                {
                    "round": r,
                    "accounting_ms": 1e3 * accounting,
                    "epsilon_ms": 1e3 * epsilon_s,
                    "compute_ms": 1e3 * compute_s,
                    "accounting_share": share,
                    "epsilon_share": epsilon_share,
                }
            )
        names = sorted({name for run in parts[label] for name in run})
        out[label] = {
            "rounds": per_round,
            "run": _run_shares(samples[label]),
            "parts_ms": {  # every timed call of the replay, all rounds and sites: calls, ms
                name: [
                    statistics.median(run.get(name, (0, 0.0))[0] for run in parts[label]),
                    1e3 * statistics.median(run.get(name, (0, 0.0))[1] for run in parts[label]),
                ]
                for name in names
            },
            "epsilon_asked": counts[label][0],
            "epsilon_computed": counts[label][1],
        }
    return out


def _run_shares(runs: Sequence[Sequence[dict[str, float]]]) -> dict[str, float]:
    """Medians over repeats of the whole run's shares of compute (every round, as
    ``federation_overhead`` counts them, and rounds 2..R): the accounting (accountant and
    ledger), and the accountant alone."""

    def share(run: Sequence[dict[str, float]], key: str, first: int) -> float:
        later = run[first:]
        return sum(r[key] for r in later) / sum(r["train_s"] + r["evaluate_s"] for r in later)

    return {
        "accounting_share": statistics.median(share(run, "accounting_s", 0) for run in runs),
        "epsilon_share": statistics.median(share(run, "epsilon_s", 0) for run in runs),
        "epsilon_share_after_round_1": statistics.median(
            share(run, "epsilon_s", 2) for run in runs
        ),
        "accounting_share_after_round_1": statistics.median(
            share(run, "accounting_s", 2) for run in runs
        ),
    }


# --------------------------------------------------------------------------- ledger age

#: Earlier charges in the ledger (train + evaluation per round of 10-round runs) before the
#: timed rounds: a new site, and one after five such runs.
LEDGER_AGES = (0, 100)


def _round_reads(ledger: Any, key: str, run_id: str, rnd: int) -> None:
    """A round's reads of its run's charges, as that ledger's version of
    ``client/local.py`` makes them: one ``charges(key, run_id=...)`` where the ledger has it,
    else (before it) ``has_charge`` and two reads of every charge of the key, filtered."""
    if "run_id" in inspect.signature(ledger.charges).parameters:
        ledger.charges(key, run_id=run_id)
        return
    ledger.has_charge(key, run_id, rnd)
    for _ in range(2):
        [c for c in ledger.charges(key) if c.run_id == run_id]


def time_ledger_age(
    ledgers: dict[str, ModuleType], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, dict[str, float]]:
    """Per ledger age (:data:`LEDGER_AGES`) and version: median ms of one site-round's
    ledger work (its reads, the charge, the completion) on a 300-patient cohort, with every
    ε already in the memo (computed once, untimed): the SQLite and Python alone. The
    versions alternate per round."""
    mech, release = M(1.0, 0.32, 4), M(5.0, 1.0, 1)
    out: dict[str, dict[str, float]] = {}
    rounds = max(repeats, 3) + 2
    with tempfile.TemporaryDirectory(prefix="fedcare-ledger-age-") as tmp:
        for age in LEDGER_AGES:
            old = age // 2
            for r in range(rounds + 1):  # every ε the timed rounds ask, untimed
                history = [M(1.0, 0.32, 4 * (old + r))] if old + r else []
                current.epsilon(history + ([M(5.0, 1.0, old)] if old else []), delta=DELTA)
            opened = {}
            for label, module in ledgers.items():
                ledger = module.PrivacyLedger(Path(tmp) / f"{label}-{age}.sqlite")
                key = ledger.cohort_key([f"p{i}" for i in range(300)])
                for i in range(old):
                    for m, kind in ((mech, "train"), (release, "evaluate")):
                        receipt = ledger.charge(
                            fingerprint=key, budget_epsilon=1e9, delta=DELTA, accountant="prv",
                            mechanism=m, run_id=f"old-{i // 10}", round=i % 10, kind=kind,
                        )  # fmt: skip
                        ledger.mark_completed(receipt.charge_id)
                opened[label] = (ledger, key)
            samples: dict[str, list[float]] = {label: [] for label in ledgers}
            for r in range(rounds):
                for label, (ledger, key) in opened.items():
                    t = clock()
                    _round_reads(ledger, key, "new", r)
                    receipt = ledger.charge(
                        fingerprint=key, budget_epsilon=1e9, delta=DELTA, accountant="prv",
                        mechanism=mech, run_id="new", round=r,
                    )  # fmt: skip
                    ledger.mark_completed(receipt.charge_id)
                    if r >= 2:  # the first rounds warm the connection and statement cache
                        samples[label].append(1e3 * (clock() - t))
            for ledger, _ in opened.values():
                ledger.close()
            out[f"{age} earlier charges"] = {
                label: statistics.median(v) for label, v in samples.items()
            }
    return out


# --------------------------------------------------------------------------- report


def _summary(result: dict[str, Any]) -> str:
    labels = result["versions"]
    lines = [
        f"ε per call, ms on the {result['clock']} clock (median of {result['repeats']}, caches "
        "emptied):"
    ]
    for name, row in result["epsilon"].items():
        cells = "  ".join(f"{v} {row[v]['ms']:8.1f} (ε {row[v]['epsilon']:.6f})" for v in labels)
        lines.append(f"  {name:44s} {cells}")
    lines.append("calibration per call, ms (ε computed):")
    for name, row in result["calibration"].items():
        cells = "  ".join(
            f"{v} {row[v]['ms']:8.1f} ({row[v]['epsilons_computed']:2d}, σ {row[v]['sigma']:.4f})"
            for v in labels
        )
        lines.append(f"  {name:44s} {cells}")
    lines.append(
        "a round: accounting ms (of which the accountant) / compute ms (share), median over "
        "repeats:"
    )
    for v in labels:
        rounds = result["rounds"][v]["rounds"]
        cells = "  ".join(
            f"r{r['round']} {r['accounting_ms']:.1f} ({r['epsilon_ms']:.1f})/{r['compute_ms']:.1f} "
            f"({100 * r['accounting_share']:.0f} %)"
            for r in rounds
        )
        lines.append(f"  {v:9s} {cells}")
        run = result["rounds"][v]["run"]
        lines.append(
            f"            whole run: accounting {100 * run['accounting_share']:.1f} % of compute "
            f"({100 * run['accounting_share_after_round_1']:.1f} % over rounds 2..R), the "
            f"accountant alone {100 * run['epsilon_share']:.1f} % "
            f"({100 * run['epsilon_share_after_round_1']:.1f} %)"
        )
        timed = result["rounds"][v]["parts_ms"]
        lines.append(
            "            "
            + ", ".join(f"{name} {ms:.0f} ms/{calls:.0f}" for name, (calls, ms) in timed.items())
        )
    if "ledger_age" in result:
        lines.append("a site-round's ledger work (reads, charge, completion; ε memoised), ms:")
        for name, row in result["ledger_age"].items():
            cells = "  ".join(f"{v} {row[v]:6.2f}" for v in labels)
            lines.append(f"  {name:44s} {cells}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accounting", description=__doc__)
    parser.add_argument("--baseline", default=None, help="git revision to compare against")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-repeats", type=int, default=3)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or this process's CPU seconds (steadier on a busy machine; blind "
        "to the ledger's fsync waits)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    clock = CLOCKS[args.clock]
    if min(args.repeats, args.sites, args.rounds, args.round_repeats) < 1:
        print("--repeats, --sites, --rounds and --round-repeats must be >= 1", file=sys.stderr)
        return 2
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import torch

    torch.set_num_threads(1)  # as a Ray client actor (OMP_NUM_THREADS=1)
    versions: dict[str, ModuleType] = {}
    ledgers: dict[str, ModuleType] = {}
    locals_: dict[str, ModuleType] = {}
    if args.baseline:
        versions[args.baseline] = load_revision(args.baseline)
        ledgers[args.baseline] = load_ledger_revision(args.baseline)
        locals_[args.baseline] = load_local_revision(args.baseline)
    versions["checkout"] = current
    for module in versions.values():  # first use imports Opacus and SciPy: not timed
        module.epsilon([M(1.0, 0.05, 20)], delta=DELTA)
    loadavg = {"start": [round(x, 2) for x in os.getloadavg()]}
    result: dict[str, Any] = {
        "versions": list(versions),
        "repeats": args.repeats,
        "delta": DELTA,
        "cpus": len(os.sched_getaffinity(0)),
        "clock": args.clock,
        "epsilon": time_epsilon(versions, args.repeats, clock),
        "calibration": time_calibration(versions, args.repeats, clock),
        "round_settings": {
            "task": "readmission",
            "sites": args.sites,
            "patients_per_site": args.patients,
            "rounds": args.rounds,
            "repeats": args.round_repeats,
            "target_epsilon": 8.0,
            "accountant": "prv",
        },
        "rounds": time_rounds(
            versions,
            sites=args.sites,
            patients=args.patients,
            rounds=args.rounds,
            repeats=args.round_repeats,
            clock=clock,
            ledgers=ledgers,
            locals_=locals_,
        ),
    }
    import fedcare.client.ledger as client_ledger

    result["ledger_age"] = time_ledger_age(
        {label: ledgers.get(label, client_ledger) for label in versions}, args.repeats, clock
    )
    loadavg["end"] = [round(x, 2) for x in os.getloadavg()]
    result["loadavg"] = loadavg
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(_summary(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
