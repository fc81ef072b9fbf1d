"""What a simulated federation costs beyond its local training: wall time over pure compute.

For each task (default: ``readmission``, EHR only, and ``multimodal_outcome``, EHR + imaging
+ genomics) this

1. synthesizes ``--sites`` hospitals (not timed in the ratio; shown apart) and runs
   :func:`simulations.runner.run_experiment` on them (baselines off) -- fedcare's ServerApp
   and ClientApp under ``flwr run`` on a local simulation SuperLink with Ray -- while

   * wrappers around the runner's SuperLink handle (this process only, no library change)
     time the SuperLink start, ``flwr run`` (submit), ``wait`` and the teardown, and every
     ``flwr`` CLI call (wall and, from ``RUSAGE_CHILDREN``, exact CPU seconds);
   * a thread timestamps each ``progress.jsonl`` line as it appears (round 0 = initial
     evaluation done), whose ``elapsed_s`` also dates the ServerApp's strategy start;
   * :class:`benchmarks.scale.ProcessTreeSampler` adds up the CPU seconds of every process
     of the run by kind (SuperLink, SuperExec, ``flwr-simulation``, Ray daemons, the Ray
     client actors that run the ClientApp);

2. replays the same federation **in this process, sequentially**: the same site folders, the
   same run id, seeds, DP plan (a fresh ledger, as the simulation's was), the same messages
   (round 0 evaluation, then per round: every site's ``SiteTrainer.train_round`` on the
   global model, patient-weighted FedAvg, every site's ``SiteTrainer.evaluate``). Only
   ``train_round`` + ``evaluate`` are the *pure compute*; data loading is timed apart, both
   once per site and as the simulation's ClientApp pays it: a fresh ``load_site``, feature
   encoding and ledger open on **every** message. Timing wrappers split the compute into
   DP-SGD (``fit``), Opacus set-up (``make_private``), privacy accounting
   (``calibrate_noise``, the ledger's ``charge`` and the other ledger calls), storing the
   release, and evaluation (``predict``). The final global test AUROC of both must agree
   (same seeds), which checks that the replay did the simulation's work.

3. with ``--compare-poll S`` (default 5), runs the simulation once more with the runner
   polling every ``S`` seconds instead of the library's period (fresh ledgers, so the same
   work). Since issue 14 a poll is a Control API request in the runner's process, not a
   ``flwr ls`` process, so the ``flwr ls`` columns stay at 0.

The ratio is ``run_experiment`` wall time / pure compute. The simulation runs its client
apps in parallel (Ray gives each 1 of the machine's CPUs and ``OMP_NUM_THREADS=1``); the
replay runs them one after another with ``--threads`` torch threads (default 1, as the
actors; 2 threads on a shared, busy 2-core machine made the replay up to 10x slower and
erratic).

Run from the repository root (``-m`` puts it first on ``sys.path``; opacus ships a top-level
package also named ``benchmarks``)::

    .venv/bin/python -m benchmarks.federation_overhead          # 3 sites x 3 rounds, 2 tasks
    .venv/bin/python -m benchmarks.federation_overhead --tasks readmission --rounds 2

The markdown goes to stdout and to ``--out`` (default
``benchmarks/results/federation_overhead.md``), the raw numbers to ``--json`` if given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import client.accounting as client_accounting
import client.ledger as client_ledger
import client.local as client_local
import simulations.runner as runner
from benchmarks.scale import ProcessTreeSampler, TreeStats, machine_info
from client.data.datasets import build_task_data
from client.data.loaders import load_site
from client.ledger import PrivacyLedger
from client.local import RoundRequest, SiteTrainer, settings_from_run
from client.policy import simulated_site_policy
from common.federation import FederationConfig
from server.app import federation_spec, initial_state
from server.guard import weighted_global_metrics
from simulations.scenario import Scenario
from simulations.synth import SynthConfig, synthesize

__all__ = [
    "Timers",
    "SimMeasurement",
    "ComputeMeasurement",
    "TaskResult",
    "measure_simulation",
    "measure_compute",
    "run_task",
    "render_markdown",
    "main",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "federation_overhead.md"
TASKS = ("readmission", "multimodal_outcome")
GOAL_RATIO = 1.2


# --------------------------------------------------------------------------- timing helpers


class Timers:
    """Named lists of durations (seconds), filled by :meth:`wrap`-ped callables."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = {}

    def add(self, name: str, seconds: float) -> None:
        self.calls.setdefault(name, []).append(seconds)

    def total(self, name: str) -> float:
        return float(sum(self.calls.get(name, [])))

    def count(self, name: str) -> int:
        return len(self.calls.get(name, []))

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t)

        return timed

    @contextlib.contextmanager
    def patch(self, owner: object, attribute: str, name: str | None = None) -> Iterator[None]:
        """Replace ``owner.attribute`` by a timed wrapper while the block runs."""
        original = getattr(owner, attribute)
        setattr(owner, attribute, self.wrap(name or attribute, original))
        try:
            yield
        finally:
            setattr(owner, attribute, original)


