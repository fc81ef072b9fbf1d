"""One-backward DP-SGD (``grad_sample_mode="bookkeeping"``) on convolutions and GroupNorm.

What a site sends after a round of DP-SGD is the noisy sum of its patients' clipped
gradients. Its privacy rests on two facts, checked here on the CNN and the fusion model
(Conv2d, GroupNorm, Linear) against the clipped sums of patients taken alone:

- each patient's contribution depends on that patient only: adding a patient to a batch
  changes the sum by exactly what that patient gives alone (nothing of the others moves);
- that contribution has norm at most ``C``, whatever the patient's data and whatever
  weights the centre sent (weights crafted to overflow included: such a patient is left out
  whole, and the round completes with finite weights, telling the sender nothing).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from fedcare.client.bookkeeping import BookkeepingClipper
from fedcare.client.dpsgd import DPPlan, make_private, sampling
from fedcare.client.training import fit
from fedcare.models import build_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

C = 1.0
IMAGE = (1, 10, 9)


def _clipped_sum(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], y: torch.Tensor
) -> torch.Tensor:
    clipper = BookkeepingClipper(model, max_grad_norm=C)
    try:
        per_sample = F.binary_cross_entropy_with_logits(model(*inputs), y, reduction="none")
        return clipper.clipped_sum(per_sample).clone()
    finally:
        clipper.remove()


def _batch(name: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    img = torch.randn(n, *IMAGE, generator=gen, dtype=torch.float64)
    if name == "imaging_cnn":
        return (img,)
    ehr = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    genomics = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    return ehr, img, genomics, torch.ones(n, 3, dtype=torch.float64)


def _model(name: str) -> nn.Module:
    dims = (
        {"imaging": IMAGE} if name == "imaging_cnn" else {"ehr": 6, "imaging": IMAGE, "genomics": 5}
    )
    return build_model(name, input_dims=dims, generator=torch.Generator().manual_seed(0)).double()


def _adversarial(patient: tuple[torch.Tensor, ...], kind: str) -> tuple[torch.Tensor, ...]:
    """One patient's data made to push the sum hard: huge values, or an overflow."""
    if kind == "huge":
        scaled = [t * 1e6 for t in patient]
        if len(patient) > 1:
            scaled[-1] = patient[-1]  # the fusion model's modality mask stays 0/1
        return tuple(scaled)
    out = tuple(t.clone() for t in patient)
    out[0].view(-1)[3] = 1e300  # finite input; its gradient norm overflows
    return out


@pytest.mark.parametrize("name", ["imaging_cnn", "fusion"])
@pytest.mark.parametrize("kind", ["huge", "overflow", "ordinary"])
def test_a_patient_adds_only_its_own_contribution_of_norm_at_most_c(name: str, kind: str) -> None:
    gen = torch.Generator().manual_seed(1)
    model = _model(name)
    others = _batch(name, 6, gen)
    patient = _batch(name, 1, gen)
    if kind != "ordinary":
        patient = _adversarial(patient, kind)
    y_others = torch.randint(0, 2, (6,), generator=gen).double()
    with torch.no_grad():  # the label the model gets most wrong: a large gradient
        y_patient = (model(*patient) < 0).double()
    without = _clipped_sum(model, others, y_others)
    with_patient = _clipped_sum(
        model,
        tuple(torch.cat([a, b]) for a, b in zip(others, patient, strict=True)),
        torch.cat([y_others, y_patient]),
    )
    alone = _clipped_sum(model, patient, y_patient)
    assert torch.isfinite(with_patient).all()
    # Nothing of the others moves: the difference is the patient's own contribution ...
    torch.testing.assert_close(with_patient - without, alone, rtol=1e-9, atol=1e-12)
    # ... and it is at most C (Opacus's clip factor C / (norm + 1e-6) keeps it below).
    assert float(alone.norm()) <= C
    if kind == "overflow":
        assert float(alone.norm()) == 0.0  # left out whole
    else:
        assert float(alone.norm()) > 0.5 * C  # clipped to about C, not vacuous


@pytest.mark.parametrize("name", ["imaging_cnn", "fusion"])
def test_weights_crafted_to_overflow_do_not_make_a_cnn_round_fail(name: str) -> None:
    """The centre sends weights that overflow on every patient: each patient is left out,
    the step is noise alone, the weights stay finite and the round completes."""
    gen = torch.Generator().manual_seed(2)
    model = _model(name).float()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e30)
    inputs = tuple(t.float() for t in _batch(name, 32, gen))
    y = torch.randint(0, 2, (32,), generator=gen).float()
    q, steps = sampling(32, batch_size=8, epochs=1)
    private = make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.BCEWithLogitsLoss(),
        dataset=TensorDataset(*inputs, y),
        batch_size=8,
        plan=DPPlan(noise_multiplier=1.0, sample_rate=q, steps=steps, max_grad_norm=C),
        grad_sample_mode="bookkeeping",
        sampling_generator=torch.Generator().manual_seed(3),
        noise_generator=torch.Generator().manual_seed(4),
    )
    # Not vacuous: the crafted weights overflow on the patients.
    with torch.no_grad():
        assert not torch.isfinite(model(*inputs)).all()
    stats = fit(
        private.model,
        private.loader,
        optimizer=private.optimizer,
        criterion=private.criterion,
        epochs=1,
        device=torch.device("cpu"),
    )
    assert stats.steps == steps
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_sequence_linear_gram_cancellation_cannot_pass_a_patient_unclipped() -> None:
    # A centre's weights and a patient's events such that the patient's two positions
    # nearly cancel: ``a_1 = v + d``, ``a_2 = -v + d`` with |v| ~ 1e9 and |d| ~ 1e4. Opacus's
    # Gram-matrix ghost norm for a sequence Linear, ``<g g^T, a a^T>``, then sums terms of
    # ~1e18 of both signs and, in float32, came out ~0 on about half the draws: clip
    # factor 1, and the patient's whole gradient (norm ~1e4) entered the sum. The norm
    # must be that of the vector actually added: reference, the float64 outer product.
    gen = torch.Generator().manual_seed(1)  # any draw must pass: the seed only replays
    k, out, c = 64, 64, 1.0
    lin = nn.Linear(k, out, bias=False)
    u = torch.randn(out, generator=gen) * 1e-2  # the loss's gradient at both positions
    for _ in range(20):
        v, d = torch.randn(k, generator=gen) * 1e9, torch.randn(k, generator=gen) * 1e4
        a = torch.stack([v + d, -v + d]).unsqueeze(0)
        clip = BookkeepingClipper(lin, max_grad_norm=c)
        try:
            flat = clip.clipped_sum((lin(a) * u).sum(dim=(1, 2)))
            true = torch.outer(u.double(), a[0].double().sum(0)).norm().item()
            assert clip.last_norms is not None
            assert clip.last_norms.item() == pytest.approx(true, rel=1e-3)
            assert flat.double().norm().item() <= c * (1 + 1e-5)
        finally:
            clip.remove()
