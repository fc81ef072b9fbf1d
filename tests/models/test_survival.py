"""The survival task kind: label spec, the per-patient hazard loss, DP-SGD validity, release."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from pydantic import ValidationError

from fedcare.common.errors import ConfigError
from fedcare.common.spec import LabelSpec, TaskSpec
from fedcare.models import build_model, model_info
from fedcare.models.survival import (
    DiscreteHazardLoss,
    SurvivalTask,
    event_probability,
    interval_index,
    survival_curves,
    survival_release,
)
from fedcare.models.tasks import task_definition

CUTS = (1.0, 2.0, 4.0)


def _label(**kw: object) -> LabelSpec:
    base: dict[str, object] = {
        "name": "relapse",
        "table": "ehr.csv",
        "column": "event",
        "kind": "survival",
        "time_column": "time",
        "cuts": CUTS,
    }
    return LabelSpec.model_validate({**base, **kw})


# ------------------------------------------------------------------ the label kind


def test_a_survival_label_binds_the_survival_kind_with_its_cuts() -> None:
    task = TaskSpec(name="relapse", label="relapse", modalities=("ehr",))
    definition = task_definition(task, label=_label())
    assert isinstance(definition.kind, SurvivalTask)
    assert definition.kind.cuts == CUTS and definition.model == "ehr_mlp"
    binary = task_definition(task, label=LabelSpec(name="relapse", table="ehr.csv", column="event"))
    assert binary.kind.name == "binary"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"time_column": None}, "needs a 'time_column'"),
        ({"cuts": None}, "needs 'cuts'"),
        ({"cuts": (2.0, 1.0)}, "strictly increasing"),
        ({"cuts": (0.0, 1.0)}, "above 0"),
        ({"cuts": (1.0, math.inf)}, "finite"),
        ({"time_column": "event"}, "must differ"),
        ({"kind": "binary"}, "belong to a survival label"),
    ],
)
def test_a_bad_survival_label_is_named(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _label(**change)


def test_a_survival_task_without_cuts_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cuts"):
        SurvivalTask()


# ------------------------------------------------------------------ the loss


def _reference_nll(logits: np.ndarray, time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """The discrete-time likelihood written out patient by patient, interval by interval."""
    h = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    out = np.zeros(len(time))
    for i, (t, e) in enumerate(zip(time, event, strict=True)):
        k = sum(1 for c in CUTS if c < t)  # intervals fully survived before t's own
        nll = -sum(math.log(1.0 - h[i, j]) for j in range(min(k, len(CUTS))))
        if e == 1 and k < len(CUTS):
            nll -= math.log(h[i, k])
        out[i] = nll
    return out


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, len(CUTS), generator=g)
    time = torch.rand(n, generator=g) * 6.0
    time[:3] = torch.tensor([1.0, 2.0, 4.0])  # on the cuts: closed on the right
    event = (torch.rand(n, generator=g) > 0.4).float()
    return logits, torch.stack([time, event], dim=1)


def test_the_loss_is_the_discrete_time_likelihood_of_each_patient() -> None:
    logits, target = _batch(40, 0)
    per = DiscreteHazardLoss(CUTS, reduction="none")(logits, target)
    ref = _reference_nll(logits.numpy(), target[:, 0].numpy(), target[:, 1].numpy())
    np.testing.assert_allclose(per.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_the_batch_loss_is_the_sum_of_per_patient_losses() -> None:
    logits, target = _batch(32, 1)
    whole = DiscreteHazardLoss(CUTS, reduction="sum")(logits, target)
    alone = sum(
        DiscreteHazardLoss(CUTS, reduction="sum")(logits[i : i + 1], target[i : i + 1])
        for i in range(32)
    )
    assert float(whole) == pytest.approx(float(alone), rel=1e-6)
    mean = DiscreteHazardLoss(CUTS, reduction="mean")(logits, target)
    assert float(mean) == pytest.approx(float(whole) / 32, rel=1e-6)


def test_opacus_per_sample_gradients_equal_each_patients_own_gradient() -> None:
    """What makes per-sample clipping valid: the gradient Opacus attributes to a patient is
    the gradient of that patient's loss alone."""
    task = SurvivalTask(cuts=CUTS)
    model = task.wrap(build_model("ehr_mlp", input_dims={"ehr": 5}))
    gsm = GradSampleModule(model, loss_reduction="sum")
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(2))
    _, target = _batch(12, 3)
    loss = task.make_loss(reduction="sum")(gsm(x), target)
    loss.backward()
    samples = [p.grad_sample.detach().clone() for p in model.parameters()]
    gsm.disable_hooks()
    for i in range(12):
        single = task.make_loss(reduction="sum")(model(x[i : i + 1]), target[i : i + 1])
        own = torch.autograd.grad(single, list(model.parameters()))
        for sample, g in zip(samples, own, strict=True):
            torch.testing.assert_close(sample[i], g, rtol=1e-4, atol=1e-6)


def test_the_hazard_head_keeps_the_backbones_ghost_clipping_claims() -> None:
    """Only an nn.Linear is added: every parameter of the survival model has an Opacus
    ghost-norm sampler where the backbone's have."""
    assert model_info("ehr_mlp").ghost_norm_only
    model = SurvivalTask(cuts=CUTS).wrap(build_model("ehr_mlp", input_dims={"ehr": 5}))
    kinds = {type(m) for m in model.modules() if list(m.parameters(recurse=False))}
    assert kinds == {torch.nn.Linear}
    assert model(torch.zeros(4, 5)).shape == (4, len(CUTS))