# --------------------------------------------------------------------------- the simulation


@dataclass
class FlwrCall:
    """One ``flwr`` CLI call of the runner: sub-command, wall and CPU seconds."""

    command: str
    wall_s: float
    cpu_s: float


@dataclass
class SimMeasurement:
    """Timestamps (seconds from the call of ``run_experiment``) and costs of one run.

    ``progress`` holds, per ``progress.jsonl`` line, the round, the ServerApp's
    ``elapsed_s`` and when this process saw the line.
    """

    wall_s: float
    marks: dict[str, float]
    progress: list[dict[str, float]]
    flwr_calls: list[FlwrCall]
    tree: TreeStats
    final_metrics: dict[str, float]
    rounds_completed: int
    loadavg_after: list[float]

    def cli_totals(self) -> dict[str, tuple[int, float, float]]:
        """Per sub-command: calls, wall seconds, CPU seconds."""
        out: dict[str, tuple[int, float, float]] = {}
        for c in self.flwr_calls:
            n, w, u = out.get(c.command, (0, 0.0, 0.0))
            out[c.command] = (n + 1, w + c.wall_s, u + c.cpu_s)
        return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class _ProgressWatcher:
    """Timestamps each new line of ``progress.jsonl`` (polls every ``poll_s``)."""

    def __init__(self, path: Path, t0: float, poll_s: float = 0.05) -> None:
        self.path, self.t0, self.poll_s = path, t0, poll_s
        self.lines: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress-watcher", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._read()
            self._stop.wait(self.poll_s)
        self._read()

    def _read(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError:
            return
        complete = [line for line in text.split("\n")[:-1] if line.strip()]
        now = time.monotonic() - self.t0
        for line in complete[len(self.lines) :]:
            entry = json.loads(line)
            self.lines.append(
                {"round": entry["round"], "elapsed_s": entry["elapsed_s"], "seen_s": now}
            )

    def __enter__(self) -> _ProgressWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure_simulation(
    scenario: Scenario, out: Path, *, interval_s: float = 0.5, poll_s: float | None = None
) -> SimMeasurement:
    """Run ``run_experiment`` with timing wrappers around its SuperLink (see module doc).

    ``poll_s`` overrides the runner's ``flwr ls`` polling period (to measure what a
    slower poll would save); ``None`` keeps the library's.
    """
    marks: dict[str, float] = {}
    calls: list[FlwrCall] = []
    original_link = runner.local_superlink
    t0, wall_t0 = time.monotonic(), time.time()

    def mark(name: str) -> None:
        marks[name] = time.monotonic() - t0

    @contextlib.contextmanager
    def timed_link(**kwargs: Any) -> Iterator[Any]:
        mark("link_start")
        with original_link(**kwargs) as handle:
            mark("link_ready")
            flwr, submit, wait = handle._flwr, handle.submit, handle.wait

            def timed_flwr(*args: str) -> Any:
                cpu, t = _children_cpu(), time.perf_counter()
                try:
                    return flwr(*args)
                finally:
                    calls.append(FlwrCall(args[0], time.perf_counter() - t, _children_cpu() - cpu))

            def timed_submit(*args: Any, **kw: Any) -> Any:
                mark("submit_start")
                try:
                    return submit(*args, **kw)
                finally:
                    mark("submitted")

            def timed_wait(*args: Any, **kw: Any) -> Any:
                if poll_s is not None:
                    kw["poll_s"] = poll_s
                try:
                    return wait(*args, **kw)
                finally:
                    mark("wait_done")

            handle._flwr = timed_flwr  # type: ignore[method-assign]
            handle.submit = timed_submit  # type: ignore[method-assign]
            handle.wait = timed_wait  # type: ignore[method-assign]
            try:
                yield handle
            finally:
                mark("teardown_start")
        mark("link_stopped")

    out.mkdir(parents=True, exist_ok=True)
    (out / "progress.jsonl").unlink(missing_ok=True)
    sampler = ProcessTreeSampler(os.getpid(), interval_s=interval_s, pss=False)
    runner.local_superlink = timed_link  # type: ignore[assignment]
    try:
        sampler.start()
        with _ProgressWatcher(out / "progress.jsonl", t0) as watcher:
            outcome = runner.run_experiment(scenario, out)
            wall = time.monotonic() - t0
    finally:
        runner.local_superlink = original_link  # type: ignore[assignment]
        tree = sampler.stop()
    sampler.leftover()
    final = dict(outcome.summary.global_.final)
    # The ServerApp writes server_record.json last; from then on the run only shuts down.
    record_mtime = (out / "server_record.json").stat().st_mtime
    marks["record_written"] = record_mtime - wall_t0
    return SimMeasurement(
        wall_s=wall,
        marks=marks,
        progress=watcher.lines,
        flwr_calls=calls,
        tree=tree,
        final_metrics=final,
        rounds_completed=outcome.summary.rounds_completed,
        loadavg_after=[round(x, 2) for x in os.getloadavg()],
    )


# --------------------------------------------------------------------------- the replay


@dataclass
class ComputeMeasurement:
    """The sequential in-process replay: seconds by part, and its final global metrics.

    ``rounds`` has, per round (0 = initial evaluation), the seconds of training and of
    evaluation summed over the sites.
    """

    load_once_s: float
    encode_once_s: float
    ledger_open_once_s: float
    reload_per_message_s: dict[str, float]
    messages: int
    train_s: float
    evaluate_s: float
    aggregate_s: float
    parts: dict[str, tuple[int, float]]
    rounds: list[dict[str, float]]
    final_metrics: dict[str, float]
    cpu_s: float
    pure_cpu_s: float
    torch_threads: int

    @property
    def pure_s(self) -> float:
        return self.train_s + self.evaluate_s

    @property
    def bookkeeping_s(self) -> float:
        """Privacy accounting and release storage inside ``train_round``."""
        keys = ("calibrate_noise", "store release", *(f"ledger.{n}" for n in _TIMED_LEDGER))
        return sum(self.parts.get(k, (0, 0.0))[1] for k in keys)

    @property
    def reload_s(self) -> float:
        """What the simulation's ClientApp spends loading: every message reloads its site."""
        return self.messages * sum(self.reload_per_message_s.values())


def _round_request(cfg: FederationConfig, run_id: str, rnd: int) -> RoundRequest:
    """The request ``client.app`` builds from the run config and the server's message."""
    train, dp = settings_from_run(cfg)
    return RoundRequest(
        run_id=run_id,
        round=rnd,
        rounds_planned=cfg.num_server_rounds,
        task=cfg.task,
        train=train,
        dp=dp,
    )


def fedavg(
    states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts (what Flower's FedAvg does with ``num-examples``)."""
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for name, first in states[0].items():
        acc = torch.zeros_like(first, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            acc += float(weight) * state[name].double()
        out[name] = (acc / total).to(first.dtype)
    return out


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


_TIMED_FUNCTIONS = ("calibrate_noise", "fit", "make_private", "predict")
_TIMED_LEDGER = ("charge", "mark_completed", "has_charge", "charges", "history")


def measure_compute(
    folders: Sequence[Path],
    cfg: FederationConfig,
    *,
    run_id: str,
    state_root: Path,
    reload_repeats: int = 3,
) -> ComputeMeasurement:
    """Replay the federation in this process, sequentially (see the module docstring)."""
    timers = Timers()
    cpu0 = time.process_time()
    # Loading, once per site (not pure compute).
    t = time.perf_counter()
    sites = [load_site(f) for f in folders]
    load_once = time.perf_counter() - t
    t = time.perf_counter()
    ledgers = []
    for site in sites:
        (state_root / site.spec.site_id).mkdir(parents=True, exist_ok=True)
        ledgers.append(PrivacyLedger(state_root / site.spec.site_id / "ledger.sqlite"))
    ledger_open = time.perf_counter() - t
    trainers = [
        SiteTrainer(site=s, policy=simulated_site_policy(cfg), ledger=ledger, seed=cfg.seed)
        for s, ledger in zip(sites, ledgers, strict=True)
    ]
    t = time.perf_counter()
    for trainer in trainers:
        trainer.task_data(cfg.task)
    encode_once = time.perf_counter() - t
    # What the ClientApp redoes on every message (client.app._trainer + task_data).
    run_config = cfg.to_run_config()
    scratch = state_root / "_reload"
    scratch.mkdir(parents=True, exist_ok=True)

    def site_mean(make: Callable[[int], Callable[[], object]]) -> float:
        return statistics.fmean(_median_s(make(i), reload_repeats) for i in range(len(sites)))

    reload = {
        "run config": site_mean(lambda i: lambda: FederationConfig.from_run_config(run_config)),
        "load_site": site_mean(lambda i: lambda: load_site(folders[i])),
        "encode": site_mean(lambda i: lambda: build_task_data(sites[i], cfg.task)),
        "ledger open": site_mean(lambda i: lambda: PrivacyLedger(scratch / "ledger.sqlite")),
    }

    spec = federation_spec(cfg)
    _, state = initial_state(cfg, spec)
    rounds: list[dict[str, float]] = []
    final: dict[str, float] = {}
    train_s = evaluate_s = aggregate_s = pure_cpu = 0.0
    with contextlib.ExitStack() as stack:
        for name in _TIMED_FUNCTIONS:
            stack.enter_context(timers.patch(client_local, name))
        # Nested inside calibrate_noise and ledger.charge: how many PRV evaluations they run.
        stack.enter_context(timers.patch(client_accounting, "epsilon", "calibration epsilon"))
        stack.enter_context(timers.patch(client_ledger, "epsilon", "ledger epsilon"))
        for name in _TIMED_LEDGER:
            stack.enter_context(timers.patch(PrivacyLedger, name, f"ledger.{name}"))
        stack.enter_context(timers.patch(SiteTrainer, "_store_release", "store release"))
        for rnd in range(cfg.num_server_rounds + 1):
            row = {"round": float(rnd), "train_s": 0.0, "evaluate_s": 0.0}
            if rnd > 0:
                request = _round_request(cfg, run_id, rnd)
                results = []
                for trainer in trainers:
                    t, cpu = time.perf_counter(), time.process_time()
                    results.append(trainer.train_round(request, state))
                    row["train_s"] += time.perf_counter() - t
                    pure_cpu += time.process_time() - cpu
                t = time.perf_counter()
                state = fedavg([r.state for r in results], [r.n_train for r in results])
                aggregate_s += time.perf_counter() - t
            per_site = {}
            for trainer in trainers:
                t, cpu = time.perf_counter(), time.process_time()
                per_site[trainer.site_id] = trainer.evaluate(
                    cfg.task, state, model=cfg.model or None, device=cfg.device
                )
                row["evaluate_s"] += time.perf_counter() - t
                pure_cpu += time.process_time() - cpu
            final = weighted_global_metrics(per_site)
            train_s += row["train_s"]
            evaluate_s += row["evaluate_s"]
            rounds.append(row)
    parts = {name: (timers.count(name), timers.total(name)) for name in timers.calls}
    return ComputeMeasurement(
        load_once_s=load_once,
        encode_once_s=encode_once,
        ledger_open_once_s=ledger_open,
        reload_per_message_s=reload,
        messages=len(folders) * (2 * cfg.num_server_rounds + 1),
        train_s=train_s,
        evaluate_s=evaluate_s,
        aggregate_s=aggregate_s,
        parts=parts,
        rounds=rounds,
        final_metrics=final,
        cpu_s=time.process_time() - cpu0,
        pure_cpu_s=pure_cpu,
        torch_threads=torch.get_num_threads(),
    )


# --------------------------------------------------------------------------- one task


@dataclass
class TaskResult:
    """The simulation and its replay, for one task."""

    task: str
    sites: int
    rounds: int
    patients_per_site: int
    local_epochs: int
    synth_s: float
    client_import_s: float
    sim: SimMeasurement
    compute: ComputeMeasurement
    loadavg: dict[str, list[float]] = field(default_factory=dict)
    slow_poll: SimMeasurement | None = None
    slow_poll_s: float | None = None

    @property
    def ratio(self) -> float:
        return self.sim.wall_s / self.compute.pure_s

    @property
    def ratio_without_bookkeeping(self) -> float:
        """Wall over DP-SGD + evaluation alone (accounting counted as overhead)."""
        return self.sim.wall_s / (self.compute.pure_s - self.compute.bookkeeping_s)

    def round_walls(self) -> dict[int, float]:
        """Wall seconds of each completed round r >= 1 of the simulation."""
        seen = {int(p["round"]): p["seen_s"] for p in self.sim.progress}
        return {r: seen[r] - seen[r - 1] for r in range(1, self.rounds + 1) if r in seen}

    def fixed_and_per_round(self) -> tuple[float, float]:
        """``(F, k)``: wall ~ F + k * compute of rounds >= 1 (see :func:`render_markdown`)."""
        walls = self.round_walls()
        compute = sum(
            self.compute.rounds[r]["train_s"] + self.compute.rounds[r]["evaluate_s"] for r in walls
        )
        k = sum(walls.values()) / compute
        fixed = self.sim.wall_s - sum(walls.values()) - self.compute.rounds[0]["evaluate_s"]
        return fixed, k


def _import_time() -> float:
    """Seconds a fresh interpreter takes to import the ClientApp (what each actor pays)."""
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import client.app"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - t


def run_task(
    task: str,
    *,
    sites: int,
    rounds: int,
    patients: int,
    work: Path,
    seed: int = 0,
    interval_s: float = 0.5,
    compare_poll_s: float | None = None,
) -> TaskResult:
    """Synthesize, simulate, replay; see the module docstring.

    With ``compare_poll_s``, the simulation runs a second time with the runner polling
    ``flwr ls`` every ``compare_poll_s`` seconds (a fresh ledger each time, so both runs do
    the same work).
    """
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    folders = synthesize(
        work / "sites",
        n_sites=sites,
        seed=seed,
        config=SynthConfig(patients_per_site=patients),
        force=True,
    )
    synth_s = time.perf_counter() - t

    def scenario(tag: str) -> Scenario:
        # Each simulation keeps its sites' ledgers apart: a second run with the same run id
        # on the same ledger would replay the stored releases instead of training.
        return Scenario(
            name=f"overhead-{task}",
            seed=seed,
            data_root=str(work / "sites"),
            baselines=False,
            federation={
                "task": task,
                "num-server-rounds": rounds,
                "state-root": str(work / f"state-{tag}"),
            },
        )

    loadavg = {"before simulation": [round(x, 2) for x in os.getloadavg()]}
    sim = measure_simulation(scenario("sim"), work / "run", interval_s=interval_s)
    loadavg["after simulation"] = sim.loadavg_after
    cfg = FederationConfig.from_run_config(
        json.loads((work / "run" / "server_record.json").read_text())["config"]
    )
    compute = measure_compute(folders, cfg, run_id=cfg.run_id, state_root=work / "replay-state")
    loadavg["after replay"] = [round(x, 2) for x in os.getloadavg()]
    slow_poll = None
    if compare_poll_s is not None:
        slow_poll = measure_simulation(
            scenario("slow-poll"),
            work / "run-slow-poll",
            interval_s=interval_s,
            poll_s=compare_poll_s,
        )
        loadavg["after slow-poll simulation"] = slow_poll.loadavg_after
    return TaskResult(
        task=task,
        sites=sites,
        rounds=rounds,
        patients_per_site=patients,
        local_epochs=cfg.local_epochs,
        synth_s=synth_s,
        client_import_s=_import_time(),
        sim=sim,
        compute=compute,
        loadavg=loadavg,
        slow_poll=slow_poll,
        slow_poll_s=compare_poll_s,
    )


# --------------------------------------------------------------------------- report


def _breakdown(r: TaskResult) -> list[tuple[str, float, str]]:
    """Wall-time segments of the run: (segment, seconds, what is in it)."""
    m, c, sim = r.sim.marks, r.compute, r.sim
    seen = {int(p["round"]): p for p in sim.progress}
    rows: list[tuple[str, float, str]] = []
    rows.append(("load + validate sites, write config", m["link_start"], "runner, before Flower"))
    rows.append(("SuperLink start (until /health)", m["link_ready"] - m["link_start"], ""))
    rows.append(("`flwr run` submit", m["submitted"] - m["submit_start"], "builds FAB, CLI"))
    if 0 in seen:
        strategy_start = seen[0]["seen_s"] - seen[0]["elapsed_s"]
        rows.append(
            (
                "submit -> strategy start",
                strategy_start - m["submitted"],
                "SuperExec, flwr-simulation, Ray start, ServerApp import, sites connected",
            )
        )
        round0 = c.rounds[0]["evaluate_s"]
        rows.append(
            (
                "round 0 (initial evaluation)",
                seen[0]["seen_s"] - strategy_start,
                f"replay compute {round0:.2f} s; rest: Ray actors start, import ClientApp",
            )
        )
        last = 0
        for rnd in range(1, r.rounds + 1):
            if rnd not in seen:
                break
            comp = c.rounds[rnd]["train_s"] + c.rounds[rnd]["evaluate_s"]
            rows.append(
                (
                    f"round {rnd} (train + evaluate)",
                    seen[rnd]["seen_s"] - seen[rnd - 1]["seen_s"],
                    f"replay compute {comp:.2f} s",
                )
            )
            last = rnd
        rows.append(
            (
                "last round -> server_record.json written",
                max(0.0, m["record_written"] - seen[last]["seen_s"]),  # watcher lag
                "ServerApp: final model + record",
            )
        )
        rows.append(
            (
                "record written -> runner's wait returns",
                m["wait_done"] - m["record_written"],
                "ServerApp writes summary.json; next Control API poll (in-process) sees it",
            )
        )
    rows.append(
        (
            "teardown (end the run, stop SuperLink family)",
            m["link_stopped"] - m["wait_done"],
            "SIGKILL flwr-simulation + Ray (end_run), then SuperLink + SuperExec",
        )
    )
    rows.append(("summary, metrics.csv, plots", sim.wall_s - m["link_stopped"], "runner"))
    return rows


def render_markdown(results: Sequence[TaskResult], machine: dict[str, Any]) -> str:
    """The report: machine line, headline table, breakdowns, and where the time goes."""
    m = machine
    lines = [
        "# Federation overhead: simulated run vs. its pure local compute",
        "",
        f"Machine: {m['machine']}, {m['nproc']} CPUs ({m['available_cpus']} available), "
        f"python {m['python']}, torch {m['torch']}, flwr {m['flwr']}, ray {m['ray']}, "
        f"opacus {m['opacus']}; load average {m['loadavg_start']} at start, "
        f"{m.get('loadavg_end')} at end; {m['date']}. The machine is shared: other jobs ran "
        "beside this one, so single timings carry noise of some 10-30 %.",
        "",
    ]
    if not results:
        return "\n".join(lines)
    r0 = results[0]
    lines += [
        f"Settings: {r0.sites} synthetic sites x {r0.rounds} rounds, "
        f"{r0.patients_per_site} patients per site (mean), {r0.local_epochs} local epochs, "
        "batch 64, DP-SGD at target epsilon 8 (PRV), FedAvg, federated evaluation of every "
        "site every round (and round 0), baselines off. Pure compute = the same "
        "`SiteTrainer.train_round` + `SiteTrainer.evaluate` calls replayed sequentially in "
        f"one process with {r0.compute.torch_threads} torch thread(s) (same run id, seeds "
        "and DP plan; the equal final AUROC checks it); the simulation runs 2 client "
        "actors in parallel (1 CPU and 1 thread each). Synthesis is excluded from both.",
        "",
        "| task | run_experiment wall s | pure compute s (train_round + evaluate) | ratio "
        f"(goal <= {GOAL_RATIO}) | of which accounting s | ratio to DP-SGD + eval only | "
        "fixed overhead F s | per-round factor k | compute for ratio 1.2 | "
        "data loading once s | reload per message s | final test AUROC sim / replay |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        c = r.compute
        once = c.load_once_s + c.encode_once_s + c.ledger_open_once_s
        per_msg = sum(c.reload_per_message_s.values())
        auc = (
            f"{r.sim.final_metrics.get('test.auroc', float('nan')):.4f} / "
            f"{c.final_metrics.get('test.auroc', float('nan')):.4f}"
        )
        fixed, k = r.fixed_and_per_round()
        needed = f"{fixed / (GOAL_RATIO - k):,.0f} s" if k < GOAL_RATIO else "never (k >= 1.2)"
        lines.append(
            f"| {r.task} | {r.sim.wall_s:.1f} | {c.pure_s:.2f} | **{r.ratio:.1f}** | "
            f"{c.bookkeeping_s:.2f} | {r.ratio_without_bookkeeping:.1f} | {fixed:.1f} | "
            f"{k:.2f} | {needed} | {once:.2f} | {per_msg:.3f} | {auc} |"
        )
    lines += [
        "",
        "F = wall time outside rounds 1..R minus the replay's round-0 compute (start-up, "
        "round-0 cold start, finish, teardown, runner); k = simulated round wall / replayed "
        "round compute over rounds 1..R. A run whose compute is C takes about F + k*C, so "
        f"the ratio reaches {GOAL_RATIO} once C >= F / ({GOAL_RATIO} - k).",
    ]
    polled = [r for r in results if r.slow_poll is not None]
    if polled:
        lines += [
            "",
            "Measured fix 1: the same simulation (fresh ledgers, same work) with the runner "
            f"polling `flwr ls` every {polled[0].slow_poll_s:g} s instead of 0.5 s "
            "(a benchmark-side override of `SuperLinkHandle.wait(poll_s=...)`):",
            "",
            "| task | poll s | wall s | `flwr ls` calls | `flwr ls` CPU s | all processes CPU s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in polled:
            assert r.slow_poll is not None
            for poll, sim in ((0.5, r.sim), (r.slow_poll_s, r.slow_poll)):
                n, _, cpu = sim.cli_totals().get("ls", (0, 0.0, 0.0))
                total = (
                    sum(sim.tree.cpu_s.values())
                    - sim.tree.cpu_s.get("flwr CLI (run/ls)", 0.0)
                    + sum(u for _, _, u in sim.cli_totals().values())
                )
                lines.append(
                    f"| {r.task} | {poll:g} | {sim.wall_s:.1f} | {n} | {cpu:.1f} | {total:.1f} |"
                )
    for r in results:
        c, sim = r.compute, r.sim
        lines += [
            "",
            f"## {r.task}: where the {sim.wall_s:.1f} s go",
            "",
            "| segment | wall s | share | note |",
            "|---|---:|---:|---|",
        ]
        for name, seconds, note in _breakdown(r):
            lines.append(
                f"| {name} | {seconds:.2f} | {seconds / sim.wall_s * 100:.0f} % | {note} |"
            )
        lines += [
            "",
            "Pure compute, by part (replay, summed over sites and rounds):",
            "",
            "| part | calls | s |",
            "|---|---:|---:|",
            f"| train_round (all of it) | {r.sites * r.rounds} | {c.train_s:.2f} |",
        ]
        labels = {
            "fit": "  DP-SGD training loop (`fit`)",
            "make_private": "  Opacus set-up (`make_private`)",
            "calibrate_noise": "  noise calibration (`calibrate_noise`, PRV)",
            "calibration epsilon": "    of which PRV epsilon evaluations",
            "ledger.charge": "  ledger `charge` (PRV epsilon before and after the round)",
            "ledger epsilon": "    of which PRV epsilon evaluations",
            "ledger.mark_completed": "  ledger `mark_completed`",
            "ledger.has_charge": "  ledger `has_charge` (replay check)",
            "ledger.charges": "  ledger `charges`",
            "ledger.history": "  ledger `history`",
            "store release": "  store release (torch.save)",
        }
        for key, label in labels.items():
            if key in c.parts:
                n, s = c.parts[key]
                lines.append(f"| {label} | {n} | {s:.3f} |")
        lines.append(f"| evaluate (all of it) | {r.sites * (r.rounds + 1)} | {c.evaluate_s:.2f} |")
        if "predict" in c.parts:
            n, s = c.parts["predict"]
            lines.append(f"|   `predict` | {n} | {s:.3f} |")
        lines.append(
            f"| FedAvg in the replay (not in pure compute) | {r.rounds} | {c.aggregate_s:.3f} |"
        )
        reload = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in c.reload_per_message_s.items())
        lines += [
            "",
            f"Per-message reload in the ClientApp: {reload}; x {c.messages} messages "
            f"= {c.reload_s:.2f} s of client work the replay does once ("
            f"{c.load_once_s + c.encode_once_s + c.ledger_open_once_s:.2f} s). "
            f"A fresh interpreter imports `client.app` in {r.client_import_s:.1f} s "
            "(each Ray actor pays this once).",
            "",
            "CPU seconds of the simulation's processes (sampled every "
            f"{machine.get('interval_s', 0.5)} s; `flwr` CLI exact):",
            "",
            "| process | CPU s |",
            "|---|---:|",
        ]
        cli = sim.cli_totals()
        for cat, cpu in sorted(sim.tree.cpu_s.items(), key=lambda kv: -kv[1]):
            if cat == "flwr CLI (run/ls)":
                continue
            lines.append(f"| {cat} | {cpu:.1f} |")
        for command, (n, wall, cpu) in sorted(cli.items()):
            lines.append(f"| `flwr {command}` x {n} (wall {wall:.1f} s) | {cpu:.1f} |")
        lines.append(
            f"| replay, whole (for comparison; torch threads {c.torch_threads}) | {c.cpu_s:.1f} |"
        )
        lines.append(f"| replay, train_round + evaluate only | {c.pure_cpu_s:.1f} |")
        lines += ["", *_findings(r)]
    return "\n".join(lines).rstrip() + "\n"


def _findings(r: TaskResult) -> list[str]:
    """The overhead (wall - pure compute) by cause, and the fixes' gains, from the numbers.

    Gains of fixes not measured here are estimates from the measured parts, marked so.
    """
    m, c, sim = r.sim.marks, r.compute, r.sim
    seen = {int(p["round"]): p for p in sim.progress}
    if 0 not in seen or r.rounds not in seen:
        return []
    strategy_start = seen[0]["seen_s"] - seen[0]["elapsed_s"]
    startup = seen[0]["seen_s"] - m["link_start"] - c.rounds[0]["evaluate_s"]
    finish = m["wait_done"] - seen[r.rounds]["seen_s"]
    around = m["link_start"] + (sim.wall_s - m["wait_done"])
    walls = r.round_walls()
    excess = sum(w - c.rounds[k]["train_s"] - c.rounds[k]["evaluate_s"] for k, w in walls.items())
    overhead = sim.wall_s - c.pure_s
    ls_calls, _, ls_cpu = sim.cli_totals().get("ls", (0, 0.0, 0.0))
    ledger_eps = c.parts.get("ledger epsilon", (0, 0.0))
    calib = c.parts.get("calibrate_noise", (0, 0.0))
    calib_evals = c.parts.get("calibration epsilon", (0, 0.0))
    # With a per-actor cache, each actor still loads each site it serves once.
    actors = len(os.sched_getaffinity(0))
    reload_once = min(c.messages, actors * r.sites) * sum(c.reload_per_message_s.values())
    per_eval = calib_evals[1] / calib_evals[0] if calib_evals[0] else 0.0
    # A round-1 charge's "before" is the empty history (free); the other "before"s repeat
    # the previous charge's "after".
    charges = c.parts.get("ledger.charge", (0, 0.0))[0]
    real_evals = max(1, ledger_eps[0] - r.sites)
    reusable = max(0, charges - r.sites) * ledger_eps[1] / real_evals
    lines = [
        f"Overhead = {sim.wall_s:.1f} - {c.pure_s:.1f} = {overhead:.1f} s wall, by cause:",
        "",
        f"1. Start-up to the end of round 0, less its compute: {startup:.1f} s "
        f"({startup / overhead * 100:.0f} %): SuperLink + submit + Ray start "
        f"{strategy_start - m['link_start']:.1f} s, then the cold start of the Ray client "
        f"actors in round 0 (new worker processes importing `client.app`, "
        f"{r.client_import_s:.1f} s each in a fresh interpreter, and reloading their sites).",
        f"2. Rounds 1..{r.rounds} beyond their compute: {excess:.1f} s "
        f"({excess / overhead * 100:.0f} %), although 2 actors run in parallel: every "
        f"message reloads its site ({sum(c.reload_per_message_s.values()) * 1000:.0f} ms, "
        f"{c.reload_s:.1f} s of actor CPU in all), and the runner's `flwr ls` poll "
        f"({ls_calls} calls, {ls_cpu:.1f} CPU s) competes with the actors for 2 cores.",
        f"3. Finish: last round to the runner's wait returning {finish:.1f} s (the ServerApp "
        "writes its record and summary; the runner's next poll sees them), "
        f"plus {around:.1f} s in the runner before Flower and after it (teardown, summary).",
        "",
        "Inside the pure compute, privacy accounting (PRV) is "
        f"{c.bookkeeping_s:.1f} of {c.pure_s:.1f} s: `calibrate_noise` {calib[1]:.1f} s "
        f"({calib_evals[0]} PRV evaluations at {per_eval:.2f} s) and the ledger's `charge` "
        f"({ledger_eps[0]} PRV evaluations, {ledger_eps[1]:.1f} s: ε before and after each "
        f"round); DP-SGD (`fit`) is {c.parts.get('fit', (0, 0.0))[1]:.1f} s.",
        "",
        "Fixes (not implemented; gains for this run):",
        "",
        "- Runner (done in issue 14): the wait ends at the ServerApp's last write "
        "(`summary.json` after `server_record.json`), each poll is an in-process Control "
        "API request instead of a `flwr ls` process, and the run's simulation and Ray are "
        f"killed at once (`end_run`): record written -> wait returned "
        f"{max(0.0, m['wait_done'] - m['record_written']):.1f} s, teardown "
        f"{m['link_stopped'] - m['wait_done']:.1f} s in this run.",
        "- ClientApp: keep the loaded site and its encoded task data per actor (keyed by "
        "folder and dataset fingerprint) instead of reloading on every message: saves "
        f"~{c.reload_s - reload_once:.1f} of {c.reload_s:.1f} actor CPU s, about "
        f"{(c.reload_s - reload_once) / 2:.1f} s wall on 2 actors (estimate). Loading only "
        "the modalities the task needs (validation reads every image) cuts the rest.",
        "- Ledger: store each charge's ε-after and reuse it as the next charge's ε-before "
        "when no other charge came in between (the history is then the same): saves "
        f"{max(0, charges - r.sites)} of {ledger_eps[0]} PRV evaluations in `charge`, ~"
        f"{reusable:.1f} s (estimate). Calibration: bracket σ with the RDP "
        "accountant (milliseconds) and refine with PRV: ~2 instead of "
        f"{calib_evals[0] / max(1, calib[0]):.0f} PRV evaluations per site, ~"
        f"{max(0.0, calib[1] - 2 * calib[0] * per_eval):.1f} s (estimate).",
        f"- Start-up ({startup:.0f} s) is Flower 1.42's per-run SuperLink + Ray + actor "
        "cold start: fixed per run, so it only amortizes. With F and k as above, the ratio "
        f"{GOAL_RATIO} needs k < {GOAL_RATIO} (the fixes above) and a run of at least "
        f"F / ({GOAL_RATIO} - k) of compute.",
    ]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.federation_overhead", description=__doc__
    )
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma list of tasks")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patients", type=int, default=300, help="mean patients per site")
    parser.add_argument("--interval", type=float, default=0.5, help="CPU sampling period, s")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the replay (Ray gives each client actor OMP_NUM_THREADS=1)",
    )
    parser.add_argument(
        "--compare-poll",
        type=float,
        default=5.0,
        help="also simulate with the runner polling `flwr ls` every this many s (0: skip)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers")
    parser.add_argument("--work", type=Path, default=None, help="keep run folders here")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.sites < 1 or args.rounds < 1 or args.patients < 10 or args.threads < 1 or not tasks:
        print(
            "need --sites >= 1, --rounds >= 1, --patients >= 10, --threads >= 1 and at least "
            "one --tasks",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(args.threads)
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    # Opacus warns on every make_private of the replay (secure RNG off, ghost clipping's
    # backward hooks); both are expected here and would bury the report.
    warnings.filterwarnings(
        "ignore",
        message=r"(Secure RNG turned off|Full backward hook is firing)",
        category=UserWarning,
    )
    machine = machine_info() | {"interval_s": args.interval}
    results = []
    with tempfile.TemporaryDirectory(prefix="fedcare-overhead-") as tmp:
        work = args.work or Path(tmp)
        for task in tasks:
            print(f"[overhead] {task}: simulate, then replay ...", file=sys.stderr, flush=True)
            r = run_task(
                task,
                sites=args.sites,
                rounds=args.rounds,
                patients=args.patients,
                work=work / task,
                interval_s=args.interval,
                compare_poll_s=args.compare_poll or None,
            )
            leftover = r.sim.tree.leftover + (r.slow_poll.tree.leftover if r.slow_poll else [])
            print(
                f"[overhead] {task}: wall {r.sim.wall_s:.1f} s, pure compute "
                f"{r.compute.pure_s:.2f} s, ratio {r.ratio:.1f}, leftover processes "
                f"{len(leftover)}",
                file=sys.stderr,
                flush=True,
            )
            results.append(r)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    markdown = render_markdown(results, machine)
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown, encoding="utf-8")
    raw: dict[str, Any] = {"machine": machine, "results": []}
    for r in results:
        fixed, k = r.fixed_and_per_round()
        raw["results"].append(
            asdict(r)
            | {"ratio": r.ratio, "breakdown": _breakdown(r)}
            | {"fixed_overhead_s": fixed, "per_round_factor": k}
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(raw, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
