"""What a simulated federation costs beyond its local training: wall time over pure compute.

For each task (default: ``readmission``, EHR only, and ``multimodal_outcome``, EHR + imaging
+ genomics) this

1. synthesizes ``--sites`` hospitals (not timed in the ratio; shown apart) and runs
   :func:`fedcare.simulations.runner.run_experiment` on them (baselines off) -- fedcare's ServerApp
   and ClientApp under ``flwr run`` on a local simulation SuperLink with Ray -- while

   * wrappers around the runner's SuperLink handle (this process only, no library change)
     time the SuperLink start, ``flwr run`` (submit), ``wait`` (the runner's in-process
     Control API polls, ended by the ServerApp's last write) and the teardown, and every
     ``flwr`` CLI call (wall and, from ``RUSAGE_CHILDREN``, exact CPU seconds; only the
     submit is one now);
   * a thread timestamps each ``progress.jsonl`` line as it appears (round 0 = initial
     evaluation done), whose ``elapsed_s`` also dates the ServerApp's strategy start;
   * :class:`benchmarks.scale.ProcessTreeSampler` adds up the CPU seconds of every process
     of the run by kind (SuperLink, SuperExec, ``flwr-simulation``, Ray daemons, the Ray
     client actors that run the ClientApp);

2. replays the same federation **in this process, sequentially**: the same site folders, the
   same run id, seeds, DP plan (a fresh ledger, as the simulation's was, and an empty ε memo,
   as a fresh Ray actor's is), the same messages (round 0 evaluation, then per round: every
   site's ``SiteTrainer.train_round`` on the global model, patient-weighted FedAvg, every
   site's ``SiteTrainer.evaluate``). Only ``train_round`` + ``evaluate`` are the *pure
   compute*. Data loading is timed apart, as the simulation's ClientApp pays it: a **cold
   load** of a site (:class:`fedcare.client.warm.WarmSites` loading it, then encoding the task),
   which each Ray actor pays once per site it serves, and per message a **warm hit** (the
   same ``WarmSites.load`` again on the unchanged folder: a stat of every file), the run
   config parsed and the ledger opened. Timing wrappers split the compute into DP-SGD
   (``fit``), Opacus set-up (``make_private``), privacy accounting (``calibrate_noise``,
   the plan's ε check, the ledger's ``charge``, ``spent`` and its other calls; per round,
   so the share of rounds 2..R leaves out round 1's one-off noise calibration), storing the
   release, and evaluation (``predict``). The final global test AUROC of both is reported
   side by side, a check that the replay did the simulation's work: close, but not equal
   (a gap of up to a few hundredths, the same from run to run, not traced here).

3. times, in a fresh interpreter under ``python -X importtime``, what each Ray actor pays
   once on top: importing ``fedcare.client.app``, then the imports the first ``.to(device)``, the
   first ε (Opacus's accountants, and SciPy under them) and the first optimizer step
   (``torch._dynamo``) bring in.

4. runs **Flower's floor** (:func:`measure_floor`, unless ``--no-flower-floor``): the same
   federation (sites, rounds, model arrays, message shape, the runner's SuperLink and shared
   Ray cluster, Flower's FedAvg loop) with the apps of :mod:`benchmarks.flower_floor`, which do
   no fedcare work; its F and its rounds are what Flower and Ray cost alone, and the report
   sets fedcare's run beside it, segment by segment.

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
``benchmarks/results/federation_overhead.md``), the raw numbers to ``--json`` (default: the
``--out`` path with ``.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
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

import numpy as np
import torch

import fedcare.client.accounting as client_accounting
import fedcare.client.ledger as client_ledger
import fedcare.client.local as client_local
import fedcare.simulations.runner as runner
from benchmarks import flower_floor
from benchmarks.scale import ProcessTreeSampler, TreeStats, machine_info
from fedcare.client.data.datasets import build_task_data
from fedcare.client.ledger import PrivacyLedger
from fedcare.client.local import RoundRequest, SiteTrainer, settings_from_run
from fedcare.client.policy import simulated_site_policy
from fedcare.client.warm import WarmSites
from fedcare.common.federation import FederationConfig
from fedcare.common.flower_app import write_app_dir
from fedcare.common.packed_arrays import pack_record
from fedcare.common.run_files import LEDGER_NAME
from fedcare.common.summary import RECORD_NAME
from fedcare.server.app import federation_spec, initial_state
from fedcare.server.guard import weighted_global_metrics
from fedcare.simulations.flower_driver import local_superlink
from fedcare.simulations.ray_cluster import READY_NAME
from fedcare.simulations.scenario import Scenario
from fedcare.simulations.synth import SynthConfig, synthesize

__all__ = [
    "Timers",
    "ActorStart",
    "SimMeasurement",
    "ComputeMeasurement",
    "TaskResult",
    "measure_simulation",
    "measure_floor",
    "measure_compute",
    "measure_actor_start",
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
    """Named lists of durations (seconds), filled by :meth:`wrap`-ped callables.

    ``clock`` is wall time by default; ``time.process_time`` counts this process's CPU
    seconds instead (steadier on a machine other jobs keep busy, blind to I/O waits).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.calls: dict[str, list[float]] = {}
        self.clock = clock

    def add(self, name: str, seconds: float) -> None:
        self.calls.setdefault(name, []).append(seconds)

    def total(self, name: str) -> float:
        return float(sum(self.calls.get(name, [])))

    def count(self, name: str) -> int:
        return len(self.calls.get(name, []))

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, self.clock() - t)

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
    scenario: Scenario, out: Path, *, interval_s: float = 0.5, shared_ray: bool = True
) -> SimMeasurement:
    """Run ``run_experiment`` with timing wrappers around its SuperLink (see module doc).

    ``shared_ray``: the run joins a Ray cluster started beside the SuperLink (fedcare's
    default), or starts its own as Flower does (``local_superlink(shared_ray=False)``).
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
        with original_link(**kwargs, shared_ray=shared_ray) as handle:
            flwr, submit, wait, ready = handle._flwr, handle.submit, handle.wait, handle.ready
            ready_once: list[bool] = []

            def timed_ready() -> None:
                # The SuperLink and Ray start at link_start; the runner checks its sites
                # meanwhile, and its submit waits here for whatever is not up yet.
                if not ready_once:
                    mark("ready_start")
                ready()
                if not ready_once:
                    mark("link_ready")
                    ready_once.append(True)

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
                try:
                    return wait(*args, **kw)
                finally:
                    mark("wait_done")
                    _mark_ray_ready(marks, handle, wall_t0)

            handle._flwr = timed_flwr  # type: ignore[method-assign]
            handle.submit = timed_submit  # type: ignore[method-assign]
            handle.wait = timed_wait  # type: ignore[method-assign]
            handle.ready = timed_ready  # type: ignore[method-assign]
            try:
                yield handle
            finally:
                mark("teardown_start")
        mark("link_stopped")

    original_finish = runner._finish

    def timed_finish(*args: Any, **kw: Any) -> Any:
        mark("finish_start")
        try:
            return original_finish(*args, **kw)
        finally:
            mark("finish_done")

    out.mkdir(parents=True, exist_ok=True)
    (out / "progress.jsonl").unlink(missing_ok=True)
    sampler = ProcessTreeSampler(os.getpid(), interval_s=interval_s, pss=False)
    runner.local_superlink = timed_link  # type: ignore[assignment]
    runner._finish = timed_finish  # type: ignore[assignment]
    try:
        sampler.start()
        with _ProgressWatcher(out / "progress.jsonl", t0) as watcher:
            outcome = runner.run_experiment(scenario, out)
            wall = time.monotonic() - t0
    finally:
        runner.local_superlink = original_link  # type: ignore[assignment]
        runner._finish = original_finish  # type: ignore[assignment]
        tree = sampler.stop()
    sampler.leftover()
    final = dict(outcome.summary.global_.final)
    # The ServerApp writes server_record.json last; from then on the run only shuts down.
    record_mtime = (out / RECORD_NAME).stat().st_mtime
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


def _mark_ray_ready(marks: dict[str, float], handle: Any, wall_t0: float) -> None:
    """``marks["ray_ready"]``: when the shared Ray cluster took drivers (its ready mark's
    time, seconds from ``wall_t0``); nothing for a run without one."""
    ready = Path(handle.work_dir) / READY_NAME
    if handle.ray_address is not None and ready.is_file():
        marks["ray_ready"] = ready.stat().st_mtime - wall_t0


def model_arrays(cfg: FederationConfig) -> dict[str, np.ndarray]:
    """The arrays fedcare's ServerApp sends for ``cfg`` (its initial model, packed as on the
    wire), so the floor's messages carry as many bytes as the run's."""
    _, state = initial_state(cfg, federation_spec(cfg))
    return {name: array.numpy() for name, array in pack_record(state).items()}


def measure_floor(
    *,
    sites: int,
    rounds: int,
    arrays: dict[str, np.ndarray],
    work: Path,
    cpus_per_site: int = 1,
    interval_s: float = 0.5,
    shared_ray: bool = True,
    timeout_s: float = 600.0,
) -> SimMeasurement:
    """Flower and Ray alone: :mod:`benchmarks.flower_floor` on the runner's path.

    The same steps as :func:`fedcare.simulations.runner.run_experiment` takes with Flower (a
    :func:`~fedcare.simulations.flower_driver.local_superlink` with its shared Ray cluster,
    a thin app, ``submit``, ``wait`` ended by the ServerApp's last write, ``end_run``,
    teardown), the same sites, rounds, message shape and arrays, and no fedcare work in the
    apps: no site check, no data, no training, no summary or plots. Its marks are those of
    :func:`measure_simulation` (``ready_start`` is ``link_start``: nothing overlaps the start).
    """
    run_dir = work / "floor-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    arrays_path = run_dir / "arrays.npz"
    np.savez(arrays_path, *arrays.values())
    (run_dir / flower_floor.NAMES_FILE).write_text(json.dumps(list(arrays)), encoding="utf-8")
    app_dir = write_app_dir(
        work / "floor-app",
        config_defaults=flower_floor.CONFIG_DEFAULTS,
        name="flower-floor",
        **flower_floor.COMPONENTS,
    )
    result = run_dir / flower_floor.RESULT_NAME
    marks: dict[str, float] = {}
    t0, wall_t0 = time.monotonic(), time.time()

    def mark(name: str) -> None:
        marks[name] = time.monotonic() - t0

    sampler = ProcessTreeSampler(os.getpid(), interval_s=interval_s, pss=False)
    sampler.start()
    try:
        with _ProgressWatcher(run_dir / flower_floor.PROGRESS_NAME, t0) as watcher:
            mark("link_start")
            with local_superlink(
                work_dir=work / ".flower-floor", pythonpath=[REPO_ROOT], shared_ray=shared_ray
            ) as link:
                mark("ready_start")
                link.ready()
                mark("link_ready")
                mark("submit_start")
                run_id = link.submit(
                    app_dir,
                    run_config={
                        "num-server-rounds": rounds,
                        "num-sites": sites,
                        "arrays-path": str(arrays_path),
                        "run-dir": str(run_dir),
                        "round-timeout": timeout_s,
                    },
                    num_supernodes=sites,
                    cpus_per_client=cpus_per_site,
                )
                mark("submitted")
                status = link.wait(run_id, timeout_s=timeout_s, done=result.is_file)
                mark("wait_done")
                _mark_ray_ready(marks, link, wall_t0)
                if status.status != "finished:completed":  # as the runner ends a run
                    link.end_run(run_id)
                mark("teardown_start")
            mark("link_stopped")
            wall = time.monotonic() - t0
    finally:
        tree = sampler.stop()
    sampler.leftover()
    marks["record_written"] = result.stat().st_mtime - wall_t0
    return SimMeasurement(
        wall_s=wall,
        marks=marks,
        progress=watcher.lines,
        flwr_calls=[],
        tree=tree,
        final_metrics={},
        rounds_completed=json.loads(result.read_text(encoding="utf-8"))["rounds"],
        loadavg_after=[round(x, 2) for x in os.getloadavg()],
    )


# --------------------------------------------------------------------------- the replay


@dataclass
class ComputeMeasurement:
    """The sequential in-process replay: seconds by part, and its final global metrics.

    ``rounds`` has, per round (0 = initial evaluation), the seconds of training, of
    evaluation and of privacy accounting inside them, summed over the sites.
    ``cold_load_s`` is what a Ray actor pays for a site it serves for the first time,
    ``per_message_s`` what every message then costs, by part (means over the sites).
    ``epsilon_asked`` / ``epsilon_computed``: ε calls in the replay and how many of them
    the per-process memo did not answer.
    """

    load_once_s: float
    encode_once_s: float
    ledger_open_once_s: float
    cold_load_s: dict[str, float]
    per_message_s: dict[str, float]
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
    epsilon_asked: int
    epsilon_computed: int

    @property
    def pure_s(self) -> float:
        return self.train_s + self.evaluate_s

    @property
    def accounting_s(self) -> float:
        """Privacy accounting inside ``train_round`` and ``evaluate`` (see ``_ACCOUNTING``)."""
        return sum(self.parts.get(k, (0, 0.0))[1] for k in _ACCOUNTING)

    @property
    def accounting_share(self) -> float:
        """Accounting seconds over pure compute, all rounds."""
        return self.accounting_s / self.pure_s

    @property
    def accounting_share_after_round_1(self) -> float:
        """Accounting over pure compute in rounds 2..R (round 1 calibrates the noise once)."""
        later = self.rounds[2:]
        compute = sum(r["train_s"] + r["evaluate_s"] for r in later)
        return sum(r["accounting_s"] for r in later) / compute if compute else float("nan")

    @property
    def epsilon_s(self) -> float:
        """The accountant's part of the accounting: calibration and every ε (``_EPSILON_WORK``)."""
        return sum(self.parts.get(k, (0, 0.0))[1] for k in _EPSILON_WORK)

    @property
    def ledger_io_s(self) -> float:
        """The ledger's part of the accounting: its SQLite reads and durable writes."""
        return self.accounting_s - self.epsilon_s

    @property
    def epsilon_share(self) -> float:
        """The accountant's seconds over pure compute, all rounds."""
        return self.epsilon_s / self.pure_s

    @property
    def epsilon_share_after_round_1(self) -> float:
        """The accountant's seconds over pure compute in rounds 2..R."""
        later = self.rounds[2:]
        compute = sum(r["train_s"] + r["evaluate_s"] for r in later)
        return sum(r["epsilon_s"] for r in later) / compute if compute else float("nan")

    @property
    def warm_hit_s(self) -> float:
        """``WarmSites.load`` on an unchanged folder: what a message pays for its data."""
        return self.per_message_s["warm hit"]

    @property
    def message_s(self) -> float:
        """Everything a message pays before its compute, summed over all messages."""
        return self.messages * sum(self.per_message_s.values())


