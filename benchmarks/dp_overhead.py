"""The cost of DP-SGD per model: seconds per epoch with and without Opacus, and peak memory.

For every registered model, on synthetic random tensors of the model's input shape, this
times one local epoch (the same number of optimizer steps either way) of

* **non-private** training: a shuffled ``DataLoader`` of ``batch_size``, the model's loss
  (:meth:`fedcare.models.tasks.TaskKind.make_loss`),
  :func:`fedcare.client.training.make_optimizer`, and
  :func:`fedcare.client.training.fit` -- what ``SiteTrainer.train_round`` runs with DP off;
* **DP-SGD** through :func:`fedcare.client.dpsgd.make_private` (Poisson sampling at
  ``q = 1 / ceil(n / batch_size)``, so an epoch is the same number of steps), then the same
  :func:`fedcare.client.training.fit` -- once in the grad-sample mode fedcare picks
  (:func:`fedcare.client.dpsgd.resolve_grad_sample_mode` given the built model:
  ``"bookkeeping"``, one backward pass, where every trainable layer is ``nn.Linear``,
  ``nn.Conv2d`` or ``nn.GroupNorm``, else ``"hooks"``) and once per extra mode asked
  for (``"ghost"`` and ``"hooks"`` by default, so each mode's cost shows).

Protocol: one warm-up epoch per configuration (excluded), then ``repeats`` rounds in which
every configuration runs one epoch, in an order rotated each round; the ratio is the median
over rounds of ``DP time / non-private time`` of the same round, so slow drift of a shared
machine cancels. ``--clock cpu`` times an epoch by the process's CPU time
(``time.process_time``) instead of the wall clock: on a machine shared with other work, with
``--threads 1``, the time this process waits for a core is then left out. Peak memory is
measured in a fresh subprocess per configuration (``resource.getrusage`` high-water RSS; on
CUDA also ``torch.cuda.max_memory_allocated``), since ``tracemalloc`` does not see torch's
allocations.

Run from the repository root::

    .venv/bin/python -m benchmarks.dp_overhead                 # all models, ~2-3 min on 2 cores
    .venv/bin/python -m benchmarks.dp_overhead --threads 1 --breakdown
    .venv/bin/python -m benchmarks.dp_overhead --threads 1 --clock cpu --batch-size 64
    .venv/bin/python -m benchmarks.dp_overhead --models ehr_mlp --samples 512 --repeats 1

The markdown table goes to stdout and to ``--out`` (default
``benchmarks/results/dp_overhead.md``), the raw numbers to the same path with ``.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, cast

import opacus
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedcare.client.data.datasets import ImageDataset, MultimodalDataset, TabularDataset
from fedcare.client.dpsgd import DPPlan, make_private, resolve_grad_sample_mode, sampling
from fedcare.client.training import TrainConfig, fit, make_optimizer, resolve_device
from fedcare.common.errors import ConfigError
from fedcare.common.spec import MODALITIES
from fedcare.models import available_models, build_model, model_info
from fedcare.models.tasks import task_kind

__all__ = [
    "Case",
    "BenchConfig",
    "ConfigResult",
    "default_cases",
    "synthetic_dataset",
    "build_run",
    "time_case",
    "probe_memory",
    "run_benchmark",
    "render_markdown",
    "main",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("benchmarks/results/dp_overhead.md")
NON_PRIVATE = "non-private"
#: Extra genomics width, beside the synthetic schema's, to show "thousands of inputs".
WIDE_GENOMICS = 2000
#: Fixed noise for the timing: the cost of DP-SGD does not depend on sigma.
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
PROBE_TIMEOUT_S = 600

Mode = Literal["auto", "bookkeeping", "ghost", "hooks", "functorch"]
Clock = Literal["wall", "cpu"]


# ------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    """One model at one input size.

    Attributes
    ----------
    model:
        A registered model name.
    input_dims:
        Modality -> shape, as :func:`models.build_model` takes it.
    """

    model: str
    input_dims: Mapping[str, int | tuple[int, int, int]]

    @property
    def input_label(self) -> str:
        """Short text of the input size, e.g. ``d=57, 1x32x32, g=200``."""
        parts = []
        for modality in MODALITIES:
            if modality not in self.input_dims:
                continue
            dim = self.input_dims[modality]
            if modality == "imaging":
                assert isinstance(dim, tuple)
                parts.append("x".join(str(v) for v in dim))
            else:
                parts.append(f"{'d' if modality == 'ehr' else 'g'}={dim}")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "input_dims": {k: v for k, v in self.input_dims.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Case:
        dims = {
            k: tuple(int(x) for x in v) if isinstance(v, list) else int(v)
            for k, v in data["input_dims"].items()
        }
        return cls(model=str(data["model"]), input_dims=dims)  # type: ignore[arg-type]


def synthetic_input_dims() -> dict[str, int | tuple[int, int, int]]:
    """Input sizes of the synthetic hospitals' schema (``fedcare synthesize`` defaults).

    The EHR width is the encoded width (one-hot categories and missingness flags
    included) that :func:`fedcare.common.encoding.input_dims` derives from the schema.
    """
    # Imported here: the synthetic generator is only needed to size the inputs.
    from fedcare.common.encoding import input_dims
    from fedcare.common.spec import TaskSpec
    from fedcare.simulations.synth.config import SynthConfig
    from fedcare.simulations.synth.generator import build_schema
    from fedcare.simulations.synth.genomics import draw_biology
    from fedcare.simulations.synth.latent import rng_for

    config = SynthConfig()
    biology = draw_biology(rng_for(0, "biology"), n_genes=config.n_genes)
    schema = build_schema(config, biology)
    task = TaskSpec.model_validate(
        {"name": "bench", "label": "bench", "modalities": list(MODALITIES)}
    )
    return dict(input_dims(schema, task))


def timeline_input_dims() -> dict[str, Any]:
    """Input sizes of the synthetic temporal task (``SynthConfig(temporal_signal=True)``,
    task ``infection_timeline``): the EHR vector with the ``stay`` timeline appended."""
    from fedcare.common.encoding import input_dims
    from fedcare.simulations.synth.config import SynthConfig
    from fedcare.simulations.synth.generator import build_schema
    from fedcare.simulations.synth.genomics import draw_biology
    from fedcare.simulations.synth.latent import rng_for
    from fedcare.simulations.synth.timeline import temporal_tasks

    config = SynthConfig(temporal_signal=True)
    schema = build_schema(config, draw_biology(rng_for(0, "biology"), n_genes=config.n_genes))
    task = temporal_tasks("outcomes.csv")[1][1]
    return dict(input_dims(schema, task))


def default_cases(
    models: Sequence[str] | None = None, *, genomics_widths: Sequence[int] | None = None
) -> tuple[Case, ...]:
    """Every registered model at the synthetic schema's sizes (genomics also at 2,000).

    Parameters
    ----------
    models:
        Registered names to keep (default: all).
    genomics_widths:
        Widths for the genomics-only model (default: the schema's and 2,000).
    """
    dims = synthetic_input_dims()
    names = tuple(models) if models else available_models()
    unknown = sorted(set(names) - set(available_models()))
    if unknown:
        raise ConfigError(
            f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(available_models())}"
        )
    schema_width = cast(int, dims["genomics"])
    widths = tuple(genomics_widths) if genomics_widths else (schema_width, WIDE_GENOMICS)
    cases: list[Case] = []
    for name in names:
        info = model_info(name)
        if info.modalities == ("genomics",) and not info.multimodal:
            cases.extend(Case(name, {"genomics": g}) for g in dict.fromkeys(widths))
        elif info.timeline and not info.multimodal:
            cases.append(Case(name, timeline_input_dims()))
        else:
            cases.append(Case(name, {m: dims[m] for m in info.modalities}))
    return tuple(cases)


# ------------------------------------------------------------------------------ data


def _random_input(dim: int | tuple[int, int, int], n: int, gen: torch.Generator) -> torch.Tensor:
    shape = (n, *dim) if isinstance(dim, tuple) else (n, dim)
    return torch.randn(shape, generator=gen)


def _single_dataset(case: Case, n: int, gen: torch.Generator) -> Dataset[Any]:
    (modality,) = model_info(case.model).modalities
    x = _random_input(case.input_dims[modality], n, gen)
    y = torch.bernoulli(torch.full((n,), 0.5), generator=gen)
    return ImageDataset(x, y) if modality == "imaging" else TabularDataset(x, y)


def _multimodal_dataset(case: Case, n: int, gen: torch.Generator) -> Dataset[Any]:
    xs = [
        _random_input(case.input_dims[m], n, gen) if m in case.input_dims else torch.zeros(n, 0)
        for m in MODALITIES
    ]
    mask = torch.tensor([[float(m in case.input_dims) for m in MODALITIES]]).expand(n, -1)
    y = torch.bernoulli(torch.full((n,), 0.5), generator=gen)
    return MultimodalDataset(xs[0], xs[1], xs[2], mask, y)


#: Dataset builders by "is the model multimodal" (the two input conventions of the registry).
_DATASETS: dict[bool, Callable[[Case, int, torch.Generator], Dataset[Any]]] = {
    False: _single_dataset,
    True: _multimodal_dataset,
}


def synthetic_dataset(case: Case, n: int, *, seed: int = 0) -> Dataset[Any]:
    """``n`` random patients in the dataset class the data layer builds for ``case``.

    Inputs are standard normal (every modality present), labels fair coin flips.

    >>> ds = synthetic_dataset(Case("ehr_mlp", {"ehr": 7}), 10)
    >>> [tuple(t.shape) for t in ds[0]]
    [(7,), ()]
    """
    gen = torch.Generator().manual_seed(seed)
    return _DATASETS[model_info(case.model).multimodal](case, n, gen)


# ------------------------------------------------------------------------------ runs


@dataclass
class Run:
    """One configuration ready to train: what :func:`fedcare.client.training.fit` receives."""

    name: str
    model: nn.Module
    loader: Any
    optimizer: torch.optim.Optimizer
    criterion: Any
    params: int


def resolve_mode(mode: str, case: Case) -> str:
    """``auto`` -> what fedcare picks for the built model
    (:func:`fedcare.client.dpsgd.resolve_grad_sample_mode` with ``model=``)."""
    model = build_model(case.model, input_dims=case.input_dims)
    return resolve_grad_sample_mode(mode, case.model, model=model)


def build_run(
    case: Case,
    mode: str,
    *,
    dataset: Dataset[Any],
    batch_size: int,
    device: torch.device,
    seed: int = 0,
) -> Run:
    """A fresh model, optimizer, loss and loader for ``mode`` (``"non-private"`` or a DP mode).

    The DP path is :func:`fedcare.client.dpsgd.make_private` with a plan from
    :func:`fedcare.client.dpsgd.sampling`, as ``SiteTrainer.train_round`` builds it.
    """
    model = build_model(
        case.model, input_dims=case.input_dims, generator=torch.Generator().manual_seed(seed)
    )
    model.to(device)
    params = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(model=case.model, batch_size=batch_size)
    optimizer = make_optimizer(model.parameters(), cfg)
    criterion = task_kind("binary").make_loss()
    sampling_gen = torch.Generator().manual_seed(seed + 1)
    if mode == NON_PRIVATE:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=sampling_gen)
        return Run(NON_PRIVATE, model, loader, optimizer, criterion, params)
    q, steps = sampling(len(dataset), batch_size=batch_size, epochs=1)  # type: ignore[arg-type]
    plan = DPPlan(
        noise_multiplier=NOISE_MULTIPLIER, sample_rate=q, steps=steps, max_grad_norm=MAX_GRAD_NORM
    )
    private = make_private(
        model=model,
        optimizer=optimizer,
        criterion=criterion,
        dataset=dataset,
        batch_size=batch_size,
        plan=plan,
        grad_sample_mode=mode,
        sampling_generator=sampling_gen,
        noise_generator=torch.Generator(device=device).manual_seed(seed + 2),
    )
    return Run(mode, private.model, private.loader, private.optimizer, private.criterion, params)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Epoch timers by ``--clock``: wall time, or the process's CPU time (all its threads).
_TIMERS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def run_epoch(run: Run, device: torch.device, *, clock: Clock = "wall") -> tuple[float, int]:
    """Seconds and optimizer steps of one epoch of :func:`fedcare.client.training.fit`."""
    timer = _TIMERS[clock]
    gc.collect()
    _sync(device)
    start = timer()
    stats = fit(
        run.model,
        run.loader,
        optimizer=run.optimizer,
        criterion=run.criterion,
        epochs=1,
        device=device,
    )
    _sync(device)
    return timer() - start, stats.steps


# ------------------------------------------------------------------------------ phases


class _Clock:
    """Accumulates seconds per phase; synchronises CUDA around each measurement."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    def timed(self, phase: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        _sync(self.device)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _sync(self.device)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


class _TimedLoader:
    def __init__(self, loader: Any, clock: _Clock) -> None:
        self.loader, self.clock = loader, clock

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        while True:
            try:
                batch = self.clock.timed("data", next, it)
            except StopIteration:
                return
            yield batch


class _TimedLoss:
    def __init__(self, loss: Any, clock: _Clock) -> None:
        self.loss, self.clock = loss, clock

    def backward(self) -> None:
        self.clock.timed("backward", self.loss.backward)

    def item(self) -> float:
        return float(self.loss.item())


class _TimedCriterion:
    def __init__(self, criterion: Any, clock: _Clock) -> None:
        self.criterion, self.clock = criterion, clock

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> _TimedLoss:
        return _TimedLoss(self.clock.timed("loss", self.criterion, logits, y), self.clock)


class _TimedOptimizer:
    def __init__(self, optimizer: torch.optim.Optimizer, clock: _Clock) -> None:
        self.optimizer, self.clock = optimizer, clock
        self.param_groups = optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.clock.timed("zero_grad", self.optimizer.zero_grad, set_to_none=set_to_none)

    def step(self) -> None:
        self.clock.timed("step", self.optimizer.step)


class _TimedModel:
    def __init__(self, model: nn.Module, clock: _Clock) -> None:
        self.model, self.clock = model, clock

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.clock.timed("forward", self.model, *inputs)
        return out


PHASES = ("data", "forward", "loss", "backward", "step", "zero_grad", "other")


def phase_breakdown(run: Run, device: torch.device) -> dict[str, float]:
    """Seconds per phase of one epoch of the *unmodified* :func:`fedcare.client.training.fit`.

    The loader, model, loss and optimizer are wrapped in timing proxies (CUDA is
    synchronised around each phase), so ``fit`` itself runs as fedcare runs it. Under
    bookkeeping ``backward`` holds the one backward pass, the per-sample norms and the
    clipped sum; under ghost clipping both backward passes and the norms; under hooks it
    holds the per-sample gradients and ``step`` the clipping; ``step`` always holds noise and
    the optimizer update. ``other`` is the rest of the loop (batch transfer, ``loss.item()``).
    """
    clock = _Clock(device)
    gc.collect()
    _sync(device)
    start = time.perf_counter()
    stats = fit(
        _TimedModel(run.model, clock),  # type: ignore[arg-type]
        _TimedLoader(run.loader, clock),
        optimizer=_TimedOptimizer(run.optimizer, clock),  # type: ignore[arg-type]
        criterion=_TimedCriterion(run.criterion, clock),  # type: ignore[arg-type]
        epochs=1,
        device=device,
    )
    _sync(device)
    total = time.perf_counter() - start
    out = {phase: clock.seconds.get(phase, 0.0) for phase in PHASES if phase != "other"}
    out["other"] = max(0.0, total - sum(out.values()))
    out["total"] = total
    out["steps"] = float(stats.steps)
    return out


# ------------------------------------------------------------------------------ config


class BenchConfig(BaseModel):
    """Settings of one benchmark run. Frozen; unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: tuple[str, ...] = ()
    genomics_widths: tuple[int, ...] = ()
    modes: tuple[Mode, ...] = ("auto", "ghost", "hooks")
    samples: int = Field(default=4096, ge=1)
    batch_size: int = Field(default=256, ge=1)
    repeats: int = Field(default=5, ge=1)
    threads: int = Field(default_factory=lambda: _available_cores(), ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    memory: bool = True
    breakdown: bool = False
    clock: Clock = "wall"
    seed: int = Field(default=0, ge=0)

    @field_validator("genomics_widths")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(w < 1 for w in v):
            raise ValueError("genomics widths must be positive")
        return v


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ------------------------------------------------------------------------------ measure


@dataclass
class ConfigResult:
    """Measurements of one configuration of one case (``mode`` may be ``non-private``)."""

    mode: str
    auto: bool
    seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    steps: int = 0
    memory: dict[str, float] | None = None
    phases: dict[str, float] | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None


def time_case(
    case: Case, cfg: BenchConfig, device: torch.device, *, log: Callable[[str], None]
) -> tuple[int, list[ConfigResult]]:
    """Warm-up, then ``cfg.repeats`` interleaved epochs of every configuration of ``case``.

    Returns the parameter count and one :class:`ConfigResult` per configuration, the
    non-private one first; a DP result's ``ratios`` are per-round ratios to the non-private
    epoch of the same round.
    """
    dataset = synthetic_dataset(case, cfg.samples, seed=cfg.seed)
    auto = resolve_mode("auto", case)
    modes = list(dict.fromkeys(resolve_mode(m, case) for m in cfg.modes))
    names = [NON_PRIVATE, *modes]
    runs = {
        name: build_run(
            case, name, dataset=dataset, batch_size=cfg.batch_size, device=device, seed=cfg.seed
        )
        for name in names
    }
    results = {name: ConfigResult(mode=name, auto=name == auto) for name in names}
    for name in names:  # warm-up epoch, excluded
        _, results[name].steps = run_epoch(runs[name], device, clock=cfg.clock)
    for r in range(cfg.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        this_round: dict[str, float] = {}
        for name in order:
            seconds, steps = run_epoch(runs[name], device, clock=cfg.clock)
            if steps != results[name].steps:
                raise RuntimeError(f"{name} ran {steps} steps, then {results[name].steps}")
            this_round[name] = seconds
            results[name].seconds.append(seconds)
        for name in modes:
            results[name].ratios.append(this_round[name] / this_round[NON_PRIVATE])
        log(
            f"  round {r + 1}/{cfg.repeats}: "
            + ", ".join(f"{n} {this_round[n]:.3f}s" for n in names)
        )
    if cfg.breakdown:
        for name in names:
            results[name].phases = phase_breakdown(runs[name], device)
    params = runs[NON_PRIVATE].params
    return params, [results[n] for n in names]


def _peak_rss_mb() -> float:
    """High-water resident set of this process, in MiB.

    On Linux this is ``VmHWM`` of ``/proc/self/status``: the peak of the *current* address
    space. ``getrusage(...).ru_maxrss`` would be wrong in a subprocess there, because the
    kernel carries the parent's resident set over ``fork`` and ``execve`` into the child's
    ``ru_maxrss`` (a 1.4 GB parent made every child report 1.4 GB). Elsewhere
    ``ru_maxrss`` is used (KiB on Linux-likes, bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 2**10


def _probe(payload: Mapping[str, Any]) -> dict[str, float]:
    """Inside the fresh subprocess: build one configuration, train two epochs, report peaks."""
    case = Case.from_json(payload["case"])
    device = torch.device(payload["device"])
    torch.set_num_threads(int(payload["threads"]))
    dataset = synthetic_dataset(case, int(payload["samples"]), seed=int(payload["seed"]))
    run = build_run(
        case,
        str(payload["mode"]),
        dataset=dataset,
        batch_size=int(payload["batch_size"]),
        device=device,
        seed=int(payload["seed"]),
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _peak_rss_mb()
    for _ in range(2):
        run_epoch(run, device)
    out = {
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_training_mb": before,
    }
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def probe_memory(case: Case, mode: str, cfg: BenchConfig, device: torch.device) -> dict[str, float]:
    """Peak memory of one configuration, measured in a fresh Python subprocess.

    ``peak_rss_mb`` is the process's high-water resident set (torch and Opacus imported,
    data built, two epochs trained); ``rss_before_training_mb`` the high-water mark just
    before training, so their difference is what training added.
    """
    payload = {
        "case": case.to_json(),
        "mode": mode,
        "device": str(device),
        "threads": cfg.threads,
        "samples": cfg.samples,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.dp_overhead", "--probe", json.dumps(payload)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"memory probe for {case.model} ({mode}) failed with exit code {proc.returncode}: "
            f"{proc.stderr.strip()[-2000:]}"
        )
    result: dict[str, float] = json.loads(lines[-1])
    return result


# ------------------------------------------------------------------------------ report


def machine_info(cfg: BenchConfig, device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cores_available": _available_cores(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _fmt_mb(memory: Mapping[str, float] | None, key: str) -> str:
    if not memory or key not in memory:
        return "-"
    added = memory[key] - memory["rss_before_training_mb"] if key == "peak_rss_mb" else None
    return f"{memory[key]:.0f}" + (f" (+{added:.0f})" if added is not None else "")


def _busy(machine: Mapping[str, Any]) -> float | None:
    """The highest 1-minute load seen, when it exceeded the available cores."""
    loads = [machine[k][0] for k in ("load_average_start", "load_average_end") if k in machine]
    peak = max(loads, default=0.0)
    return peak if peak > machine["cores_available"] else None


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown: machine, settings, the table, and the phase table if any."""
    m, s = report["machine"], report["settings"]
    cuda = str(m["device"]).startswith("cuda")
    mem_key = "peak_cuda_mb" if cuda else "peak_rss_mb"
    mem_head = "peak CUDA MB" if cuda else "peak RSS MB (+training)"
    lines = [
        "# DP-SGD overhead per model",
        "",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs ({m['cores_available']} available), "
        f"torch {m['torch']}, opacus {m['opacus']}, python {m['python']}, "
        f"device {m['device']}" + (f" ({m['gpu']})" if "gpu" in m else "") + f", "
        f"threads {m['threads']}, load average {m.get('load_average_start', '?')} at start, "
        f"{m.get('load_average_end', '?')} at end; {m['date_utc']} UTC.",
        "",
        f"Settings: {s['samples']} samples, batch size {s['batch_size']} "
        f"({report['steps_per_epoch']} steps per epoch either way), median of "
        f"{s['repeats']} interleaved epochs after one warm-up, Adam, noise multiplier "
        f"{NOISE_MULTIPLIER}, max grad norm {MAX_GRAD_NORM}; epochs timed by "
        + ("the process's CPU time" if s.get("clock") == "cpu" else "the wall clock")
        + ". *auto* marks the mode fedcare "
        "picks. Ratio = median over rounds of DP / non-private epoch time of the same round.",
        "",
        f"| model | input | params | mode | non-private s/epoch | DP s/epoch | ratio "
        f"| {mem_head} | non-private {mem_head} |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    busy = _busy(m)
    if busy is not None:
        lines[4:4] = [
            f"**Caution**: the 1-minute load average reached {busy:.1f} on "
            f"{m['cores_available']} available cores; other processes competed for the CPU, "
            "so these times are unreliable (with more than one thread, torch's thread pool "
            "collapses under contention). Rerun on a quiet machine, or with `--threads 1`.",
            "",
        ]
    for row in report["rows"]:
        mode = row["mode"] + (" (auto)" if row["auto"] else "")
        lines.append(
            f"| {row['model']} | {row['input']} | {row['params']:,} | {mode} "
            f"| {row['non_private_s']:.3f} | {row['dp_s']:.3f} | {row['ratio']:.2f} "
            f"| {_fmt_mb(row['memory'], mem_key)} | {_fmt_mb(row['non_private_memory'], mem_key)} |"
        )
    phased = [r for r in report["rows"] if r.get("phases")]
    if phased:
        lines += [
            "",
            "Milliseconds per step by phase of `fit` (one extra epoch, timing proxies):",
            "",
            "| model | input | mode | " + " | ".join(PHASES) + " | total |",
            "|---|---|---|" + "---:|" * (len(PHASES) + 1),
        ]
        seen: set[tuple[str, str]] = set()
        for row in phased:
            key = (row["model"], row["input"])
            entries = [] if key in seen else [(NON_PRIVATE, row["non_private_phases"])]
            seen.add(key)
            entries.append((row["mode"], row["phases"]))
            for mode, ph in entries:
                per = 1000.0 / max(ph["steps"], 1.0)
                lines.append(
                    f"| {row['model']} | {row['input']} | {mode} | "
                    + " | ".join(f"{ph[p] * per:.2f}" for p in PHASES)
                    + f" | {ph['total'] * per:.2f} |"
                )
    return "\n".join(lines) + "\n"


def run_benchmark(cfg: BenchConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time (and probe the memory of) every case; returns the report as a JSON-able dict."""
    if cfg.samples < cfg.batch_size:
        raise ConfigError(
            f"samples ({cfg.samples}) is below batch size ({cfg.batch_size}); ask for at least "
            "one full batch (--samples)"
        )
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    cases = default_cases(cfg.models or None, genomics_widths=cfg.genomics_widths or None)
    report: dict[str, Any] = {
        "machine": machine_info(cfg, device),
        "settings": cfg.model_dump(),
        "steps_per_epoch": math.ceil(cfg.samples / cfg.batch_size),
        "rows": [],
    }
    for case in cases:
        log(f"{case.model} ({case.input_label})")
        params, results = time_case(case, cfg, device, log=log)
        base, dps = results[0], results[1:]
        if cfg.memory:
            for res in results:
                res.memory = probe_memory(case, res.mode, cfg, device)
        for res in dps:
            assert res.ratio is not None
            report["rows"].append(
                {
                    "model": case.model,
                    "input": case.input_label,
                    "input_dims": case.to_json()["input_dims"],
                    "params": params,
                    "mode": res.mode,
                    "auto": res.auto,
                    "steps": res.steps,
                    "non_private_s": base.median_s,
                    "dp_s": res.median_s,
                    "ratio": res.ratio,
                    "non_private_seconds": base.seconds,
                    "dp_seconds": res.seconds,
                    "ratios": res.ratios,
                    "memory": res.memory,
                    "non_private_memory": base.memory,
                    "phases": res.phases,
                    "non_private_phases": base.phases,
                }
            )
    if hasattr(os, "getloadavg"):
        report["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    return report


# ------------------------------------------------------------------------------ CLI


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.dp_overhead",
        description="Seconds per epoch of non-private vs DP-SGD training, per model.",
    )
    p.add_argument("--models", type=_csv, default=(), help="comma-separated (default: all)")
    p.add_argument(
        "--genomics-widths",
        type=lambda s: tuple(int(v) for v in _csv(s)),
        default=(),
        help=f"genomics_mlp input widths (default: the synthetic schema's and {WIDE_GENOMICS})",
    )
    p.add_argument(
        "--modes",
        type=_csv,
        default=("auto", "ghost", "hooks"),
        help="grad-sample modes: auto (fedcare's pick), bookkeeping, ghost, hooks, functorch "
        "(default: auto,ghost,hooks)",
    )
    p.add_argument("--samples", type=int, default=4096, help="patients per epoch (4096)")
    p.add_argument("--batch-size", type=int, default=256, help="expected batch size (256)")
    p.add_argument("--repeats", type=int, default=5, help="timed epochs per configuration (5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time epochs by the wall clock or by the process's CPU time (wall)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument(
        "--breakdown", action="store_true", help="also time the phases of one epoch per config"
    )
    p.add_argument("--seed", type=int, default=0, help="data, model and sampling seed (0)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"markdown file ({DEFAULT_OUT})")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 for a configuration error)."""
    args = _parser().parse_args(argv)
    with warnings.catch_warnings():
        # Expected and harmless here: the benchmark seeds its generators on purpose, and
        # torch warns on every backward that the inputs need no gradient.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if args.probe is not None:
            print(json.dumps(_probe(json.loads(args.probe))))
            return 0
        try:
            options: dict[str, Any] = {
                "models": args.models,
                "genomics_widths": args.genomics_widths,
                "modes": args.modes,
                "samples": args.samples,
                "batch_size": args.batch_size,
                "repeats": args.repeats,
                "device": args.device,
                "memory": not args.no_memory,
                "breakdown": args.breakdown,
                "clock": args.clock,
                "seed": args.seed,
            }
            if args.threads is not None:
                options["threads"] = args.threads
            cfg = BenchConfig(**options)
            report = run_benchmark(cfg, log=lambda msg: print(msg, file=sys.stderr))
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
            )
            print(f"error: invalid option(s): {problems}; see --help", file=sys.stderr)
            return 2
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    markdown = render_markdown(report)
    print(markdown)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"written: {out} and {out.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
