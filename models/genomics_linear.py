"""Genomics linear risk score: one ``nn.Linear`` over the standardized genomics vector.

The score is ``w . x + b`` over the site's genomics vector (each gene standardized with its
site's training statistics, :mod:`fedcare.client.data.preprocess`): ``g + 1`` parameters,
77 for GSE7390's 76 genes. Under a survival task the hazard head of
:mod:`fedcare.models.survival` turns it into a logistic discrete-time hazard model that is
linear in the genes.

When to prefer it over ``genomics_mlp``: few patients per site under DP. DP-SGD's noise is
added to every parameter at every step, so a site with tens of training patients pays for
each parameter it trains; the linear score has 77 where the MLP has about 6,000 on
GSE7390. There, with about 70 training patients per site at ε 8 and full-batch steps, its
federated C-index came within +0.045 [+0.01, +0.08] of the pooled non-private MLP against
the MLP's own +0.075 [+0.02, +0.13] (20 seeds, ``benchmarks/results/survival.md``), and it
is the model of GSE7390's benchmark settings (``run_config`` of
:class:`fedcare.simulations.realdata.survival.GSE7390`, which ``benchmarks/survival.py``
applies; a run names its model in its own run config). Without DP
the MLP's capacity wins: pooled and non-private on GSE7390 its C-index was 0.667 against the
linear score's 0.614; the linear score is for sites too small for DP-SGD to train the MLP.

Its one layer is ``nn.Linear``, so DP-SGD's ``auto`` mode trains it by one-backward
bookkeeping (:mod:`fedcare.client.bookkeeping`) and Opacus ghost clipping never
materialises a per-sample gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedcare.models.registry import HParams, feature_dim, register_model

__all__ = ["GenomicsLinearConfig", "GenomicsLinear"]


class GenomicsLinearConfig(HParams):
    """Hyper-parameters of :class:`GenomicsLinear`: none (the size is the gene count)."""


@register_model(
    "genomics_linear", modalities=("genomics",), ghost_clipping=True, ghost_norm_only=True
)
class GenomicsLinear(nn.Module):
    """Linear risk score over the genomics vector: ``(B, g) -> (B,)`` logits ``w . x + b``.

    ``g + 1`` parameters.

    Parameters
    ----------
    in_features:
        Width ``g`` of the genomics vector.

    Examples
    --------
    >>> model = GenomicsLinear(in_features=76)
    >>> sum(p.numel() for p in model.parameters())
    77
    >>> model(torch.zeros(3, 76)).shape
    torch.Size([3])
    """

    Config = GenomicsLinearConfig

    def __init__(self, *, in_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 1)

    @classmethod
    def from_config(
        cls, *, input_dims: Mapping[str, Any], config: GenomicsLinearConfig
    ) -> GenomicsLinear:
        """Build from the registry's validated inputs."""
        return cls(in_features=feature_dim(input_dims, "genomics", model="genomics_linear"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(B,)`` for ``x`` of shape ``(B, g)``."""
        return self.linear(x).squeeze(-1)
