"""The timeline model: Opacus-valid, per-sample gradients and clipping checked against
per-patient autograd, order-aware, and refused to models that cannot read a timeline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedcare.client.data.events import parse_events
from fedcare.client.data.sequences import encode_timelines
from fedcare.common.encoding import TIMELINE_KEY, timeline_width
from fedcare.common.errors import ConfigError
from fedcare.common.spec import TimelineCode, TimelineSchema
from fedcare.models import FusionModel, build_model, default_model_for, model_info
from fedcare.models.timeline import _STEP_WIDTH, _STEPS, pair_timing

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

STATIC = 5
TIMELINE = TimelineSchema(
    name="t",
    codes=(TimelineCode(code="A"), TimelineCode(code="B", center=1.0, scale=2.0)),
    max_length=6,
    time_unit="hours",
    time_scale=24.0,
)
DIMS = {"ehr": STATIC + timeline_width(TIMELINE), TIMELINE_KEY: (6, 2)}


def _batch(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` EHR vectors: random static columns, then timelines encoded from random events
    (0 to 9 events each, so some are truncated, some padded, one empty)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n):
        for _ in range(int(rng.integers(0, 10)) if p else 0):
            rows.append((f"p{p}", float(rng.uniform(0, 96)), rng.choice(["A", "B"]), rng.normal()))
    events = pd.DataFrame(rows, columns=["patient_id", "time", "code", "value"])
    parsed = parse_events(events, id_column="patient_id")
    seq = encode_timelines(parsed, TIMELINE, patient_ids=[f"p{p}" for p in range(n)])
    static = rng.normal(size=(n, STATIC))
    return torch.tensor(np.hstack([static, seq.reshape(n, -1)]), dtype=torch.float32)


def _labels(n: int) -> torch.Tensor:
    return torch.tensor([i % 2 for i in range(n)], dtype=torch.float32)


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The timeline model reads ``x``; the fusion model ``x`` as its EHR input."""
    inner = model._module if isinstance(model, GradSampleModule) else model
    if isinstance(inner, FusionModel):
        return model(x, None, None, torch.ones(len(x), 3))
    return model(x)


def _per_patient_grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(len(x)):
        model.zero_grad()
        F.binary_cross_entropy_with_logits(_forward(model, x[i : i + 1]), y[i : i + 1]).backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("name", ["timeline", "fusion"])
def test_passes_the_opacus_validator_and_gives_one_logit_per_patient(name: str) -> None:
    model = build_model(name, input_dims=DIMS)
    ModuleValidator.validate(model, strict=True)
    x = _batch(4)
    out = model(x) if name == "timeline" else model(x, None, None, torch.ones(4, 3))
    assert out.shape == (4,) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["timeline", "fusion"])
def test_opacus_per_sample_gradients_equal_per_patient_autograd(name: str) -> None:
    model = build_model(name, input_dims=DIMS)
    x, y = _batch(7, seed=1), _labels(7)
    reference = _per_patient_grads(model, x, y)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    gsm.zero_grad()
    F.binary_cross_entropy_with_logits(_forward(gsm, x), y, reduction="sum").backward()
    for name, p in model.named_parameters():
        assert p.grad_sample is not None, name
        expected = torch.stack([g[name] for g in reference])
        torch.testing.assert_close(p.grad_sample, expected, rtol=1e-4, atol=1e-6, msg=name)
    gsm._close()


