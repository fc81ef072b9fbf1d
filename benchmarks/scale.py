"""How a simulated federation grows with the number of hospitals: wall time and peak memory.

For each size N (default 10, 50 and 100 sites) this synthesizes N small hospitals (equal
sizes, ``--patients`` each), then runs :func:`fedcare.simulations.runner.run_experiment` --
fedcare's
ServerApp and ClientApp under ``flwr run`` on a local simulation SuperLink -- for
``--rounds`` rounds of the EHR readmission task, one local epoch, DP-SGD on, baselines off.
Each size runs in a **fresh child process**, so no size inherits another's memory or
imports, and a sampler thread of this process reads, every ``--interval`` seconds, the
``VmRSS`` (``/proc/PID/status``) and ``Pss`` (``/proc/PID/smaps_rollup``) of the child and of
every process descended from it (SuperLink, SuperExec, ``flwr-simulation``, the Ray cluster
and its actors, the ``flwr`` CLI calls) and sums them; the table reports the largest sum
seen. RSS counts pages shared between processes (libraries, Ray's shared-memory object
store) once per process, so the RSS sum over-states real use; PSS splits shared pages
between their users and is the better estimate of what the machine must hold.

Sizes that do not finish within ``--timeout`` seconds are interrupted (SIGINT, so the runner
stops its SuperLink family) and reported with the rounds they completed; their wall time for
all rounds is then an extrapolation from the per-round times in ``progress.jsonl``, marked
as such. After every size the sampler checks that no process of the run is left.

Run from the repository root (``-m`` puts it first on ``sys.path``; opacus ships a top-level
package also named ``benchmarks``)::

    .venv/bin/python -m benchmarks.scale                        # 10, 50, 100 sites x 5 rounds
    .venv/bin/python -m benchmarks.scale --sizes 4,8 --rounds 2 --out /tmp/scale.md

The markdown goes to stdout and to ``--out`` (default ``benchmarks/results/scale.md``), the
raw numbers to ``--json`` if given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "ProcInfo",
    "ProcessTreeSampler",
    "TreeStats",
    "SizeResult",
    "classify",
    "machine_info",
    "run_size",
    "render_markdown",
    "main",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "scale.md"
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024

#: Process categories by a piece of their command line (first match wins).
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Ray client actors", ("ray::ClientAppActor",)),
    ("Ray idle workers", ("ray::IDLE", "default_worker.py")),
    ("flwr-simulation (ServerApp)", ("flwr-simulation",)),
    ("SuperExec", ("flower-superexec",)),
    ("SuperLink", ("flower-superlink",)),
    ("flwr CLI (run/ls)", ("bin/flwr ",)),
    (
        "Ray daemons",
        ("gcs_server", "raylet", "dashboard", "monitor.py", "log_monitor", "ray::", "ray/"),
    ),
)


def classify(cmdline: str, *, root: bool = False) -> str:
    """The category of a process of the run, from its command line.

    >>> classify("/venv/bin/python3 /venv/bin/flwr ls fedcare-sim --format json")
    'flwr CLI (run/ls)'
    >>> classify("ray::ClientAppActor.run")
    'Ray client actors'
    >>> classify("python -m benchmarks.scale", root=True)
    'runner (run_experiment)'
    """
    if root:
        return "runner (run_experiment)"
    for name, needles in CATEGORIES:
        if any(n in cmdline for n in needles):
            return name
    return "other"


@dataclass(frozen=True)
class ProcInfo:
    """One line of ``/proc/PID/stat``: what the tree walk needs."""

    pid: int
    ppid: int
    sid: int
    start: int
    cpu_ticks: int


def _read_procs() -> dict[int, ProcInfo]:
    procs: dict[int, ProcInfo] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            continue
        procs[int(entry.name)] = ProcInfo(
            pid=int(entry.name),
            ppid=int(fields[1]),
            sid=int(fields[3]),
            start=int(fields[19]),
            cpu_ticks=int(fields[11]) + int(fields[12]),
        )
    return procs


def _status_kib(pid: int, path: str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class TreeStats:
    """What :class:`ProcessTreeSampler` saw over its lifetime.

    Attributes
    ----------
    peak_rss_mib, peak_pss_mib:
        Largest sum over the tree of ``VmRSS`` / ``Pss`` in one sample (MiB).
    peak_processes:
        Largest number of live processes in the tree in one sample.
    rss_at_peak_mib:
        ``VmRSS`` by category in the sample of the largest RSS sum.
    cpu_s:
        CPU seconds (user + system) by category since sampling started: each process's
        last reading, less what it had used at the first sample (a process that ended
        between two samples loses what it used since the previous one).
    samples:
        Number of samples taken.
    leftover:
        ``"pid cmdline"`` of processes of the tree still alive at the last call of
        :meth:`ProcessTreeSampler.leftover`.
    """

    peak_rss_mib: float = 0.0
    peak_pss_mib: float = 0.0
    peak_processes: int = 0
    rss_at_peak_mib: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    leftover: list[str] = field(default_factory=list)


class ProcessTreeSampler:
    """Samples memory and CPU of a process and everything it started, in a thread.

    The tree is the root, its descendants (by parent pid), and -- since a daemon that
    outlives its parent is re-parented but keeps its session -- every process in a session
    led by a process once seen in the tree (never the sampler's own session).

    Parameters
    ----------
    root_pid:
        The process whose tree is sampled (included).
    interval_s:
        Seconds between samples.
    pss:
        Also read ``/proc/PID/smaps_rollup`` (slower) for the proportional set size.
    """

    def __init__(self, root_pid: int, *, interval_s: float = 0.5, pss: bool = True) -> None:
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.pss = pss
        self.stats = TreeStats()
        self._sessions: set[int] = set()
        self._seen: dict[tuple[int, int], tuple[str, int]] = {}  # (pid, start) -> (cat, ticks)
        self._baseline: dict[tuple[int, int], int] | None = None  # ticks before sampling
        self._own_sid = os.getsid(0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)

    def members(self) -> list[ProcInfo]:
        """The live processes of the tree now."""
        procs = _read_procs()
        members: dict[int, ProcInfo] = {}
        if self.root_pid in procs:
            members[self.root_pid] = procs[self.root_pid]
        for p in procs.values():
            if p.sid in self._sessions:
                members[p.pid] = p
        children: dict[int, list[ProcInfo]] = {}
        for p in procs.values():
            children.setdefault(p.ppid, []).append(p)
        stack = list(members)
        while stack:
            for child in children.get(stack.pop(), []):
                if child.pid not in members:
                    members[child.pid] = child
                    stack.append(child.pid)
        self._sessions |= {p.sid for p in members.values() if p.sid != self._own_sid}
        return list(members.values())

    def _category(self, p: ProcInfo) -> str:
        """The latest category: a forked child shows its parent's command line until it
        execs, and a command line reads empty while a process renames itself (Ray) or exits,
        so an empty read keeps the earlier category and an actor stays an actor."""
        earlier = self._seen.get((p.pid, p.start), ("", 0))[0]
        cmdline = _cmdline(p.pid)
        if not cmdline:
            return earlier or "other"
        cat = classify(cmdline, root=p.pid == self.root_pid)
        if cat == "Ray idle workers" and earlier == "Ray client actors":
            return earlier
        return cat

    def sample(self) -> None:
        """Take one sample (the thread calls this every ``interval_s``)."""
        members = self.members()
        if self._baseline is None:
            self._baseline = {(p.pid, p.start): p.cpu_ticks for p in members}
        rss_by_cat: dict[str, float] = {}
        rss = pss = 0
        for p in members:
            cat = self._category(p)
            self._seen[(p.pid, p.start)] = (cat, p.cpu_ticks)
            kib = _status_kib(p.pid, "status", "VmRSS:")
            rss += kib
            rss_by_cat[cat] = rss_by_cat.get(cat, 0.0) + kib / 1024
            if self.pss:
                pss += _status_kib(p.pid, "smaps_rollup", "Pss:")
        s = self.stats
        s.samples += 1
        s.peak_processes = max(s.peak_processes, len(members))
        if rss / 1024 > s.peak_rss_mib:
            s.peak_rss_mib = rss / 1024
            s.rss_at_peak_mib = {k: round(v, 1) for k, v in sorted(rss_by_cat.items())}
        s.peak_pss_mib = max(s.peak_pss_mib, pss / 1024)
        cpu: dict[str, float] = {}
        for key, (cat, ticks) in self._seen.items():
            used = ticks - self._baseline.get(key, 0)
            cpu[cat] = cpu.get(cat, 0.0) + used / _TICKS
        s.cpu_s = {k: round(v, 2) for k, v in sorted(cpu.items())}

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def start(self) -> ProcessTreeSampler:
        self._thread.start()
        return self

    def stop(self) -> TreeStats:
        """Stop sampling (after one last sample) and return the statistics."""
        self._stop.set()
        self._thread.join()
        return self.stats

    def leftover(self, *, exclude_root: bool = True) -> list[str]:
        """Processes of the tree still alive (``"pid cmdline"``); recorded in the stats."""
        alive = [
            f"{p.pid} {_cmdline(p.pid)[:100]}"
            for p in self.members()
            if not (exclude_root and p.pid == self.root_pid)
        ]
        self.stats.leftover = alive
        return alive

    def kill_all(self) -> None:
        """SIGKILL every live process of the tree (after a run that would not stop)."""
        for p in self.members():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p.pid, signal.SIGKILL)


def machine_info() -> dict[str, Any]:
    """nproc, memory, load average, interpreter and library versions (no heavy imports)."""
    from importlib.metadata import version

    with open("/proc/meminfo", encoding="ascii") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "machine": platform.machine(),
        "nproc": os.cpu_count(),
        "available_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "torch": version("torch"),
        "flwr": version("flwr"),
        "opacus": version("opacus"),
        "ray": version("ray"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# --------------------------------------------------------------------------- one size


@dataclass
class SizeResult:
    """One federation size: timings, memory and what completed."""

    sites: int
    rounds_planned: int
    rounds_completed: int
    patients_per_site: int
    synth_s: float
    wall_s: float | None
    elapsed_s: float
    wall_all_rounds_s: float | None
    extrapolated: bool
    startup_s: float | None
    round_s: list[float]
    status: str
    tree: TreeStats
    final_metrics: dict[str, float] = field(default_factory=dict)


def _child_main(spec_path: Path) -> int:
    """Run one experiment (the child process of one size) and write its timings."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from fedcare.simulations.runner import run_experiment
    from fedcare.simulations.scenario import Scenario

    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    scenario = Scenario.model_validate(spec["scenario"])
    t0 = time.monotonic()
    outcome = run_experiment(scenario, Path(spec["out"]), timeout_s=float(spec["timeout_s"]))
    wall = time.monotonic() - t0
    result = {"wall_s": wall, "rounds_completed": outcome.summary.rounds_completed}
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


def _progress(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "progress.jsonl"
    if not path.is_file():
        return []
    complete = path.read_text(encoding="utf-8").split("\n")[:-1]  # a line being written
    return [json.loads(line) for line in complete if line.strip()]


def run_size(
    n_sites: int,
    *,
    rounds: int,
    patients: int,
    work: Path,
    timeout_s: float,
    interval_s: float,
    seed: int = 0,
) -> SizeResult:
    """Synthesize ``n_sites`` hospitals, run the federation in a child process, sample it."""
    from fedcare.simulations.synth import SynthConfig, synthesize

    work.mkdir(parents=True, exist_ok=True)
    synth_cfg = SynthConfig(patients_per_site=patients, size_skew=0.0)
    t0 = time.monotonic()
    synthesize(work / "sites", n_sites=n_sites, seed=seed, config=synth_cfg, force=True)
    synth_s = time.monotonic() - t0
    scenario = {
        "name": f"scale-{n_sites}",
        "seed": seed,
        "data_root": str(work / "sites"),
        "baselines": False,
        "federation": {
            "task": "readmission",
            "num-server-rounds": rounds,
            "local-epochs": 1,
            "dp": True,
            # Splits of ~50 patients hold ~7 (15 %): below the default of 10 every
            # evaluation would be withheld and no evaluation would be computed.
            "site-min-count": 5,
            "round-timeout": timeout_s,
        },
    }
    spec = {
        "scenario": scenario,
        "out": str(work / "run"),
        "result": str(work / "result.json"),
        "timeout_s": timeout_s,
    }
    (work / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    cmd = [sys.executable, "-m", "benchmarks.scale", "--child", str(work / "spec.json")]
    with open(work / "child.log", "wb") as log:
        child = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = ProcessTreeSampler(child.pid, interval_s=interval_s).start()
        t_start = time.monotonic()
        seen: dict[int, float] = {}  # round -> seconds from the child's start to its line
        status = "completed"
        while child.poll() is None:
            for entry in _progress(work / "run"):
                seen.setdefault(int(entry["round"]), time.monotonic() - t_start)
            if time.monotonic() - t_start > timeout_s:
                status = "timed out"
                child.send_signal(signal.SIGINT)  # the runner stops its SuperLink family
                try:
                    child.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    sampler.kill_all()
                    child.wait()
                break
            time.sleep(0.25)
        elapsed = time.monotonic() - t_start
        sampler.sample()
        tree = sampler.stop()
    if status == "completed" and child.returncode != 0:
        status = f"failed (exit {child.returncode}; see {work / 'child.log'})"
    time.sleep(1.0)
    if sampler.leftover():
        sampler.kill_all()

    # Round times from the ServerApp's own clock (elapsed_s of each progress line).
    elapsed_at = {int(p["round"]): float(p["elapsed_s"]) for p in _progress(work / "run")}
    rounds_done = max((r for r in elapsed_at if r > 0), default=0)
    round_s = [
        round(elapsed_at[r] - elapsed_at[r - 1], 2)
        for r in range(1, rounds_done + 1)
        if r - 1 in elapsed_at
    ]
    wall: float | None = None
    result_file = work / "result.json"
    if status == "completed" and result_file.is_file():
        wall = float(json.loads(result_file.read_text())["wall_s"])
    final: dict[str, float] = {}
    summary_file = work / "run" / "summary.json"
    if summary_file.is_file():
        final = json.loads(summary_file.read_text()).get("global", {}).get("final", {})
    # Start-up: the child's start until round 0 (the initial evaluation) is done.
    startup = seen.get(0)
    extrapolated = rounds_done < rounds
    wall_all: float | None = wall if wall is not None else elapsed
    if extrapolated:
        # Start-up + the mean measured round x planned rounds + ~5 s finish and teardown
        # (measured by benchmarks.federation_overhead); nothing to go on without a round.
        mean_round = sum(round_s) / len(round_s) if round_s else None
        wall_all = (
            None if mean_round is None or startup is None else startup + mean_round * rounds + 5.0
        )
    return SizeResult(
        sites=n_sites,
        rounds_planned=rounds,
        rounds_completed=rounds_done,
        patients_per_site=patients,
        synth_s=round(synth_s, 2),
        wall_s=None if wall is None else round(wall, 2),
        elapsed_s=round(elapsed, 1),
        wall_all_rounds_s=None if wall_all is None else round(wall_all, 1),
        extrapolated=extrapolated,
        startup_s=None if startup is None else round(startup, 1),
        round_s=round_s,
        status=status,
        tree=tree,
        final_metrics={k: v for k, v in final.items() if k in ("test.auroc", "test.n")},
    )


# --------------------------------------------------------------------------- report


def _fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def render_markdown(results: Sequence[SizeResult], machine: dict[str, Any]) -> str:
    """The report: machine line, settings, the table and a linearity check."""
    m = machine
    lines = [
        "# Scale: simulated hospitals on one machine",
        "",
        f"Machine: {m['machine']}, {m['nproc']} CPUs ({m['available_cpus']} available), "
        f"{m['memory_gib']} GiB RAM, python {m['python']}, torch {m['torch']}, flwr {m['flwr']}, "
        f"ray {m['ray']}, opacus {m['opacus']}; load average {m['loadavg_start']} at start, "
        f"{m.get('loadavg_end')} at end; {m['date']}.",
        "",
    ]
    if results:
        r0 = results[0]
        lines += [
            f"Settings: EHR readmission task, {r0.patients_per_site} patients per site (equal "
            f"sizes), {r0.rounds_planned} rounds, 1 local epoch, batch 64, DP-SGD on "
            "(target epsilon 8, PRV), FedAvg, every site trains and evaluates every round, "
            "baselines off, site-min-count 5, Flower simulation with 1 CPU per client (so 2 "
            "Ray client actors on 2 cores). Wall = `run_experiment` in a fresh process "
            "(synthesis excluded, shown apart). Start-up = from the start of that process until "
            "round 0 (the initial evaluation) is done; s/round from the ServerApp's clock. "
            "Memory = sum over the process tree, sampled every "
            f"{machine.get('interval_s', 0.5)} s.",
            "",
            "| sites | rounds done | wall s | start-up s | mean s/round | s per site-round | "
            "peak RSS sum MiB | peak PSS sum MiB | processes | synth s | status |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
    for r in results:
        mean_round = sum(r.round_s) / len(r.round_s) if r.round_s else None
        per_site_round = None if mean_round is None else mean_round / r.sites
        wall = _fmt(r.wall_all_rounds_s) + (" (extrapolated)" if r.extrapolated else "")
        if r.wall_all_rounds_s is None:
            wall = f"> {_fmt(r.elapsed_s)} (no round done)"
        lines.append(
            f"| {r.sites} | {r.rounds_completed}/{r.rounds_planned} | {wall} | "
            f"{_fmt(r.startup_s)} | {_fmt(mean_round, 2)} | {_fmt(per_site_round, 3)} | "
            f"{_fmt(r.tree.peak_rss_mib, 0)} | {_fmt(r.tree.peak_pss_mib, 0)} | "
            f"{r.tree.peak_processes} | {_fmt(r.synth_s)} | {r.status} |"
        )
    if results:
        lines += ["", "RSS at the peak, by process (MiB):", ""]
        cats = sorted({c for r in results for c in r.tree.rss_at_peak_mib})
        lines.append("| sites | " + " | ".join(cats) + " |")
        lines.append("|---:|" + "---:|" * len(cats))
        for r in results:
            cells = [_fmt(r.tree.rss_at_peak_mib.get(c), 0) for c in cats]
            lines.append(f"| {r.sites} | " + " | ".join(cells) + " |")
        lines += ["", "CPU seconds by process over the whole run:", ""]
        cats = sorted({c for r in results for c in r.tree.cpu_s})
        lines.append("| sites | " + " | ".join(cats) + " |")
        lines.append("|---:|" + "---:|" * len(cats))
        for r in results:
            cells = [_fmt(r.tree.cpu_s.get(c), 1) for c in cats]
            lines.append(f"| {r.sites} | " + " | ".join(cells) + " |")
    lines += ["", *_linearity(results)]
    return "\n".join(lines).rstrip() + "\n"


def _linearity(results: Sequence[SizeResult]) -> list[str]:
    """Fit wall = a + b * sites on the smallest and largest size; check the ones between."""
    ok = [r for r in results if r.round_s]
    if len(ok) < 2:
        return []
    lo, hi = ok[0], ok[-1]

    def per_round(r: SizeResult) -> float:
        return sum(r.round_s) / len(r.round_s)

    slope = (per_round(hi) - per_round(lo)) / (hi.sites - lo.sites)
    out = [
        f"Linearity: the mean round time grows by {slope:.3f} s per added site between "
        f"{lo.sites} and {hi.sites} sites (line through those two)."
    ]
    for r in ok[1:-1]:
        predicted = per_round(lo) + slope * (r.sites - lo.sites)
        out.append(
            f"At {r.sites} sites the line predicts {predicted:.2f} s/round; measured "
            f"{per_round(r):.2f} s ({(per_round(r) / predicted - 1) * 100:+.0f} %)."
        )
    mem_slope = (hi.tree.peak_pss_mib - lo.tree.peak_pss_mib) / (hi.sites - lo.sites)
    out.append(
        f"Peak PSS grows by {mem_slope:.1f} MiB per added site; extrapolated to 1000 sites: "
        f"{(hi.tree.peak_pss_mib + mem_slope * (1000 - hi.sites)) / 1024:.2f} GiB."
    )
    return out


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise SystemExit(f"--sizes {text!r}: give whole numbers separated by commas") from e
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--sizes {text!r}: every size must be >= 1 (e.g. 10,50,100)")
    return sorted(set(sizes))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    parser.add_argument("--sizes", default="10,50,100", help="numbers of sites (comma list)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--patients", type=int, default=50, help="patients per site")
    parser.add_argument("--timeout", type=float, default=660.0, help="seconds per size")
    parser.add_argument("--interval", type=float, default=0.5, help="sampling period, s")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers")
    parser.add_argument("--work", type=Path, default=None, help="keep run folders here")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return _child_main(args.child)
    sizes = _parse_sizes(args.sizes)
    if args.rounds < 1 or args.patients < 10:
        print("--rounds must be >= 1 and --patients >= 10", file=sys.stderr)
        return 2
    machine = machine_info() | {"interval_s": args.interval}
    results: list[SizeResult] = []
    with tempfile.TemporaryDirectory(prefix="fedcare-scale-") as tmp:
        work = args.work or Path(tmp)
        for n in sizes:
            print(f"[scale] {n} sites x {args.rounds} rounds ...", file=sys.stderr, flush=True)
            r = run_size(
                n,
                rounds=args.rounds,
                patients=args.patients,
                work=work / f"sites-{n}",
                timeout_s=args.timeout,
                interval_s=args.interval,
            )
            print(
                f"[scale] {n} sites: {r.status}, wall {r.wall_all_rounds_s} s, peak RSS "
                f"{r.tree.peak_rss_mib:.0f} MiB, PSS {r.tree.peak_pss_mib:.0f} MiB, "
                f"leftover processes {len(r.tree.leftover)}",
                file=sys.stderr,
                flush=True,
            )
            results.append(r)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    markdown = render_markdown(results, machine)
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown, encoding="utf-8")
    raw = {"machine": machine, "results": [asdict(r) for r in results]}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(raw, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
