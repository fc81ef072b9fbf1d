"""EHR (tabular) model: a small MLP over the encoded per-patient feature vector.

Only ``nn.Linear`` layers carry parameters, so Opacus ghost clipping computes every
per-sample gradient norm without materialising a per-sample gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, PositiveInt
from torch import nn

from fedcare.models.registry import HParams, feature_dim, register_model

__all__ = ["EHRMLPConfig", "EHRMLP", "mlp_trunk"]


class EHRMLPConfig(HParams):
    """Hyper-parameters of :class:`EHRMLP`.

    Attributes
    ----------
    hidden:
        Widths of the hidden layers (ReLU after each).
    dropout:
        Dropout probability after each hidden layer (0 disables it).
    """

    hidden: tuple[PositiveInt, ...] = Field(default=(64, 32), min_length=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


def mlp_trunk(in_features: int, hidden: tuple[int, ...], dropout: float) -> nn.Sequential:
    """``Linear -> ReLU [-> Dropout]`` per hidden width; output width ``hidden[-1]``.

    Shared by the EHR and genomics models and by the fusion model's encoders.

    Examples
    --------
    >>> import torch
    >>> mlp_trunk(5, (8, 4), 0.0)(torch.zeros(2, 5)).shape
    torch.Size([2, 4])
    """
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    return nn.Sequential(*layers)


@register_model("ehr_mlp", modalities=("ehr",), ghost_clipping=True, ghost_norm_only=True)
class EHRMLP(nn.Module):
    """Small MLP for tabular EHR features: ``(B, d) -> (B,)`` logits.

    With the defaults and ``d = 40``: 4,737 parameters.

    Parameters
    ----------
    in_features:
        Width ``d`` of the encoded EHR vector.
    hidden, dropout:
        See :class:`EHRMLPConfig`.
    """

    Config = EHRMLPConfig

    def __init__(
        self, *, in_features: int, hidden: tuple[int, ...] = (64, 32), dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.trunk = mlp_trunk(in_features, hidden, dropout)
        self.head = nn.Linear(hidden[-1], 1)

    @classmethod
    def from_config(cls, *, input_dims: Mapping[str, Any], config: EHRMLPConfig) -> EHRMLP:
        """Build from the registry's validated inputs."""
        return cls(
            in_features=feature_dim(input_dims, "ehr", model="ehr_mlp"),
            hidden=config.hidden,
            dropout=config.dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(B,)`` for ``x`` of shape ``(B, d)``."""
        return self.head(self.trunk(x)).squeeze(-1)