def _reference_norms(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    grads = _per_patient_grads(build_model("timeline", input_dims=DIMS), x, y)
    return torch.stack([torch.sqrt(sum((g**2).sum() for g in d.values())) for d in grads])


def test_ghost_clipping_norms_equal_per_patient_autograd() -> None:
    """The registry's ghost_clipping / ghost_norm_only claims hold."""
    x, y = _batch(6, seed=2), _labels(6)
    model = build_model("timeline", input_dims=DIMS)
    samplers = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    with_params = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    assert all(type(m) in samplers for m in with_params) == model_info("timeline").ghost_norm_only
    engine = PrivacyEngine(accountant="prv")
    dp_model, _, dp_crit, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.BCEWithLogitsLoss(),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=6),
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        poisson_sampling=False,
        grad_sample_mode="ghost",
    )
    dp_crit(dp_model(x), y).backward()
    norms = dp_model.per_sample_gradient_norms.detach()
    assert model_info("timeline").ghost_clipping
    torch.testing.assert_close(norms, _reference_norms(x, y), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_dp_sgd_step_clips_each_patient_separately(mode: str) -> None:
    """Noise 0: Opacus's step equals the mean of each patient's gradient clipped alone."""
    n, clip, lr = 6, 0.05, 1.0
    x, y = _batch(n, seed=3), _labels(n)
    model = build_model("timeline", input_dims=DIMS)
    before = {k: v.clone() for k, v in model.named_parameters()}
    grads = _per_patient_grads(build_model("timeline", input_dims=DIMS), x, y)
    norms = [torch.sqrt(sum((g**2).sum() for g in d.values())) for d in grads]
    assert max(norms) > clip, "the clipping norm must bind for some patient"
    expected = {
        k: before[k]
        - lr
        * sum(d[k] * min(1.0, clip / float(nm)) for d, nm in zip(grads, norms, strict=True))
        / n
        for k in before
    }
    engine = PrivacyEngine(accountant="prv")
    loader = DataLoader(TensorDataset(x, y), batch_size=n)
    kwargs = dict(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        poisson_sampling=False,
    )
    criterion = nn.BCEWithLogitsLoss()
    if mode == "ghost":
        dp_model, dp_opt, dp_crit, _ = engine.make_private(
            **kwargs, criterion=criterion, grad_sample_mode="ghost"
        )
    else:
        dp_model, dp_opt, _ = engine.make_private(**kwargs, grad_sample_mode="hooks")
        dp_crit = criterion
    dp_opt.zero_grad()
    dp_crit(dp_model(x), y).backward()
    dp_opt.step()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[k], rtol=1e-4, atol=1e-6, msg=k)


