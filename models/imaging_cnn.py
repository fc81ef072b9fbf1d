"""Imaging model: a small CNN with GroupNorm and global average pooling.

Built for 32x32 grey-level images; global average pooling (and ceil-mode pooling) lets
any size from 1x1 up work. No BatchNorm (Opacus rejects it: batch statistics mix
patients), GroupNorm instead.

Ghost clipping: Opacus 1.6 has ghost-norm samplers for ``nn.Linear`` and
``nn.Embedding`` only. ``nn.Conv2d`` and ``nn.GroupNorm`` have per-sample *gradient*
samplers, so under ``grad_sample_mode="ghost"`` Opacus computes their per-sample gradients
("fast gradient clipping") and the ghost trick for the final linear layer. That works and
is cheap here (the convolutions hold a few thousand weights); it is why the registry says
``ghost_clipping=True, ghost_norm_only=False``. A site does not use ghost mode for it:
fedcare's one-backward bookkeeping (:mod:`fedcare.client.bookkeeping`) forms each patient's
``Conv2d`` and ``GroupNorm`` gradients itself, in one backward pass (``auto`` mode).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from fedcare.models.registry import HParams, image_shape, register_model

__all__ = ["ImagingCNNConfig", "ImagingCNN", "imaging_trunk"]


class ImagingCNNConfig(HParams):
    """Hyper-parameters of :class:`ImagingCNN`.

    Attributes
    ----------
    channels:
        Output channels of each 3x3 convolution; a 2x2 max-pool follows every one but
        the last.
    groups:
        GroupNorm groups; every entry of ``channels`` must be divisible by it.
    dropout:
        Dropout probability before the output layer (0 disables it).
    """

    channels: tuple[PositiveInt, ...] = Field(default=(8, 16, 32), min_length=1)
    groups: PositiveInt = 4
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _divisible(self) -> ImagingCNNConfig:
        bad = [c for c in self.channels if c % self.groups]
        if bad:
            raise ValueError(
                f"channels {bad} are not divisible by groups={self.groups}; pick channel "
                "counts that are multiples of groups"
            )
        return self


def imaging_trunk(in_channels: int, channels: tuple[int, ...], groups: int) -> nn.Sequential:
    """Conv-GroupNorm-ReLU blocks, then global average pooling: ``(B, C, H, W) -> (B, c)``.

    ``c = channels[-1]``. Reused by the fusion model.

    Examples
    --------
    >>> import torch
    >>> imaging_trunk(1, (4, 8), 2)(torch.zeros(2, 1, 9, 7)).shape
    torch.Size([2, 8])
    """
    layers: list[nn.Module] = []
    width = in_channels
    for i, c in enumerate(channels):
        layers += [
            nn.Conv2d(width, c, kernel_size=3, padding=1),
            nn.GroupNorm(groups, c),
            nn.ReLU(),
        ]
        if i < len(channels) - 1:
            layers.append(nn.MaxPool2d(kernel_size=2, ceil_mode=True))
        width = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


@register_model(
    "imaging_cnn",
    modalities=("imaging",),
    ghost_clipping=True,
    ghost_norm_only=False,
    bookkeeping=True,
)
class ImagingCNN(nn.Module):
    """Small GroupNorm CNN for grey-level images: ``(B, 1, H, W) -> (B,)`` logits.

    With the defaults and one input channel: 6,033 parameters, whatever ``H, W``.

    Parameters
    ----------
    in_channels:
        Image channels (1 for the grey-level images of the data layer).
    channels, groups, dropout:
        See :class:`ImagingCNNConfig`.
    """

    Config = ImagingCNNConfig

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: tuple[int, ...] = (8, 16, 32),
        groups: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.trunk = imaging_trunk(in_channels, channels, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(channels[-1], 1)

    @classmethod
    def from_config(cls, *, input_dims: Mapping[str, Any], config: ImagingCNNConfig) -> ImagingCNN:
        """Build from the registry's validated inputs."""
        c, _, _ = image_shape(input_dims, model="imaging_cnn")
        return cls(
            in_channels=c, channels=config.channels, groups=config.groups, dropout=config.dropout
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(B,)`` for ``x`` of shape ``(B, C, H, W)``."""
        return self.head(self.dropout(self.trunk(x))).squeeze(-1)