def _round_request(cfg: FederationConfig, run_id: str, rnd: int) -> RoundRequest:
    """The request ``fedcare.client.app`` builds from the run config and the server's message."""
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
_TIMED_LEDGER = ("charge", "spent", "mark_completed", "has_charge", "charges", "history")
#: The privacy accounting of a round: the outermost timed calls only (the ε evaluations
#: inside ``calibrate_noise`` and the ledger are timed too, as "of which" rows).
_ACCOUNTING = ("calibrate_noise", "plan epsilon", *(f"ledger.{n}" for n in _TIMED_LEDGER))
#: Of the accounting, the accountant's own work: the noise calibration and every ε asked
#: (by the plan, and inside the ledger's calls). The rest is the ledger's SQLite I/O.
_EPSILON_WORK = ("calibrate_noise", "plan epsilon", "ledger epsilon")


def _import_first_use() -> None:
    """Import now what the first ε, DP-SGD set-up and optimizer step import on first use.

    Each Ray actor pays these imports once (:func:`measure_actor_start` times them); left
    in, the replay's first ``calibrate_noise`` and ``fit`` would carry them as compute.
    """
    from opacus import PrivacyEngine  # noqa: F401

    client_accounting.epsilon([client_accounting.Mechanism(1.0, 0.05, 20)], delta=1e-5)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 1)).sum().backward()
    optimizer.step()


