"""Timeline model: a DP-SGD-valid attention encoder over a patient's event stream.

A task that reads a timeline (``[[schema.timelines]]``, ``timeline = "..."`` on the task)
gets its EHR vector as ``[static features | max_length x channels]``
(:mod:`fedcare.client.data.sequences`); ``input_dims["timeline"] = (max_length, n_codes)``
says where the sequence starts. :class:`TimelineEncoder` reads the sequence:

1. each event becomes ``[one_hot(code), value, value_present, gap_before, time_to_latest]``
   and goes through ``Linear -> ReLU`` (padding positions are zeroed);
2. one head of masked self-attention lets each event read the patient's other events;
3. each event also counts, per code, the patient's other events beyond each of a few
   relative-time steps (:func:`relative_time_basis`): differences of these counts say,
   e.g., "a blood culture in the day before this antibiotic start", so the order and the
   gaps between events are visible, not only their values;
4. ``Linear -> ReLU`` mixes each event with what it read, and the masked mean and max over
   the patient's events (padding never counts) form the summary;
5. the same relative-time counts, pooled per pair of codes, give the patient's **code-pair
   timing** (:func:`pair_timing`): for codes ``a`` and ``b`` and each step, the fraction of
   the patient's ``(a, b)`` event pairs in which ``b`` came more than that step after ``a``,
   a number in ``[0, 1]`` with no parameter. The model reads it through one linear term
   straight into the logit, so "an antibiotic start within a day after a culture" is a
   difference of two inputs of one linear layer: the few noisy steps of DP-SGD learn such a
   pattern, where the attention path needs many (``benchmarks/timelines.py``).

Every parameter sits in an ``nn.Linear`` applied to ``(B, L, k)`` inputs, and nothing
mixes patients of a batch, so Opacus computes exact per-sample gradients with hooks and
exact per-sample gradient norms with ghost clipping (``tests/models/test_timeline.py``
checks both against per-patient autograd); a site trains it with fedcare's one-backward
bookkeeping (:mod:`fedcare.client.bookkeeping`, ``auto`` mode).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, PositiveInt
from torch import nn
from torch.nn import functional as F

from fedcare.common.encoding import TIMELINE_CHANNELS, TIMELINE_KEY
from fedcare.common.errors import ConfigError
from fedcare.models.ehr_mlp import mlp_trunk
from fedcare.models.registry import HParams, feature_dim, register_model

__all__ = [
    "TimelineConfig",
    "TimelineEncoder",
    "TimelineEHREncoder",
    "TimelineModel",
    "timeline_layout",
    "split_timeline",
    "pair_timing",
]

_CHANNELS = len(TIMELINE_CHANNELS)
_CODE, _PRESENT = TIMELINE_CHANNELS.index("code"), TIMELINE_CHANNELS.index("present")
_NUMERIC = [i for i, c in enumerate(TIMELINE_CHANNELS) if c not in ("code", "present")]
_TO_LATEST = TIMELINE_CHANNELS.index("time_to_latest")
_MASKED = -1e4  # added to the attention score of a padding position
#: Relative-time steps (:func:`relative_time_basis`), in units of the timeline's time_scale.
_STEPS = (-3.0, -2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 3.0)
_STEP_WIDTH = 0.1


class TimelineConfig(HParams):
    """Hyper-parameters of :class:`TimelineModel`.

    Attributes
    ----------
    event_dim:
        Width of each event's embedding and of the attention layer; the sequence summary
        is twice as wide.
    static_hidden:
        Hidden widths of the MLP over the static (non-sequence) EHR features.
    head_hidden:
        Hidden width of the head over ``[static, sequence summary]``.
    dropout:
        Dropout probability in the static MLP and the head (0 disables it).
    """

    event_dim: PositiveInt = 16
    static_hidden: tuple[PositiveInt, ...] = Field(default=(32,), min_length=1)
    head_hidden: PositiveInt = 16
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


def timeline_layout(input_dims: Mapping[str, Any], *, model: str) -> tuple[int, int, int]:
    """``(static_width, max_length, n_codes)`` of a timeline task's EHR vector; checked.

    Raises
    ------
    ConfigError
        ``input_dims`` has no timeline, or its EHR width cannot hold the sequence.
    """
    value = input_dims.get(TIMELINE_KEY)
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    )
    if not ok:
        raise ConfigError(
            f"model {model!r} reads a patient timeline, but input_dims[{TIMELINE_KEY!r}] is "
            f'{value!r}; pass (max_length, number of codes), or declare timeline = "..." '
            "on the task in site.toml"
        )
    length, n_codes = int(value[0]), int(value[1])  # type: ignore[index]
    width = feature_dim(input_dims, "ehr", model=model)
    static = width - length * _CHANNELS
    if static < 0:
        raise ConfigError(
            f"input_dims['ehr'] = {width} for model {model!r} cannot hold a timeline of "
            f"{length} events x {_CHANNELS} channels; derive input_dims from the schema "
            "(fedcare.common.encoding.input_dims)"
        )
    return static, length, n_codes


def relative_time_basis(seq: torch.Tensor) -> torch.Tensor:
    """Soft steps of the time between every two events of a patient.

    ``(B, L, channels) -> (B, L, L, len(_STEPS))``: for event ``i`` and event ``j``,
    ``d = t_j - t_i`` in units of the timeline's ``time_scale`` (recovered from the
    ``time_to_latest`` channel, ``log1p(dt / time_scale)``), then for each step ``k`` of
    :data:`_STEPS` ``clip((d - k) / _STEP_WIDTH, 0, 1)``: about 1 when ``j`` came more than
    ``k`` time units after ``i``. A difference of two steps is a window: steps at -1 and 0
    tell "``j`` in the time unit before ``i``".
    """
    before_latest = torch.expm1(seq[..., _TO_LATEST].clamp(min=0.0))  # (B, L)
    d = before_latest.unsqueeze(2) - before_latest.unsqueeze(1)  # t_j - t_i
    steps = torch.tensor(_STEPS, dtype=seq.dtype, device=seq.device)
    return ((d.unsqueeze(-1) - steps) / _STEP_WIDTH).clamp(0.0, 1.0)


def pair_timing(seq: torch.Tensor, n_codes: int) -> torch.Tensor:
    """Code-pair timing of each patient: ``(B, L, channels) -> (B, n_codes * steps * n_codes)``.

    Entry ``(a, k, b)``: among the patient's pairs of an event of code ``a`` and another
    event of code ``b``, the fraction in which ``b`` came more than step ``k`` of
    :data:`_STEPS` after ``a`` (soft steps of :func:`relative_time_basis`); 0 when the patient
    has no such pair. Every entry lies in ``[0, 1]``, padding counts nothing, and nothing
    mixes patients.
    """
    present = seq[..., _PRESENT : _PRESENT + 1]  # (B, L, 1)
    code = seq[..., _CODE].round().long().clamp(0, n_codes)
    codes = F.one_hot(code, n_codes + 1)[..., 1:].to(seq.dtype) * present
    basis = relative_time_basis(seq)
    return _pair_timing(torch.einsum("bijs,bjc->bisc", basis, codes), basis, codes)


def _pair_timing(around: torch.Tensor, basis: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """:func:`pair_timing` from the encoder's per-event counts ``around`` ``(B, L, S, C)``
    (every event, itself included), the soft steps ``basis`` ``(B, L, L, S)`` and the
    codes ``(B, L, C)`` (one-hot, zero at padding): no second pass over the event pairs."""
    counts = torch.einsum("bia,bisc->basc", codes, around)
    # An event is never paired with itself: take out its own step (the diagonal).
    own = basis.diagonal(dim1=1, dim2=2).transpose(1, 2)  # (B, L, S)
    counts = counts - torch.einsum("bia,bis,bic->basc", codes, own, codes)
    n = codes.sum(dim=1)  # (B, C): the patient's events of each code
    pairs = n[:, :, None] * n[:, None, :] - torch.einsum("bia,bic->bac", codes, codes)
    return (counts / pairs.clamp(min=1.0)[:, :, None, :]).flatten(start_dim=1)


class TimelineEncoder(nn.Module):
    """Sequence summary ``(B, max_length, channels) -> (B, out_dim)``.

    ``out_dim = 2 * event_dim + timing_dim``: the masked mean and max of the mixed events,
    then the :func:`pair_timing` of the patient (``timing_dim = n_codes * len(_STEPS) *
    n_codes`` numbers in ``[0, 1]``, no parameter).

    Parameters
    ----------
    n_codes:
        Number of codes the timeline keeps (code numbers ``1..n_codes``; 0 is padding).
    event_dim:
        See :class:`TimelineConfig`.
    """

    def __init__(self, *, n_codes: int, event_dim: int) -> None:
        super().__init__()
        self.n_codes = n_codes
        self.embed = nn.Linear(n_codes + 1 + len(_NUMERIC), event_dim)
        self.query = nn.Linear(event_dim, event_dim)
        self.key = nn.Linear(event_dim, event_dim)
        self.value = nn.Linear(event_dim, event_dim)
        self.relative = nn.Linear(len(_STEPS) * n_codes, event_dim)
        self.mix = nn.Linear(3 * event_dim, event_dim)
        self.timing_dim = n_codes * len(_STEPS) * n_codes
        self.out_dim = 2 * event_dim + self.timing_dim

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        present = seq[..., _PRESENT : _PRESENT + 1]  # (B, L, 1)
        code = seq[..., _CODE].round().long().clamp(0, self.n_codes)
        one_hot = F.one_hot(code, self.n_codes + 1).to(seq.dtype)
        events = torch.relu(self.embed(torch.cat([one_hot, seq[..., _NUMERIC]], -1))) * present
        # One head of self-attention: each event reads the patient's other events (never
        # padding, never another patient).
        scores = self.query(events) @ self.key(events).transpose(1, 2) / math.sqrt(events.shape[-1])
        scores = scores + (1.0 - present.transpose(1, 2)) * _MASKED
        context = torch.softmax(scores, dim=-1) @ self.value(events)
        # What happened when, seen from each event: per code of the other events, how many
        # lie beyond each relative-time step (padding has no code and counts nothing).
        codes = one_hot[..., 1:] * present  # (B, L, n_codes)
        basis = relative_time_basis(seq)
        around = torch.einsum("bijs,bjc->bisc", basis, codes)
        relative = self.relative(around.flatten(start_dim=2))
        mixed = torch.relu(self.mix(torch.cat([events, context, relative], -1))) * present
        mean = mixed.sum(dim=1) / present.sum(dim=1).clamp(min=1.0)
        # Padding rows are 0 and every event row is >= 0 (ReLU): the max ignores padding.
        return torch.cat([mean, mixed.amax(dim=1), _pair_timing(around, basis, codes)], dim=1)


@register_model(
    "timeline", modalities=("ehr",), ghost_clipping=True, ghost_norm_only=True, timeline=True
)
class TimelineModel(nn.Module):
    """Static EHR features + self-attention over the patient's event timeline: ``(B, d) -> (B,)``.

    With the defaults, 20 static columns and a timeline of 5 codes: 4,676 parameters (275 of
    them the linear term of the code-pair timing).

    Parameters
    ----------
    static_width, max_length, n_codes:
        The layout of the EHR vector (:func:`timeline_layout`).
    config:
        The hyper-parameters.
    """

    Config = TimelineConfig

    def __init__(
        self, *, static_width: int, max_length: int, n_codes: int, config: TimelineConfig
    ) -> None:
        super().__init__()
        self.static_width = static_width
        self.max_length = max_length
        self.sequence = TimelineEncoder(n_codes=n_codes, event_dim=config.event_dim)
        self.timing_dim = self.sequence.timing_dim
        width = self.sequence.out_dim - self.timing_dim
        self.static: nn.Module | None = None
        if static_width > 0:
            self.static = mlp_trunk(static_width, config.static_hidden, config.dropout)
            width += config.static_hidden[-1]
        # The code-pair timing reaches the logit through one linear term (no bias: the
        # head has one).
        self.timing = nn.Linear(self.timing_dim, 1, bias=False)
        layers: list[nn.Module] = [nn.Linear(width, config.head_hidden), nn.ReLU()]
        if config.dropout > 0:
            layers.append(nn.Dropout(config.dropout))
        layers.append(nn.Linear(config.head_hidden, 1))
        self.head = nn.Sequential(*layers)

    @classmethod
    def from_config(cls, *, input_dims: Mapping[str, Any], config: TimelineConfig) -> TimelineModel:
        """Build from the registry's validated inputs (``input_dims`` needs the timeline)."""
        static, length, n_codes = timeline_layout(input_dims, model="timeline")
        return cls(static_width=static, max_length=length, n_codes=n_codes, config=config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(B,)`` for the EHR vector ``x`` of shape ``(B, d)``."""
        summary = self.sequence(split_timeline(x, self.static_width, self.max_length))
        events, timing = summary[:, : -self.timing_dim], summary[:, -self.timing_dim :]
        parts = [events]
        if self.static is not None:
            parts.insert(0, self.static(x[:, : self.static_width]))
        return (self.head(torch.cat(parts, dim=1)) + self.timing(timing)).squeeze(-1)


def split_timeline(x: torch.Tensor, static_width: int, max_length: int) -> torch.Tensor:
    """The sequence part of EHR vectors ``x``, as ``(B, max_length, channels)``."""
    return x[:, static_width:].reshape(x.shape[0], max_length, _CHANNELS)


class TimelineEHREncoder(nn.Module):
    """The fusion model's EHR branch for a timeline task: ``(B, d) -> (B, embed_dim)``.

    The static MLP's output and the :class:`TimelineEncoder` summary, projected together.
    """

    def __init__(
        self,
        *,
        static_width: int,
        max_length: int,
        n_codes: int,
        static_hidden: tuple[int, ...],
        embed_dim: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.static_width = static_width
        self.max_length = max_length
        self.sequence = TimelineEncoder(n_codes=n_codes, event_dim=embed_dim)
        width = self.sequence.out_dim
        self.static: nn.Module | None = None
        if static_width > 0:
            self.static = mlp_trunk(static_width, static_hidden, dropout)
            width += static_hidden[-1]
        self.project = nn.Linear(width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.sequence(split_timeline(x, self.static_width, self.max_length))]
        if self.static is not None:
            parts.insert(0, self.static(x[:, : self.static_width]))
        return self.project(torch.cat(parts, dim=1))