def test_the_hazard_loss_recovers_a_planted_linear_risk() -> None:
    """Weibull times whose hazard grows with ``x . w`` (censored at random): a linear risk
    score under the hazard head, fitted by the loss, ranks held-out patients as well as the
    true risk does by scikit-survival's Harrell C-index, and its weights point along ``w``."""
    from sksurv.metrics import concordance_index_censored

    rng = np.random.default_rng(7)
    n, g = 1200, 20
    w = np.zeros(g)
    w[:4] = (1.0, -1.0, 0.7, 0.5)
    x = rng.normal(size=(n, g))
    eta = x @ w
    event_time = 2.0 * rng.weibull(1.5, n) * np.exp(-eta / 1.5)
    censor = rng.uniform(0.5, 6.0, n)
    time = np.minimum(event_time, censor)
    event = (event_time <= censor).astype(np.float64)
    task = SurvivalTask(cuts=CUTS)
    backbone = torch.nn.Linear(g, 1)
    torch.nn.init.zeros_(backbone.weight)  # a linear score: no random start needed
    torch.nn.init.zeros_(backbone.bias)
    model = task.wrap(backbone)
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(np.stack([time, event], 1), dtype=torch.float32)
    train, test = slice(0, 800), slice(800, n)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    loss = task.make_loss()
    for _ in range(300):
        optimizer.zero_grad()
        loss(model(xt[train]), yt[train]).backward()
        optimizer.step()
    with torch.no_grad():
        risk = event_probability(task.scores(model(xt[test])).numpy())
    fitted = concordance_index_censored(event[test] > 0, time[test], risk)[0]
    oracle = concordance_index_censored(event[test] > 0, time[test], eta[test])[0]
    assert oracle > 0.7
    assert fitted > oracle - 0.03
    learned = model.backbone.weight.detach().numpy().ravel()
    cosine = learned @ w / (np.linalg.norm(learned) * np.linalg.norm(w))
    assert cosine > 0.9


def test_interval_index_is_closed_on_the_right() -> None:
    np.testing.assert_array_equal(
        interval_index(np.array([0.0, 1.0, 1.01, 4.0, 4.01]), CUTS), [0, 0, 1, 2, 3]
    )
    t = torch.tensor([0.0, 1.0, 1.01, 4.0, 4.01])
    assert interval_index(t, CUTS).tolist() == [0, 0, 1, 2, 3]


def test_curves_and_risk_follow_the_hazards() -> None:
    h = np.array([[0.1, 0.2, 0.5], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(survival_curves(h), [[0.9, 0.72, 0.36], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(event_probability(h), [0.64, 0.0])


# ------------------------------------------------------------------ the release


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    time = rng.exponential(2.0 * np.exp(-risk))
    event = (rng.uniform(size=n) < 0.7).astype(float)
    hazards = 1.0 / (1.0 + np.exp(-(risk[:, None] - 1.0 + np.zeros((1, len(CUTS))))))
    return np.stack([time, event], axis=1), hazards


def test_the_exact_release_is_the_tasks_exact_metrics() -> None:
    task = SurvivalTask(cuts=CUTS)
    y, h = _split(200, 0)
    train, _ = _split(300, 1)
    out = survival_release(
        task,
        {"test": y},
        {"test": h},
        noise_multiplier=0.0,
        generator=None,
        min_count=10,
        train=train,
    )
    exact = task.metrics(y, h, train=train)
    assert out == {f"test.{k}": v for k, v in exact.items()}
    assert set(exact) == {"n", "c_index", "td_auc", "ibs"}


def test_the_dp_release_sends_noisy_derived_metrics_only() -> None:
    task = SurvivalTask(cuts=CUTS)
    y, h = _split(400, 2)
    outs = [
        survival_release(
            task,
            {"test": y},
            {"test": h},
            noise_multiplier=2.0,
            generator=np.random.default_rng(s),
            min_count=10,
        )
        for s in range(20)
    ]
    assert all(set(o) <= {"test.n", "test.c_index", "test.td_auc"} for o in outs)
    ns = np.array([o["test.n"] for o in outs])
    # n sums 4 x 4 x 2 = 32 cells with noise sd 2 each: sd of n is 2 sqrt(32) ~ 11.3
    assert ns.std() > 3.0 and abs(ns.mean() - 400) < 15
    exact = task.metrics(y, h)["c_index"]
    c = np.array([o["test.c_index"] for o in outs])
    assert abs(c.mean() - exact) < 0.05  # binned, noisy, but about the model's


def test_a_small_split_is_withheld_in_both_modes() -> None:
    task = SurvivalTask(cuts=CUTS)
    y, h = _split(8, 3)
    exact = survival_release(
        task, {"test": y}, {"test": h}, noise_multiplier=0.0, generator=None, min_count=10
    )
    assert exact == {}
    with pytest.raises(ConfigError, match="generator"):
        survival_release(
            task, {"test": y}, {"test": h}, noise_multiplier=1.0, generator=None, min_count=10
        )
