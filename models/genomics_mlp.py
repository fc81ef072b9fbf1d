"""Genomics model: an MLP whose first layer is narrow, for thousands of inputs.

A genomics vector holds thousands of features (expression levels, variant dosages); the
first layer's ``g x width`` matrix holds nearly all the parameters, so it stays modest
(64 by default) and the rest is small. Only ``nn.Linear`` layers carry parameters, so
Opacus ghost clipping never materialises a per-sample gradient: that matters most here,
where one per-sample gradient is ``g x 64`` numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, PositiveInt
from torch import nn

from fedcare.models.ehr_mlp import mlp_trunk
from fedcare.models.registry import HParams, feature_dim, register_model

__all__ = ["GenomicsMLPConfig", "GenomicsMLP", "genomics_trunk"]


class GenomicsMLPConfig(HParams):
    """Hyper-parameters of :class:`GenomicsMLP`.

    Attributes
    ----------
    hidden:
        Hidden widths; the first one sets the size of the big input layer.
    dropout:
        Dropout probability after each hidden layer (0 disables it).
    """

    hidden: tuple[PositiveInt, ...] = Field(default=(64, 16), min_length=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


def genomics_trunk(in_features: int, hidden: tuple[int, ...], dropout: float) -> nn.Sequential:
    """The genomics encoder (output width ``hidden[-1]``); reused by the fusion model."""
    return mlp_trunk(in_features, hidden, dropout)


@register_model("genomics_mlp", modalities=("genomics",), ghost_clipping=True, ghost_norm_only=True)
class GenomicsMLP(nn.Module):
    """MLP for wide genomics vectors: ``(B, g) -> (B,)`` logits.

    With the defaults: ``64 g + 1,121`` parameters (``g = 2,000``: 129,121).

    Parameters
    ----------
    in_features:
        Width ``g`` of the genomics vector.
    hidden, dropout:
        See :class:`GenomicsMLPConfig`.
    """

    Config = GenomicsMLPConfig

    def __init__(
        self, *, in_features: int, hidden: tuple[int, ...] = (64, 16), dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.trunk = genomics_trunk(in_features, hidden, dropout)
        self.head = nn.Linear(hidden[-1], 1)

    @classmethod
    def from_config(
        cls, *, input_dims: Mapping[str, Any], config: GenomicsMLPConfig
    ) -> GenomicsMLP:
        """Build from the registry's validated inputs."""
        return cls(
            in_features=feature_dim(input_dims, "genomics", model="genomics_mlp"),
            hidden=config.hidden,
            dropout=config.dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(B,)`` for ``x`` of shape ``(B, g)``."""
        return self.head(self.trunk(x)).squeeze(-1)
