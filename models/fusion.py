"""Multimodal fusion: one encoder per modality, a masked mean, one head.

Each modality the model is built for (the keys of ``input_dims``) gets the trunk of its
single-modality model (:func:`~fedcare.models.ehr_mlp.mlp_trunk`,
:func:`~fedcare.models.imaging_cnn.imaging_trunk`,
:func:`~fedcare.models.genomics_mlp.genomics_trunk`)
followed by a linear projection to a shared ``embed_dim``. For a patient, the embeddings
of the *present* modalities are averaged::

    fused = sum_m mask[:, m] * z_m / max(1, sum_m mask[:, m])

and the head reads ``[fused, mask]``. A missing modality therefore contributes nothing: its
input is replaced by zeros before encoding (so even NaN placeholders are harmless) and its
embedding is multiplied by 0. No statistic is shared across the batch, so one patient's
output never depends on another's (a requirement of per-sample DP clipping).

A task that reads a patient timeline (``input_dims["timeline"]``) gets, as its EHR
encoder, the static MLP plus the timeline model's attention encoder
(:class:`~fedcare.models.timeline.TimelineEHREncoder`).

Ghost clipping works (``nn.Linear`` via ghost norms; the CNN's ``Conv2d``/``GroupNorm``
via per-sample gradients), so ``ghost_norm_only=False`` because of the imaging encoder.
A site trains it with one-backward bookkeeping (:mod:`fedcare.client.bookkeeping`), which
handles its ``Linear``, ``Conv2d`` and ``GroupNorm`` layers (``auto`` mode).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from fedcare.common.encoding import TIMELINE_KEY
from fedcare.common.errors import ConfigError
from fedcare.common.spec import MODALITIES
from fedcare.models.ehr_mlp import mlp_trunk
from fedcare.models.genomics_mlp import genomics_trunk
from fedcare.models.imaging_cnn import imaging_trunk
from fedcare.models.registry import HParams, feature_dim, image_shape, register_model
from fedcare.models.timeline import TimelineEHREncoder, timeline_layout

__all__ = ["FusionConfig", "FusionModel"]


class FusionConfig(HParams):
    """Hyper-parameters of :class:`FusionModel`.

    Attributes
    ----------
    embed_dim:
        Width of the shared per-modality embedding.
    head_hidden:
        Hidden width of the fusion head.
    ehr_hidden:
        Hidden widths of the EHR encoder (as ``ehr_mlp``'s ``hidden``).
    imaging_channels, imaging_groups:
        The imaging encoder (as ``imaging_cnn``'s ``channels`` and ``groups``).
    genomics_hidden:
        Hidden widths of the genomics encoder (as ``genomics_mlp``'s ``hidden``).
    dropout:
        Dropout probability in the encoders and the head (0 disables it).
    """

    embed_dim: PositiveInt = 32
    head_hidden: PositiveInt = 16
    ehr_hidden: tuple[PositiveInt, ...] = Field(default=(64, 32), min_length=1)
    imaging_channels: tuple[PositiveInt, ...] = Field(default=(8, 16, 32), min_length=1)
    imaging_groups: PositiveInt = 4
    genomics_hidden: tuple[PositiveInt, ...] = Field(default=(64, 16), min_length=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _divisible(self) -> FusionConfig:
        bad = [c for c in self.imaging_channels if c % self.imaging_groups]
        if bad:
            raise ValueError(
                f"imaging_channels {bad} are not divisible by imaging_groups="
                f"{self.imaging_groups}; pick multiples of imaging_groups"
            )
        return self


@register_model(
    "fusion",
    modalities=MODALITIES,
    multimodal=True,
    ghost_clipping=True,
    ghost_norm_only=False,
    bookkeeping=True,
    timeline=True,
)
class FusionModel(nn.Module):
    """Masked-mean fusion of per-modality encoders: ``(x_ehr, x_img, x_gen, mask) -> (B,)``.

    With the defaults and ``{"ehr": 40, "imaging": (1, 32, 32), "genomics": 200}``:
    27,857 parameters.

    Parameters
    ----------
    encoders:
        Modality -> encoder module mapping its input to ``(B, embed_dim)``; at least one,
        keys from :data:`fedcare.common.spec.MODALITIES`.
    embed_dim, head_hidden, dropout:
        See :class:`FusionConfig`.

    Notes
    -----
    ``forward`` always takes the three inputs in the order of
    :data:`fedcare.common.spec.MODALITIES` plus ``mask`` of shape ``(B, 3)`` (1 present, 0
    missing). An input whose modality the model was not built for is ignored (it may be
    ``None``) and its mask column is not read. A patient with no modality present gets the
    head's output for an all-zero input.
    """

    Config = FusionConfig

    def __init__(
        self,
        *,
        encoders: Mapping[str, nn.Module],
        embed_dim: int = 32,
        head_hidden: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        unknown = sorted(set(encoders) - set(MODALITIES))
        if not encoders or unknown:
            raise ConfigError(
                f"fusion needs encoders for a non-empty subset of {MODALITIES}; got "
                f"{sorted(encoders)}"
            )
        self.modalities: tuple[str, ...] = tuple(m for m in MODALITIES if m in encoders)
        self._columns: tuple[int, ...] = tuple(MODALITIES.index(m) for m in self.modalities)
        self.encoders = nn.ModuleDict({m: encoders[m] for m in self.modalities})
        layers: list[nn.Module] = [
            nn.Linear(embed_dim + len(self.modalities), head_hidden),
            nn.ReLU(),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(head_hidden, 1))
        self.head = nn.Sequential(*layers)

    @classmethod
    def from_config(cls, *, input_dims: Mapping[str, Any], config: FusionConfig) -> FusionModel:
        """Build one encoder per modality named in ``input_dims``."""
        encoders: dict[str, nn.Module] = {}
        e = config.embed_dim
        if "ehr" in input_dims and TIMELINE_KEY in input_dims:
            static, length, n_codes = timeline_layout(input_dims, model="fusion")
            encoders["ehr"] = TimelineEHREncoder(
                static_width=static,
                max_length=length,
                n_codes=n_codes,
                static_hidden=config.ehr_hidden,
                embed_dim=e,
                dropout=config.dropout,
            )
        elif "ehr" in input_dims:
            d = feature_dim(input_dims, "ehr", model="fusion")
            encoders["ehr"] = nn.Sequential(
                mlp_trunk(d, config.ehr_hidden, config.dropout),
                nn.Linear(config.ehr_hidden[-1], e),
            )
        if "imaging" in input_dims:
            c, _, _ = image_shape(input_dims, model="fusion")
            encoders["imaging"] = nn.Sequential(
                imaging_trunk(c, config.imaging_channels, config.imaging_groups),
                nn.Linear(config.imaging_channels[-1], e),
            )
        if "genomics" in input_dims:
            g = feature_dim(input_dims, "genomics", model="fusion")
            encoders["genomics"] = nn.Sequential(
                genomics_trunk(g, config.genomics_hidden, config.dropout),
                nn.Linear(config.genomics_hidden[-1], e),
            )
        if not encoders:
            raise ConfigError(
                f"model 'fusion' needs at least one modality in input_dims; got "
                f"{sorted(input_dims)}; pass e.g. {{'ehr': 40, 'imaging': (1, 32, 32)}}"
            )
        return cls(
            encoders=encoders,
            embed_dim=e,
            head_hidden=config.head_hidden,
            dropout=config.dropout,
        )

    def forward(
        self,
        x_ehr: torch.Tensor | None,
        x_img: torch.Tensor | None,
        x_gen: torch.Tensor | None,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Logits of shape ``(B,)``; see the class notes for the input convention."""
        inputs = {"ehr": x_ehr, "imaging": x_img, "genomics": x_gen}
        present = mask[:, list(self._columns)] > 0  # (B, k) bool
        embeddings = []
        for j, name in enumerate(self.modalities):
            x = inputs[name]
            if x is None:
                raise ValueError(
                    f"the fusion model was built for {name!r} but got None for it; pass a "
                    "placeholder tensor (e.g. zeros) and a 0 in its mask column"
                )
            keep = present[:, j].view(-1, *([1] * (x.dim() - 1)))
            x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
            embeddings.append(self.encoders[name](x))
        z = torch.stack(embeddings, dim=1)  # (B, k, embed_dim)
        weights = present.to(dtype=z.dtype)  # (B, k)
        total = (z * weights.unsqueeze(-1)).sum(dim=1)
        fused = total / weights.sum(dim=1, keepdim=True).clamp(min=1.0)
        return self.head(torch.cat([fused, weights], dim=1)).squeeze(-1)