def test_a_patients_output_does_not_depend_on_the_rest_of_the_batch() -> None:
    model = build_model("timeline", input_dims=DIMS)
    x = _batch(6, seed=4)
    alone = torch.cat([model(x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(model(x), alone, rtol=1e-5, atol=1e-6)


def test_the_order_of_events_reaches_the_output() -> None:
    """Same events, same values, A then B vs B then A: aggregates are equal, outputs not."""
    first = pd.DataFrame(
        {"patient_id": ["p", "p"], "time": [10.0, 20.0], "code": ["A", "B"], "value": [0.0, 0.0]}
    )
    swapped = first.assign(time=[20.0, 10.0])
    xs = [
        encode_timelines(parse_events(f, id_column="patient_id"), TIMELINE, patient_ids=["p"])
        for f in (first, swapped)
    ]
    model = build_model("timeline", input_dims=DIMS, generator=torch.Generator().manual_seed(5))
    static = torch.zeros(1, STATIC)
    outs = [model(torch.cat([static, torch.tensor(s.reshape(1, -1))], 1)) for s in xs]
    assert not torch.allclose(outs[0], outs[1])


def _reference_pair_timing(events: pd.DataFrame, patients: list[str]) -> np.ndarray:
    """Code-pair timing counted pair by pair in numpy: for codes a, b and step k, the mean
    over the patient's (a, b) event pairs (two distinct events) of the soft step
    ``clip((t_b - t_a) / 24 h - k) / width, 0, 1)``."""
    codes = [c.code for c in TIMELINE.codes]
    out = np.zeros((len(patients), len(codes), len(_STEPS), len(codes)))
    for r, pid in enumerate(patients):
        rows = events[events["patient_id"] == pid]
        t = rows["time"].to_numpy() / TIMELINE.time_scale
        c = [codes.index(v) for v in rows["code"]]
        for a in range(len(codes)):
            for b in range(len(codes)):
                pairs = [(i, j) for i in range(len(t)) for j in range(len(t))]
                pairs = [(i, j) for i, j in pairs if i != j and c[i] == a and c[j] == b]
                for k, step in enumerate(_STEPS):
                    soft = [np.clip((t[j] - t[i] - step) / _STEP_WIDTH, 0, 1) for i, j in pairs]
                    out[r, a, k, b] = np.mean(soft) if soft else 0.0
    return out.reshape(len(patients), -1)


def test_pair_timing_is_the_fraction_of_code_pairs_beyond_each_step() -> None:
    """Against a pair-by-pair numpy count, on random events (up to max_length per patient, so
    none is truncated; one patient has none), including ties and pairs of one code."""
    rng = np.random.default_rng(11)
    rows = []
    patients = [f"p{p}" for p in range(12)]
    for p, pid in enumerate(patients):
        for _ in range(int(rng.integers(0, TIMELINE.max_length + 1)) if p else 0):
            time = float(rng.choice([rng.uniform(0, 96), 24.0]))  # some ties
            rows.append((pid, time, rng.choice(["A", "B"]), 0.0))
    events = pd.DataFrame(rows, columns=["patient_id", "time", "code", "value"])
    parsed = parse_events(events, id_column="patient_id")
    seq = encode_timelines(parsed, TIMELINE, patient_ids=patients)
    got = pair_timing(torch.tensor(seq, dtype=torch.float64), len(TIMELINE.codes)).numpy()
    # The encoding stores log1p(time) in float32; the soft step's slope (1 / width = 10)
    # scales its rounding: 1e-4 is far below any step's change.
    np.testing.assert_allclose(got, _reference_pair_timing(events, patients), atol=1e-4)
    assert got.min() >= 0.0 and got.max() <= 1.0


def test_a_window_between_two_codes_is_one_linear_feature_of_the_timeline_model() -> None:
    """A within the day before B (the temporal task's pattern) is the difference of two
    pair-timing entries, which the model reads through one linear layer into the logit."""
    model = build_model("timeline", input_dims=DIMS)
    n_codes, n_steps = len(TIMELINE.codes), len(_STEPS)
    assert model.timing.in_features == n_codes * n_steps * n_codes

    def entry(f: np.ndarray, step: float) -> float:  # (B's pairs, step, with A)
        return float(f[(1 * n_steps + _STEPS.index(step)) * n_codes + 0])

    for hours_after, expected in ((12.0, 1.0), (40.0, 0.0), (-5.0, 0.0)):
        frame = pd.DataFrame(
            {
                "patient_id": ["p", "p"],
                "time": [30.0, 30.0 + hours_after],
                "code": ["A", "B"],
                "value": [0.0, 0.0],
            }
        )
        parsed = parse_events(frame, id_column="patient_id")
        seq = encode_timelines(parsed, TIMELINE, patient_ids=["p"])
        f = pair_timing(torch.tensor(seq), n_codes).numpy()[0]
        assert entry(f, -1.0) - entry(f, 0.0) == pytest.approx(expected, abs=1e-4), hours_after


def test_models_that_cannot_read_a_timeline_are_refused() -> None:
    with pytest.raises(ConfigError, match="cannot read the task's patient timeline.*timeline"):
        build_model("ehr_mlp", input_dims=DIMS)
    with pytest.raises(ConfigError, match="input_dims\\['timeline'\\]"):
        build_model("timeline", input_dims={"ehr": 40})
    with pytest.raises(ConfigError, match="cannot hold a timeline"):
        build_model("timeline", input_dims={"ehr": 10, TIMELINE_KEY: (6, 2)})
    assert default_model_for(("ehr",), timeline=True) == "timeline"
    assert default_model_for(("ehr", "genomics"), timeline=True) == "fusion"
