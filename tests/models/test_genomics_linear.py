"""The genomics linear risk score: what it computes, and that DP-SGD trains it as GSE7390 does.

GSE7390's default (:mod:`fedcare.simulations.realdata.survival`) is this model under the
survival hazard head, trained by full-batch DP gradient descent: every step is a site's
whole training split (Poisson rate 1). One such step through fedcare's own DP-SGD set-up
(:func:`fedcare.client.dpsgd.make_private`, ``auto`` mode) is checked against plain torch
autograd, one patient at a time, each gradient clipped to ``C`` and summed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedcare.client.bookkeeping import check_supported
from fedcare.client.dpsgd import DPPlan, make_private, resolve_grad_sample_mode, sampling
from fedcare.models import GenomicsLinear, build_model, model_info
from fedcare.models.survival import SurvivalTask

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

GENES = 76  # GSE7390's signature
CUTS = (1.0, 2.0, 3.0, 5.0)
C = 1.0


def test_the_score_is_one_weight_per_gene_and_a_bias() -> None:
    model = build_model("genomics_linear", input_dims={"genomics": GENES})
    assert isinstance(model, GenomicsLinear)
    assert sum(p.numel() for p in model.parameters()) == GENES + 1
    x = torch.randn(9, GENES, generator=torch.Generator().manual_seed(0))
    w = model.linear.weight.detach().numpy().reshape(-1).astype(np.float64)
    b = float(model.linear.bias.detach())
    expected = x.numpy().astype(np.float64) @ w + b
    np.testing.assert_allclose(model(x).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    info = model_info("genomics_linear")
    assert info.modalities == ("genomics",) and not info.multimodal
    assert info.ghost_norm_only and info.default_hparams() == {}


def test_auto_mode_trains_it_by_bookkeeping_under_the_survival_head() -> None:
    assert resolve_grad_sample_mode("auto", "genomics_linear") == "bookkeeping"
    model = SurvivalTask(cuts=CUTS).wrap(
        build_model("genomics_linear", input_dims={"genomics": GENES})
    )
    check_supported(model)  # every trainable layer is an nn.Linear, none shared
    kinds = {type(m) for m in model.modules() if list(m.parameters(recurse=False))}
    assert kinds == {nn.Linear}


def _patients(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized genes scaled per patient by 10^u, u in [-2, 2] (gradient norms far below
    and far above ``C`` in one batch); times over every interval, about half events."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, GENES, generator=gen, dtype=torch.float64)
    x = x * 10.0 ** (torch.rand(n, 1, generator=gen, dtype=torch.float64) * 4 - 2)
    time = torch.rand(n, generator=gen, dtype=torch.float64) * 7.0
    event = (torch.rand(n, generator=gen) > 0.5).double()
    return x, torch.stack([time, event], dim=1)


def _reference_clipped_sum(
    model: nn.Module, task: SurvivalTask, x: torch.Tensor, target: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``sum_i min(1, C/||g_i||) g_i`` per parameter, by autograd one patient at a time."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(x)):
        loss = task.make_loss(reduction="sum")(model(x[i : i + 1]), target[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        norm = torch.cat([g.reshape(-1) for g in grads]).norm()
        norms.append(norm)
        if norm == 0:  # censored in the first interval: no likelihood term, no gradient
            continue
        for acc, g in zip(total, grads, strict=True):
            acc += g * min(1.0, C / float(norm))
    return total, torch.stack(norms)


def test_one_full_batch_dp_step_with_the_survival_head_is_the_clipped_gradient_sum() -> None:
    """GSE7390's step: batch above the train split, so Poisson rate 1 and one step; with the
    noise at 0 the update is ``-lr * sum_i clip_C(g_i) / n``, ``g_i`` each patient's own."""
    n, lr = 24, 0.5
    task = SurvivalTask(cuts=CUTS)
    model = task.wrap(build_model("genomics_linear", input_dims={"genomics": GENES})).double()
    x, target = _patients(n, seed=1)
    expected, norms = _reference_clipped_sum(model, task, x, target)
    assert (norms > 10 * C).any() and (norms < C / 10).any()
    before = [p.detach().clone() for p in model.parameters()]

    q, steps = sampling(n, batch_size=n + 6, epochs=1)
    assert (q, steps) == (1.0, 1)
    private = make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        criterion=task.make_loss(),
        dataset=TensorDataset(x, target),
        batch_size=n + 6,
        plan=DPPlan(noise_multiplier=0.0, sample_rate=q, steps=steps, max_grad_norm=C),
        grad_sample_mode=resolve_grad_sample_mode("auto", "genomics_linear"),
        sampling_generator=torch.Generator().manual_seed(2),
        noise_generator=torch.Generator().manual_seed(3),
    )
    assert private.grad_sample_mode == "bookkeeping"
    batches = list(private.loader)
    assert len(batches) == 1 and len(batches[0][0]) == n  # the whole split, every patient
    (xb, yb) = batches[0]
    private.optimizer.zero_grad(set_to_none=True)
    private.criterion(private.model(xb), yb).backward()
    private.optimizer.step()

    # Opacus clips by C / (||g|| + 1e-6): each clipped patient's term differs from the exact
    # min(1, C/||g||) g by at most 1e-6 C in norm, so the update by at most lr 1e-6 C.
    after = list(private.unwrapped().parameters())
    for b, a, s in zip(before, after, expected, strict=True):
        assert not torch.equal(a.detach(), b)
        torch.testing.assert_close(a.detach(), b - lr * s / n, rtol=0.0, atol=lr * 1e-6 * C)
    assert private.accountant.history == [(0.0, 1.0, 1)]