def _clear_epsilon_memo() -> None:
    """Empty this process's ε, calibration and RDP memos, as a fresh Ray actor's are."""
    client_accounting.clear_caches()


def measure_compute(
    folders: Sequence[Path],
    cfg: FederationConfig,
    *,
    run_id: str,
    state_root: Path,
    reload_repeats: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> ComputeMeasurement:
    """Replay the federation in this process, sequentially (see the module docstring).

    ``clock`` times the rounds and their parts (train, evaluate, accounting): wall time by
    default, or e.g. ``time.process_time`` (see :class:`Timers`).
    """
    timers = Timers(clock)
    cpu0 = time.process_time()
    # Loading, once per site (not pure compute), as a Ray actor's first message does.
    warm = WarmSites()
    t = time.perf_counter()
    loaded = [warm.load(f) for f in folders]
    load_once = time.perf_counter() - t
    sites = [site for site, _ in loaded]
    t = time.perf_counter()
    ledgers = []
    for site in sites:
        (state_root / site.spec.site_id).mkdir(parents=True, exist_ok=True)
        ledgers.append(PrivacyLedger(state_root / site.spec.site_id / LEDGER_NAME))
    ledger_open = time.perf_counter() - t
    trainers = [
        SiteTrainer(
            site=s, policy=simulated_site_policy(cfg), ledger=ledger, seed=cfg.seed, task_data=tasks
        )
        for s, (_, tasks), ledger in zip(sites, loaded, ledgers, strict=True)
    ]
    t = time.perf_counter()
    for trainer in trainers:
        trainer.task_data(cfg.task)
    encode_once = time.perf_counter() - t
    # What a Ray actor pays for a site the first time it serves it, and then per message
    # (fedcare.client.app._open_site: the run config, the warm data, the ledger opened afresh).
    run_config = cfg.to_run_config()
    scratch = state_root / "_reload"
    scratch.mkdir(parents=True, exist_ok=True)

    def site_mean(make: Callable[[int], Callable[[], object]]) -> float:
        return statistics.fmean(_median_s(make(i), reload_repeats) for i in range(len(sites)))

    def open_ledger() -> None:
        PrivacyLedger(scratch / LEDGER_NAME).count_charges()

    cold = {
        "load (WarmSites, cold)": site_mean(lambda i: lambda: WarmSites().load(folders[i])),
        "encode": site_mean(lambda i: lambda: build_task_data(sites[i], cfg.task)),
    }
    per_message = {
        "run config": site_mean(lambda i: lambda: FederationConfig.from_run_config(run_config)),
        "warm hit": site_mean(lambda i: lambda: warm.load(folders[i])),
        "ledger open": site_mean(lambda i: lambda: open_ledger()),
    }
    if warm.loads != len(folders):
        raise RuntimeError(f"the warm hits loaded a site again ({warm.loads} loads)")

    spec = federation_spec(cfg)
    _, state = initial_state(cfg, spec)
    rounds: list[dict[str, float]] = []
    final: dict[str, float] = {}
    train_s = evaluate_s = aggregate_s = pure_cpu = 0.0

    def accounting_so_far() -> float:
        return sum(timers.total(k) for k in _ACCOUNTING)

    def epsilon_so_far() -> float:
        return sum(timers.total(k) for k in _EPSILON_WORK)

    _import_first_use()
    _clear_epsilon_memo()
    memo = client_accounting._memoized_epsilon
    with contextlib.ExitStack() as stack:
        for name in _TIMED_FUNCTIONS:
            stack.enter_context(timers.patch(client_local, name))
        stack.enter_context(timers.patch(client_local, "epsilon", "plan epsilon"))
        # Nested inside calibrate_noise and the ledger: how many ε they ask for.
        stack.enter_context(timers.patch(client_accounting, "epsilon", "calibration epsilon"))
        stack.enter_context(timers.patch(client_ledger, "epsilon", "ledger epsilon"))
        for name in _TIMED_LEDGER:
            stack.enter_context(timers.patch(PrivacyLedger, name, f"ledger.{name}"))
        stack.enter_context(timers.patch(SiteTrainer, "_store_release", "store release"))
        memo0 = memo.cache_info()
        for rnd in range(cfg.num_server_rounds + 1):
            row = {"round": float(rnd), "train_s": 0.0, "evaluate_s": 0.0}
            accounted, estimated = accounting_so_far(), epsilon_so_far()
            if rnd > 0:
                request = _round_request(cfg, run_id, rnd)
                results = []
                for trainer in trainers:
                    t, cpu = clock(), time.process_time()
                    results.append(trainer.train_round(request, state))
                    row["train_s"] += clock() - t
                    pure_cpu += time.process_time() - cpu
                t = time.perf_counter()
                state = fedavg([r.state for r in results], [r.n_train for r in results])
                aggregate_s += time.perf_counter() - t
            per_site = {}
            for trainer in trainers:
                t, cpu = clock(), time.process_time()
                per_site[trainer.site_id] = trainer.evaluate(
                    cfg.task, state, model=cfg.model or None, device=cfg.device
                )
                row["evaluate_s"] += clock() - t
                pure_cpu += time.process_time() - cpu
            row["accounting_s"] = accounting_so_far() - accounted
            row["epsilon_s"] = epsilon_so_far() - estimated
            final = weighted_global_metrics(per_site)
            train_s += row["train_s"]
            evaluate_s += row["evaluate_s"]
            rounds.append(row)
        memo1 = memo.cache_info()
    parts = {name: (timers.count(name), timers.total(name)) for name in timers.calls}
    return ComputeMeasurement(
        load_once_s=load_once,
        encode_once_s=encode_once,
        ledger_open_once_s=ledger_open,
        cold_load_s=cold,
        per_message_s=per_message,
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
        epsilon_asked=(memo1.hits + memo1.misses) - (memo0.hits + memo0.misses),
        epsilon_computed=memo1.misses - memo0.misses,
    )


# --------------------------------------------------------------------------- one task


#: Run in a fresh interpreter under ``-X importtime``: what a new Ray actor does first, step
#: by step (a marker line on stderr opens each step), and each step's wall seconds on stdout.
_ACTOR_START_SCRIPT = """
import json, sys, time
walls = {}
def step(name):
    sys.stderr.write("@@step " + name + "\\n")
    sys.stderr.flush()
    return name, time.perf_counter()
def done(started):
    walls[started[0]] = time.perf_counter() - started[1]
s = step("import fedcare.client.app")
import fedcare.client.app
done(s)
import torch
s = step("first .to(device)")
model = torch.nn.Linear(4, 1).to("cpu")
batch = torch.ones(2, 4).to("cpu", non_blocking=True)
done(s)
s = step("first epsilon (PRV)")
from fedcare.client.accounting import Mechanism, epsilon
epsilon([Mechanism(1.0, 0.05, 20)], delta=1e-5)
done(s)
s = step("first optimizer step")
optimizer = torch.optim.Adam(model.parameters())
model(batch).sum().backward()
optimizer.step()
done(s)
print(json.dumps(walls))
"""

#: Packages whose import the report names (with what they import).
_NAMED_IMPORTS = ("torch", "flwr", "pandas", "opacus", "scipy", "sympy", "torch._dynamo")


_IMPORT_APP = "import fedcare.client.app"
_FIRST_EPSILON = "first epsilon (PRV)"
_FIRST_STEP = "first optimizer step"


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _package_import_s(lines: Sequence[str]) -> tuple[float, dict[str, float]]:
    """From one step's ``-X importtime`` lines: the seconds of the imports the step itself
    set off, and for each of ``_NAMED_IMPORTS`` the seconds of its outermost modules (each
    with what it imports; a package imported under another counts in both)."""
    entries = []  # (depth, module, cumulative s), in the order imports finished
    for line in lines:
        _, cumulative, name = line.split("|")
        if cumulative.strip().isdigit():  # not the header line
            depth = (len(name) - len(name.lstrip()) - 1) // 2
            entries.append((depth, name.strip(), int(cumulative) / 1e6))
    total = sum(seconds for depth, _, seconds in entries if depth == 0)
    named = dict.fromkeys(_NAMED_IMPORTS, 0.0)
    ancestors: list[str] = []
    # importtime prints a module after its imports: reversed, each comes before them.
    for depth, module, seconds in reversed(entries):
        ancestors = ancestors[:depth]
        for package in _NAMED_IMPORTS:
            if _within(module, package) and not any(_within(a, package) for a in ancestors):
                named[package] += seconds
        ancestors.append(module)
    return total, {k: v for k, v in named.items() if v > 0}


@dataclass
class ActorStart:
    """What a fresh interpreter pays, step by step, before a Ray actor's compute.

    ``steps_s``: wall seconds of each step; ``imports_s``: the seconds of the imports each
    step set off (their cumulative ``-X importtime``); ``packages_s``: per step, the seconds
    of each of ``_NAMED_IMPORTS`` it imported (overlapping: a package imported under
    another counts in both).
    """

    steps_s: dict[str, float]
    imports_s: dict[str, float]
    packages_s: dict[str, dict[str, float]]

    def module_s(self, name: str) -> float:
        """Seconds importing ``name`` took, whichever step imported it."""
        return sum(packages.get(name, 0.0) for packages in self.packages_s.values())


def measure_actor_start() -> ActorStart:
    """Run ``_ACTOR_START_SCRIPT`` in a fresh interpreter and read its import times."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", _ACTOR_START_SCRIPT],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    walls = json.loads(proc.stdout.strip().splitlines()[-1])
    by_step: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in proc.stderr.splitlines():
        if line.startswith("@@step "):
            current = by_step.setdefault(line.removeprefix("@@step "), [])
        elif line.startswith("import time:") and current is not None:
            current.append(line)
    imports, packages = {}, {}
    for step, lines in by_step.items():
        imports[step], packages[step] = _package_import_s(lines)
    return ActorStart(steps_s=walls, imports_s=imports, packages_s=packages)


@dataclass
class TaskResult:
    """The simulation and its replay, for one task."""

    task: str
    sites: int
    rounds: int
    patients_per_site: int
    local_epochs: int
    synth_s: float
    actors: int
    sim: SimMeasurement
    compute: ComputeMeasurement
    loadavg: dict[str, list[float]] = field(default_factory=dict)
    #: ``"shared"``: the run joined a Ray cluster started beside the SuperLink (fedcare's
    #: way); ``"per-run"``: its ``flwr-simulation`` started its own (Flower's).
    ray: str = "shared"
    #: Flower and Ray alone (:func:`measure_floor`), the same Ray mode, sites and rounds.
    floor: SimMeasurement | None = None

    @property
    def label(self) -> str:
        return f"{self.task} (Ray {self.ray})"

    @property
    def ratio(self) -> float:
        return self.sim.wall_s / self.compute.pure_s

    @property
    def ratio_without_accounting(self) -> float:
        """Wall over DP-SGD + evaluation alone (accounting counted as overhead)."""
        return self.sim.wall_s / (self.compute.pure_s - self.compute.accounting_s)

    def round_walls(self) -> dict[int, float]:
        """Wall seconds of each completed round r >= 1 of the simulation."""
        return _round_walls(self.sim, self.rounds)

    def fixed_and_per_round(self) -> tuple[float, float]:
        """``(F, k)``: wall ~ F + k * compute of rounds >= 1 (see :func:`render_markdown`)."""
        walls = self.round_walls()
        compute = sum(
            self.compute.rounds[r]["train_s"] + self.compute.rounds[r]["evaluate_s"] for r in walls
        )
        k = sum(walls.values()) / compute
        fixed = self.sim.wall_s - sum(walls.values()) - self.compute.rounds[0]["evaluate_s"]
        return fixed, k

    def floor_fixed_and_per_round(self) -> tuple[float, float]:
        """Flower's floor: ``(F, seconds a round)`` of :func:`measure_floor`'s run, the F
        defined as for fedcare's run (no compute to subtract) and the round its mean wall
        over rounds 1..R."""
        if self.floor is None:
            raise ValueError("no Flower floor was measured (--no-flower-floor)")
        walls = _round_walls(self.floor, self.rounds)
        return self.floor.wall_s - sum(walls.values()), sum(walls.values()) / len(walls)

    def cold_loads(self) -> tuple[int, int]:
        """Fewest and most cold site loads of the simulation: each actor loads each site it
        serves once (which actor serves which message is Ray's choice)."""
        return self.sites, min(self.actors, self.sites) * self.sites


def _round_walls(sim: SimMeasurement, rounds: int) -> dict[int, float]:
    """Wall seconds of each completed round r >= 1 of a run (from its progress lines)."""
    seen = {int(p["round"]): p["seen_s"] for p in sim.progress}
    return {r: seen[r] - seen[r - 1] for r in range(1, rounds + 1) if r in seen}


def _actor_count(scenario: Scenario) -> int:
    """Ray client actors of a simulation: the CPUs Ray sees over the CPUs per site."""
    return max(1, int(len(os.sched_getaffinity(0)) // max(1, scenario.cpus_per_site)))


def run_task(
    task: str,
    *,
    sites: int,
    rounds: int,
    patients: int,
    work: Path,
    seed: int = 0,
    interval_s: float = 0.5,
    rays: Sequence[str] = ("shared",),
    floor: bool = True,
) -> list[TaskResult]:
    """Synthesize, simulate (once per Ray mode in ``rays``), measure Flower's floor in the
    same Ray modes (``floor``), replay; see the module docstring."""
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
    scenario = Scenario(
        name=f"overhead-{task}",
        seed=seed,
        data_root=str(work / "sites"),
        baselines=False,
        federation={
            "task": task,
            "num-server-rounds": rounds,
            # Outside the site folders: the replay's warm hits see the data unchanged.
            "state-root": str(work / "state-sim"),
        },
    )
    sims: dict[str, SimMeasurement] = {}
    loadavgs: dict[str, dict[str, list[float]]] = {}
    for ray in rays:
        loadavgs[ray] = {"before simulation": [round(x, 2) for x in os.getloadavg()]}
        shutil.rmtree(work / "state-sim", ignore_errors=True)  # each run starts unspent
        sims[ray] = measure_simulation(
            scenario, work / "run", interval_s=interval_s, shared_ray=ray == "shared"
        )
        loadavgs[ray]["after simulation"] = sims[ray].loadavg_after
    cfg = FederationConfig.from_run_config(
        json.loads((work / "run" / RECORD_NAME).read_text())["config"]
    )
    floors: dict[str, SimMeasurement] = {}
    if floor:
        arrays = model_arrays(cfg)
        for ray in rays:
            loadavgs[ray]["before floor"] = [round(x, 2) for x in os.getloadavg()]
            floors[ray] = measure_floor(
                sites=sites,
                rounds=rounds,
                arrays=arrays,
                work=work,
                cpus_per_site=scenario.cpus_per_site,
                interval_s=interval_s,
                shared_ray=ray == "shared",
            )
            loadavgs[ray]["after floor"] = floors[ray].loadavg_after
    compute = measure_compute(folders, cfg, run_id=cfg.run_id, state_root=work / "replay-state")
    after_replay = [round(x, 2) for x in os.getloadavg()]
    return [
        TaskResult(
            task=task,
            sites=sites,
            rounds=rounds,
            patients_per_site=patients,
            local_epochs=cfg.local_epochs,
            synth_s=synth_s,
            actors=_actor_count(scenario),
            sim=sims[ray],
            compute=compute,
            loadavg=loadavgs[ray] | {"after replay": after_replay},
            ray=ray,
            floor=floors.get(ray),
        )
        for ray in rays
    ]


# --------------------------------------------------------------------------- report


def _breakdown(r: TaskResult) -> list[tuple[str, float, str]]:
    """Wall-time segments of the run: (segment, seconds, what is in it)."""
    m, c, sim = r.sim.marks, r.compute, r.sim
    seen = {int(p["round"]): p for p in sim.progress}
    rows: list[tuple[str, float, str]] = []
    start = "SuperLink and Ray" if r.ray == "shared" else "SuperLink"
    rows.append(("runner, before Flower starts", m["link_start"], "resume checks, run id"))
    rows.append(
        (
            "load + validate sites, write config",
            m["ready_start"] - m["link_start"],
            f"runner; the {start} start meanwhile",
        )
    )
    rows.append(
        (
            "SuperLink start, beyond the sites' check",
            m["link_ready"] - m["ready_start"],
            "until /health"
            + (
                f" (the Ray cluster took drivers at {m['ray_ready']:.2f} s: "
                f"{m['ray_ready'] - m['link_ready']:+.2f} s from here; the run's simulation "
                "waits for it when it joins it)"
                if "ray_ready" in m
                else ""
            ),
        )
    )
    rows.append(("`flwr run` submit", m["submitted"] - m["link_ready"], "builds FAB, CLI"))
    if 0 in seen:
        strategy_start = seen[0]["seen_s"] - seen[0]["elapsed_s"]
        rows.append(
            (
                "submit -> strategy start",
                strategy_start - m["submitted"],
                "SuperExec, flwr-simulation, "
                + ("joins Ray (waiting for it if not yet up)" if r.ray == "shared" else "Ray start")
                + ", ServerApp import, sites connected",
            )
        )
        round0 = c.rounds[0]["evaluate_s"]
        rows.append(
            (
                "round 0 (initial evaluation)",
                seen[0]["seen_s"] - strategy_start,
                f"replay compute {round0:.2f} s; rest: Ray actors start, import "
                "ClientApp, cold-load the sites they serve",
            )
        )
        last = 0
        for rnd in range(1, r.rounds + 1):
            if rnd not in seen:
                break
            comp = c.rounds[rnd]["train_s"] + c.rounds[rnd]["evaluate_s"]
            note = f"replay compute {comp:.2f} s (accounting {c.rounds[rnd]['accounting_s']:.2f})"
            if rnd == 1:
                note += "; first DP round: noise calibration, actors import opacus, torch._dynamo"
            rows.append(
                (
                    f"round {rnd} (train + evaluate)",
                    seen[rnd]["seen_s"] - seen[rnd - 1]["seen_s"],
                    note,
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
            "end the run",
            m["teardown_start"] - m["wait_done"],
            "SIGKILL flwr-simulation + its actors (end_run)",
        )
    )
    rows.append(
        (
            "teardown beside summary, metrics.csv, plots",
            sim.wall_s - m["teardown_start"],
            f"stop SuperLink + SuperExec{', then the Ray cluster' if r.ray == 'shared' else ''} "
            f"({m['link_stopped'] - m['teardown_start']:.2f} s, in a thread) while the runner "
            f"writes the summary, metrics.csv and plots ({_finish_s(sim):.2f} s)",
        )
    )
    return rows


def _finish_s(sim: SimMeasurement) -> float:
    """Seconds of the runner's work after Flower: baselines, summary, metrics.csv, plots."""
    return sim.marks.get("finish_done", sim.wall_s) - sim.marks.get("finish_start", sim.wall_s)


def render_markdown(
    results: Sequence[TaskResult], machine: dict[str, Any], actor: ActorStart | None = None
) -> str:
    """The report: machine line, headline table, per-actor start, breakdowns, findings."""
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
        "and DP plan, an empty ε memo; the final AUROC of both, close but not equal, is the "
        "check); the simulation runs "
        f"{r0.actors} client actors in parallel (1 CPU and 1 thread each), each keeping the "
        "sites it served warm. Synthesis is excluded from both.",
        "",
        "| task | run_experiment wall s | pure compute s (train_round + evaluate) | ratio "
        f"(goal <= {GOAL_RATIO}) | accounting s | accounting share | accounting share, "
        "rounds 2..R | of which the accountant: share, all rounds / rounds 2..R | ratio to "
        "DP-SGD + eval only | fixed overhead F s | per-round factor k "
        f"| compute for ratio {GOAL_RATIO} | cold load per site s (once per actor) | "
        "per message ms (of which warm hit) | final test AUROC sim / replay |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        c = r.compute
        auc = (
            f"{r.sim.final_metrics.get('test.auroc', float('nan')):.4f} / "
            f"{c.final_metrics.get('test.auroc', float('nan')):.4f}"
        )
        fixed, k = r.fixed_and_per_round()
        needed = (
            f"{fixed / (GOAL_RATIO - k):,.0f} s" if k < GOAL_RATIO else f"never (k >= {GOAL_RATIO})"
        )
        lines.append(
            f"| {r.label} | {r.sim.wall_s:.1f} | {c.pure_s:.2f} | **{r.ratio:.1f}** | "
            f"{c.accounting_s:.2f} | {c.accounting_share * 100:.0f} % | "
            f"{c.accounting_share_after_round_1 * 100:.0f} % | "
            f"{c.epsilon_share * 100:.1f} % / {c.epsilon_share_after_round_1 * 100:.1f} % | "
            f"{r.ratio_without_accounting:.1f} | {fixed:.1f} | {k:.2f} | {needed} | "
            f"{sum(c.cold_load_s.values()):.2f} | "
            f"{sum(c.per_message_s.values()) * 1000:.1f} ({c.warm_hit_s * 1000:.1f}) | {auc} |"
        )
    lines += [
        "",
        "F = wall time outside rounds 1..R minus the replay's round-0 compute (start-up, "
        "round-0 cold start, finish, teardown, runner); k = simulated round wall / replayed "
        "round compute over rounds 1..R. A run whose compute is C takes about F + k*C, so "
        f"the ratio reaches {GOAL_RATIO} once C >= F / ({GOAL_RATIO} - k). Accounting = "
        "`calibrate_noise`, the plan's ε check and the privacy ledger's calls inside "
        "`train_round` and `evaluate`; its share is over pure compute, and over rounds 2..R "
        "alone (round 1 carries the one-off noise calibration). The accountant's share counts "
        "only the calibration and the ε computations (in the plan and inside the ledger's "
        "calls), not the ledger's SQLite transactions. The replay imported Opacus, "
        "SciPy and `torch._dynamo` before it started: each actor's one-off imports are "
        "timed apart, in the next table, not as compute.",
    ]
    if any(r.floor is not None for r in results):
        lines += ["", *_floor_section(results)]
    if actor is not None:
        lines += ["", *_actor_table(actor)]
    for r in results:
        lines += ["", *_task_section(r, machine, actor)]
    return "\n".join(lines).rstrip() + "\n"


def _segments(sim: SimMeasurement, rounds: int) -> list[tuple[str, float]]:
    """A run's wall time in the segments fedcare's run and Flower's floor share."""
    m = sim.marks
    seen = {int(p["round"]): p for p in sim.progress}
    if 0 not in seen or rounds not in seen:
        return []
    strategy_start = seen[0]["seen_s"] - seen[0]["elapsed_s"]
    rows = [
        ("runner, before Flower starts", m["link_start"]),
        ("start, until the SuperLink answers", m["link_ready"] - m["link_start"]),
        ("submit", m["submitted"] - m["link_ready"]),
        ("submit -> strategy start", strategy_start - m["submitted"]),
        ("round 0 (initial evaluation)", seen[0]["seen_s"] - strategy_start),
    ]
    rows += [
        (f"round {k}", seen[k]["seen_s"] - seen[k - 1]["seen_s"]) for k in range(1, rounds + 1)
    ]
    rows += [
        ("last round -> the runner's wait returns", m["wait_done"] - seen[rounds]["seen_s"]),
        ("end the run", m["teardown_start"] - m["wait_done"]),
        ("teardown (beside summary, metrics.csv, plots)", sim.wall_s - m["teardown_start"]),
    ]
    return rows


def _floor_section(results: Sequence[TaskResult]) -> list[str]:
    """Flower and Ray alone against fedcare's run: F, a round, and the segments."""
    lines = [
        "## Flower's floor: the same federation with apps that do no fedcare work",
        "",
        "`benchmarks/flower_floor.py` on the runner's path (a local SuperLink and the shared "
        "Ray cluster of `simulations/ray_cluster.py`, a thin app, submit, the wait ended by "
        "the ServerApp's last write, `end_run`, teardown): the same sites, rounds, message "
        "shape (round 0 an evaluate exchange, each round one train exchange, the last also an "
        "evaluate exchange) and model arrays, through Flower's FedAvg strategy loop; the "
        "ClientApp replies with the arrays it received. Run in the same invocation, right "
        "after fedcare's run. What fedcare's run costs beyond it is fedcare's: its imports, "
        "data, DP-SGD, accounting, checks, records and plots.",
        "",
        "| task | fedcare F s | Flower floor F s | fedcare's part of F s | fedcare s / round "
        "(rounds 1..R) | Flower floor s / round | compute s / round (replay) | fedcare's "
        "part of a round, beyond compute s | k if fedcare added only its compute |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.floor is None:
            continue
        fixed, _ = r.fixed_and_per_round()
        floor_fixed, floor_round = r.floor_fixed_and_per_round()
        walls = r.round_walls()
        fed_round = sum(walls.values()) / len(walls)
        compute = sum(
            r.compute.rounds[k]["train_s"] + r.compute.rounds[k]["evaluate_s"] for k in walls
        ) / len(walls)
        lines.append(
            f"| {r.label} | {fixed:.1f} | {floor_fixed:.1f} | {fixed - floor_fixed:.1f} | "
            f"{fed_round:.2f} | {floor_round:.2f} | {compute:.3f} | "
            f"{fed_round - floor_round - compute:.2f} | {(floor_round + compute) / compute:.2f} |"
        )
    for r in results:
        if r.floor is None:
            continue
        ours, floor = _segments(r.sim, r.rounds), dict(_segments(r.floor, r.rounds))
        if not ours or not floor:
            continue
        lines += [
            "",
            f"{r.label}, segment by segment (wall s):",
            "",
            "| segment | fedcare | Flower + Ray alone | difference |",
            "|---|---:|---:|---:|",
        ]
        for name, seconds in ours:
            lines.append(
                f"| {name} | {seconds:.2f} | {floor[name]:.2f} | {seconds - floor[name]:+.2f} |"
            )
        lines.append(
            f"| whole run | {r.sim.wall_s:.2f} | {r.floor.wall_s:.2f} | "
            f"{r.sim.wall_s - r.floor.wall_s:+.2f} |"
        )
        cats = sorted(set(r.sim.tree.cpu_s) | set(r.floor.tree.cpu_s))
        lines += [
            "",
            "CPU seconds by process (sampled): "
            + ", ".join(
                f"{c} {r.sim.tree.cpu_s.get(c, 0.0):.1f} / {r.floor.tree.cpu_s.get(c, 0.0):.1f}"
                for c in cats
            )
            + f" (fedcare / floor); in all {sum(r.sim.tree.cpu_s.values()):.1f} / "
            f"{sum(r.floor.tree.cpu_s.values()):.1f}.",
        ]
    return lines


def _step_summary(actor: ActorStart, step: str) -> str:
    """``"1.76 s (opacus 1.73, scipy 0.94)"``: a step's wall and the packages it imported."""
    named = ", ".join(f"{k} {v:.2f}" for k, v in actor.packages_s.get(step, {}).items())
    return f"{actor.steps_s.get(step, 0.0):.2f} s" + (f" ({named})" if named else "")


def _actor_table(actor: ActorStart) -> list[str]:
    """What each Ray actor pays once per run before its compute, step by step."""
    lines = [
        "What each Ray client actor pays once per run, on top of its compute (a fresh "
        "interpreter under `python -X importtime`, the steps in an actor's order; a "
        "module's seconds include what it imports):",
        "",
        "| step | wall s | its imports s | of which (first imported here) |",
        "|---|---:|---:|---|",
    ]
    for step, wall in actor.steps_s.items():
        named = ", ".join(
            f"{name} {seconds:.2f}" for name, seconds in actor.packages_s.get(step, {}).items()
        )
        lines.append(
            f"| {step} | {wall:.2f} | {actor.imports_s.get(step, 0.0):.2f} | {named or '-'} |"
        )
    return lines


def _task_section(
    r: TaskResult, machine: dict[str, Any], actor: ActorStart | None = None
) -> list[str]:
    """One task: the wall-time breakdown, the compute by part, data, CPU, findings."""
    c, sim = r.compute, r.sim
    lines = [
        f"## {r.label}: where the {sim.wall_s:.1f} s go",
        "",
        "| segment | wall s | share | note |",
        "|---|---:|---:|---|",
    ]
    for name, seconds, note in _breakdown(r):
        lines.append(f"| {name} | {seconds:.2f} | {seconds / sim.wall_s * 100:.0f} % | {note} |")
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
        "calibrate_noise": "  noise calibration (`calibrate_noise`, PRV; round 1)",
        "calibration epsilon": "    of which ε asked (memoized)",
        "plan epsilon": "  ε of the planned evaluations (`_plan`)",
        "ledger.charge": "  ledger `charge` (ε before and after the round)",
        "ledger.spent": "  ledger `spent`",
        "ledger epsilon": "    ε asked by `charge` and `spent` (memoized)",
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
    cold = sum(c.cold_load_s.values())
    fewest, most = r.cold_loads()
    cold_parts = ", ".join(f"{k} {v:.2f} s" for k, v in c.cold_load_s.items())
    message_parts = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in c.per_message_s.items())
    lines += [
        "",
        f"Data in the ClientApp: a cold load of a site costs {cold:.2f} s ({cold_parts}), "
        f"paid once by each actor for each site it serves: {fewest} to {most} cold loads in "
        f"this run ({r.actors} actors, {r.sites} sites; Ray picks the actor of each message), "
        f"{fewest * cold:.1f} to {most * cold:.1f} s of actor CPU. Each of the {c.messages} "
        f"messages then pays {message_parts}: {c.message_s:.2f} s in all.",
        "",
        "CPU seconds of the simulation's processes (sampled every "
        f"{machine.get('interval_s', 0.5)} s; `flwr` CLI exact):",
        "",
        "| process | CPU s |",
        "|---|---:|",
    ]
    for cat, cpu in sorted(sim.tree.cpu_s.items(), key=lambda kv: -kv[1]):
        if cat == "flwr CLI (run/ls)":
            continue
        lines.append(f"| {cat} | {cpu:.1f} |")
    for command, (n, wall, cpu) in sorted(sim.cli_totals().items()):
        lines.append(f"| `flwr {command}` x {n} (wall {wall:.1f} s) | {cpu:.1f} |")
    lines.append(
        f"| replay, whole (for comparison; torch threads {c.torch_threads}) | {c.cpu_s:.1f} |"
    )
    lines.append(f"| replay, train_round + evaluate only | {c.pure_cpu_s:.1f} |")
    return [*lines, "", *_findings(r, actor)]


def _findings(r: TaskResult, actor: ActorStart | None = None) -> list[str]:
    """The overhead (wall - pure compute) by cause, and what remains, from the numbers."""
    m, c, sim = r.sim.marks, r.compute, r.sim
    seen = {int(p["round"]): p for p in sim.progress}
    if 0 not in seen or r.rounds not in seen:
        return []
    strategy_start = seen[0]["seen_s"] - seen[0]["elapsed_s"]
    startup = seen[0]["seen_s"] - m["link_start"] - c.rounds[0]["evaluate_s"]
    finish = m["wait_done"] - seen[r.rounds]["seen_s"]
    before = m["ready_start"]  # the runner's own work, the SuperLink (and Ray) starting
    wait_start = m["link_ready"] - m["ready_start"]
    teardown = m["link_stopped"] - m["wait_done"]
    after = _finish_s(sim)
    tail = sim.wall_s - m["wait_done"]
    walls = r.round_walls()
    excess = {k: w - c.rounds[k]["train_s"] - c.rounds[k]["evaluate_s"] for k, w in walls.items()}
    later = [k for k in walls if k >= 2]
    later_compute = sum(c.rounds[k]["train_s"] + c.rounds[k]["evaluate_s"] for k in later)
    k_later = sum(walls[k] for k in later) / later_compute if later_compute else float("nan")
    overhead = sim.wall_s - c.pure_s
    calib = c.parts.get("calibrate_noise", (0, 0.0))
    fit = c.parts.get("fit", (0, 0.0))[1]
    cold = sum(c.cold_load_s.values())
    fewest, most = r.cold_loads()
    per_message = sum(c.per_message_s.values())

    def pct(seconds: float) -> str:
        return f"{seconds / overhead * 100:.0f} %"

    a = actor
    imports = (
        f" (`fedcare.client.app` {a.steps_s.get(_IMPORT_APP, 0.0):.1f} s in a fresh interpreter)"
        if a is not None
        else ""
    )
    first_round = (
        f"at its first ε {_step_summary(a, _FIRST_EPSILON)} and at its first optimizer step "
        f"{_step_summary(a, _FIRST_STEP)}"
        if a is not None
        else "at its first ε (Opacus's accountants) and its first optimizer step"
    )
    # What each actor pays in round 0 and round 1 on top of the compute (in parallel).
    round0 = seen[0]["seen_s"] - strategy_start
    per_actor_sites = -(-r.sites // r.actors)
    round0_known = per_actor_sites * cold + (a.steps_s.get(_IMPORT_APP, 0.0) if a else 0.0)
    round1_known = (
        a.steps_s.get(_FIRST_EPSILON, 0.0) + a.steps_s.get(_FIRST_STEP, 0.0) if a else 0.0
    )
    lines = [
        f"Overhead = {sim.wall_s:.1f} - {c.pure_s:.1f} = {overhead:.1f} s wall, by cause:",
        "",
        f"1. Start-up to the end of round 0, less its compute: {startup:.1f} s "
        f"({pct(startup)}): the runner's site check ({before:.1f} s, while the SuperLink"
        + (" and the Ray cluster start" if r.ray == "shared" else " starts")
        + f"), what the SuperLink's start took beyond it ({wait_start:.1f} s), submit, "
        "SuperExec, `flwr-simulation` "
        + (
            "joining the Ray cluster (which comes up meanwhile)"
            if r.ray == "shared"
            else "and its own Ray cluster"
        )
        + f", ServerApp start: {strategy_start - m['link_start']:.1f} s until the strategy "
        f"starts (Flower 1.42 starts a simulation runtime per run), then the cold start of "
        f"the {r.actors} Ray client "
        f"actors: each imports the ClientApp{imports} and loads each site it serves the "
        f"first time ({cold:.2f} s a site). Round 0 took {round0:.1f} s; those two, about "
        f"{round0_known:.1f} s per actor (the actors run in parallel), leave "
        f"{round0 - c.rounds[0]['evaluate_s'] - round0_known:.1f} s for Ray starting its "
        "worker processes and actors, Flower's messages and the ServerApp, and waiting for "
        "the 2 cores (not split here).",
        f"2. Round 1 beyond its compute: {excess.get(1, 0.0):.1f} s "
        f"({pct(excess.get(1, 0.0))}): each actor's first DP-SGD round imports what it needs "
        f"{first_round}; the other {excess.get(1, 0.0) - round1_known:.1f} s (messages, the "
        "ServerApp, waiting for the cores) are not split here.",
        f"3. Rounds 2..{r.rounds} beyond their compute: {sum(excess[k] for k in later):.1f} s "
        f"({pct(sum(excess[k] for k in later))}; k = {k_later:.2f} over these rounds): each "
        f"message's warm data, run config and ledger ({per_message * 1000:.0f} ms, "
        f"{c.message_s:.2f} s over all {c.messages} messages, spread over {r.actors} "
        "actors), and Flower's message passing and the ServerApp's work between rounds "
        "(aggregation, checkpoint, progress), not split here.",
        f"4. Finish: last round to the runner's wait returning {finish:.1f} s (the ServerApp "
        "writes `server_record.json`, then `summary.json`; the runner's next in-process "
        f"Control API poll sees both), then {tail:.1f} s to the end: the teardown, "
        f"{teardown:.1f} s (`flwr-simulation` and its actors killed at once, SuperLink and "
        "SuperExec stopped"
        + (", then the Ray cluster" if r.ray == "shared" else "")
        + f"; in a thread), beside the runner's own {after:.1f} s (summary, metrics.csv, "
        "plots).",
        "",
        f"Inside the pure compute, privacy accounting is {c.accounting_s:.2f} of "
        f"{c.pure_s:.2f} s ({c.accounting_share * 100:.0f} %), "
        f"{c.accounting_share_after_round_1 * 100:.0f} % over rounds 2..{r.rounds}: round 1 "
        f"carries the one-off noise calibration (`calibrate_noise` x {calib[0]}, "
        f"{calib[1]:.2f} s). Of the accounting, the accountant (the calibration and every "
        f"ε) is {c.epsilon_s:.3f} s ({c.epsilon_share * 100:.1f} % of the compute, "
        f"{c.epsilon_share_after_round_1 * 100:.1f} % over rounds 2..{r.rounds}) and the "
        f"ledger's SQLite reads and durable writes {c.ledger_io_s:.3f} s. "
        f"ε of a non-empty history was asked for {c.epsilon_asked} times "
        f"and computed {c.epsilon_computed} times; the per-process memo answered the rest "
        "(emptied before "
        "the replay, as a fresh actor's is; the replay's one process shares it across the "
        "sites, where each actor has its own). DP-SGD (`fit`) is "
        f"{fit:.2f} s.",
        "",
        "What remains, and whose it is:",
        "",
        (
            "- Flower 1.42 and Ray: the per-run start of `flwr-simulation` and of the run's "
            f"Ray actors (start-up above, {startup:.1f} s with the actors' cold start). The "
            "SuperLink and the Ray cluster start once (per sweep) and while the runner "
            "checks its sites; every run joins the cluster. Flower starts a simulation "
            "runtime per run, and Ray gives each run (a job) its own worker processes, "
            "which import the ClientApp afresh: fixed per run."
            if r.ray == "shared"
            else "- Flower 1.42: the per-run start of `flwr-simulation`, a Ray cluster and its "
            f"actors (start-up above, {startup:.1f} s with the actors' cold start); fedcare's "
            "default (`--ray shared`) starts the cluster once, beside the SuperLink."
        ),
    ]
    if a is not None:
        lines.append(
            "- Imports, once per Ray actor and run (table above): `fedcare.client.app` "
            f"{_step_summary(a, _IMPORT_APP)}, fedcare's import graph; at the first ε "
            f"{_step_summary(a, _FIRST_EPSILON)}, what `opacus.accountants` imports (its "
            "privacy engine and optimizers, torch.distributed, SciPy): Opacus's; at the first "
            f"optimizer step {_step_summary(a, _FIRST_STEP)}: PyTorch's. fedcare already "
            "imports Opacus only when accounting or DP-SGD first runs; importing earlier "
            "would move these seconds, not remove them."
        )
    lines += [
        f"- fedcare, data: a cold site load ({cold:.2f} s: validate every file, hash every "
        f"byte for the fingerprint, encode the task) once per actor and site, {fewest} to "
        f"{most} here; then a warm hit of {c.warm_hit_s * 1000:.1f} ms per message (a stat "
        "of every file of the site, so it grows with the files a site holds).",
        f"- fedcare, runner: {before:.1f} s checking the sites (Flower starting meanwhile) "
        f"and {after:.1f} s after Flower (beside the teardown).",
        f"- With F and k as above, the ratio {GOAL_RATIO} needs k < {GOAL_RATIO} and a run of "
        f"at least F / ({GOAL_RATIO} - k) s of compute.",
    ]
    return lines


def _floor_json(r: TaskResult) -> dict[str, Any] | None:
    """Flower's floor for the JSON: its F, its mean round, and fedcare's share of each."""
    if r.floor is None:
        return None
    fixed, _ = r.fixed_and_per_round()
    floor_fixed, floor_round = r.floor_fixed_and_per_round()
    walls = r.round_walls()
    return {
        "fixed_overhead_s": floor_fixed,
        "per_round_s": floor_round,
        "round_walls_s": _round_walls(r.floor, r.rounds),
        "wall_s": r.floor.wall_s,
        "fedcare_fixed_overhead_part_s": fixed - floor_fixed,
        "fedcare_per_round_s": sum(walls.values()) / len(walls),
        "segments": dict(_segments(r.floor, r.rounds)),
        "cpu_s": dict(r.floor.tree.cpu_s),
    }


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
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--json", type=Path, default=None, help="the raw numbers (default: --out with .json)"
    )
    parser.add_argument("--work", type=Path, default=None, help="keep run folders here")
    parser.add_argument(
        "--ray",
        default="shared",
        help="comma list of how each simulation gets Ray: shared (a cluster started beside "
        "the SuperLink, fedcare's default) and/or per-run (flwr-simulation starts its own, "
        "as Flower does); each is simulated against one replay",
    )
    parser.add_argument(
        "--flower-floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the same federation with apps that do no fedcare work "
        "(benchmarks/flower_floor.py), in each --ray mode: Flower's and Ray's own F and round",
    )
    args = parser.parse_args(argv)
    rays = [m.strip() for m in args.ray.split(",") if m.strip()]
    if not rays or set(rays) - {"shared", "per-run"}:
        print("--ray takes shared and/or per-run", file=sys.stderr)
        return 2
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
            for r in run_task(
                task,
                sites=args.sites,
                rounds=args.rounds,
                patients=args.patients,
                work=work / task,
                interval_s=args.interval,
                rays=rays,
                floor=args.flower_floor,
            ):
                fixed, k = r.fixed_and_per_round()
                print(
                    f"[overhead] {r.label}: wall {r.sim.wall_s:.1f} s, pure compute "
                    f"{r.compute.pure_s:.2f} s, ratio {r.ratio:.1f}, F {fixed:.1f} s, "
                    f"k {k:.2f}, leftover processes {len(r.sim.tree.leftover)}",
                    file=sys.stderr,
                    flush=True,
                )
                results.append(r)
    print("[overhead] a fresh actor's imports ...", file=sys.stderr, flush=True)
    actor = measure_actor_start()
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    markdown = render_markdown(results, machine, actor)
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown, encoding="utf-8")
    raw: dict[str, Any] = {"machine": machine, "actor_start": asdict(actor), "results": []}
    for r in results:
        fixed, k = r.fixed_and_per_round()
        c = r.compute
        raw["results"].append(
            asdict(r)
            | {"ratio": r.ratio, "breakdown": _breakdown(r)}
            | {"fixed_overhead_s": fixed, "per_round_factor": k}
            | {
                "accounting_s": c.accounting_s,
                "accounting_share": c.accounting_share,
                "accounting_share_after_round_1": c.accounting_share_after_round_1,
                "epsilon_s": c.epsilon_s,
                "ledger_io_s": c.ledger_io_s,
                "epsilon_share": c.epsilon_share,
                "epsilon_share_after_round_1": c.epsilon_share_after_round_1,
                "warm_hit_s": c.warm_hit_s,
                "cold_load_s": sum(c.cold_load_s.values()),
            }
            | {"flower_floor": _floor_json(r)}
        )
    json_path = args.json if args.json is not None else args.out.with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(raw, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
