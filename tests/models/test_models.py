"""Every registered model: Opacus-valid, right shapes, trains under DP-SGD; fusion masking.

Ghost-clipping claims are checked by running Opacus ``grad_sample_mode="ghost"`` and
comparing its per-sample gradient norms with norms computed one patient at a time by
plain autograd.
"""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedcare.models import available_models, build_model, model_info

# Opacus's own warnings (insecure RNG in tests; full backward hooks on inputs without grad).
pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

DIMS = {"ehr": 6, "imaging": (1, 8, 8), "genomics": 30}
SINGLE_INPUT = {
    "ehr_mlp": "ehr",
    "imaging_cnn": "imaging",
    "genomics_mlp": "genomics",
    "genomics_linear": "genomics",
}
ALL_MASKS = [[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]


def _modal_inputs(batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    c, h, w = DIMS["imaging"]
    return {
        "ehr": torch.randn(batch, DIMS["ehr"], generator=gen),
        "imaging": torch.randn(batch, c, h, w, generator=gen),
        "genomics": torch.randn(batch, DIMS["genomics"], generator=gen),
    }


def _inputs(name: str, batch: int, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The forward arguments of model ``name`` for a random batch."""
    gen = torch.Generator().manual_seed(seed)
    x = _modal_inputs(batch, gen)
    if model_info(name).multimodal:
        mask = torch.tensor([ALL_MASKS[(i + 1) % 8] for i in range(batch)], dtype=torch.float32)
        mask[0] = 1.0  # one patient with every modality, so every parameter gets a gradient
        return (x["ehr"], x["imaging"], x["genomics"], mask)
    return (x[SINGLE_INPUT[name]],)


def _labels(batch: int) -> torch.Tensor:
    return torch.tensor([i % 2 for i in range(batch)], dtype=torch.float32)


# The timeline model reads a timeline layout these inputs lack: tests/models/test_timeline.py.
MODELS = tuple(n for n in available_models() if n != "timeline")


def test_every_model_family_is_registered() -> None:
    assert set(MODELS) >= {"ehr_mlp", "imaging_cnn", "genomics_mlp", "genomics_linear", "fusion"}
    assert set(SINGLE_INPUT) | {"fusion"} == set(MODELS), "add the new model to these tests"
    assert "timeline" in available_models()


@pytest.mark.parametrize("name", MODELS)
def test_model_passes_opacus_validator_strictly(name: str) -> None:
    model = build_model(name, input_dims=DIMS)
    ModuleValidator.validate(model, strict=True)  # raises on any unsupported layer
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [1, 5])
def test_forward_gives_one_logit_per_patient(name: str, batch: int) -> None:
    out = build_model(name, input_dims=DIMS)(*_inputs(name, batch))
    assert out.shape == (batch,)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = build_model(name, input_dims=DIMS)
    F.binary_cross_entropy_with_logits(model(*_inputs(name, 4)), _labels(4)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", MODELS)
def test_patient_output_does_not_depend_on_the_rest_of_the_batch(name: str) -> None:
    """No batch statistics: per-sample DP clipping assumes samples are independent."""
    model = build_model(name, input_dims=DIMS)
    inputs = _inputs(name, 6)
    together = model(*inputs)
    alone = torch.cat([model(*[x[i : i + 1] for x in inputs]) for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_default_generator_makes_builds_reproducible(name: str) -> None:
    rng_before = torch.get_rng_state()
    a = build_model(name, input_dims=DIMS).state_dict()
    b = build_model(name, input_dims=DIMS).state_dict()
    c = build_model(
        name, input_dims=DIMS, generator=torch.Generator().manual_seed(123)
    ).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before), "global RNG must stay untouched"
    assert all(torch.equal(a[k], b[k]) for k in a)
    weights = [k for k in a if k.endswith("weight") and a[k].dim() > 1]
    assert all(not torch.equal(a[k], c[k]) for k in weights)


def _dp_step(name: str, mode: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """One DP-SGD step with Opacus on a tiny batch; returns the model and old weights."""
    batch = 4
    model = build_model(name, input_dims=DIMS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = _inputs(name, batch)
    loader = DataLoader(TensorDataset(*inputs, _labels(batch)), batch_size=batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = PrivacyEngine(accountant="prv")
    kwargs = dict(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        noise_generator=torch.Generator().manual_seed(0),
    )
    criterion = nn.BCEWithLogitsLoss()
    if mode == "ghost":
        dp_model, dp_opt, dp_crit, dp_loader = engine.make_private(
            **kwargs, criterion=criterion, grad_sample_mode="ghost"
        )
    else:
        dp_model, dp_opt, dp_loader = engine.make_private(**kwargs, grad_sample_mode="hooks")
        dp_crit = criterion
    for *xs, y in dp_loader:
        dp_opt.zero_grad()
        loss = dp_crit(dp_model(*xs), y)
        loss.backward()
        dp_opt.step()
    return dp_model, before


@pytest.mark.parametrize("name", MODELS)
def test_one_dp_sgd_step_with_standard_hooks(name: str) -> None:
    dp_model, before = _dp_step(name, "hooks")
    after = dp_model._module.state_dict()
    assert set(after) == set(before), "Opacus must not change the state-dict keys"
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before), "the step changed nothing"


def _ghost_norms(name: str, batch: int) -> torch.Tensor:
    model = build_model(name, input_dims=DIMS)
    inputs = _inputs(name, batch, seed=3)
    loader = DataLoader(TensorDataset(*inputs, _labels(batch)), batch_size=batch)
    engine = PrivacyEngine(accountant="prv")
    dp_model, _, dp_crit, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.BCEWithLogitsLoss(),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        poisson_sampling=False,
        grad_sample_mode="ghost",
    )
    dp_crit(dp_model(*inputs), _labels(batch)).backward()
    return dp_model.per_sample_gradient_norms.detach()


def _reference_norms(name: str, batch: int) -> torch.Tensor:
    model = build_model(name, input_dims=DIMS)
    inputs = _inputs(name, batch, seed=3)
    y = _labels(batch)
    norms = []
    for i in range(batch):
        model.zero_grad()
        loss = F.binary_cross_entropy_with_logits(
            model(*[x[i : i + 1] for x in inputs]), y[i : i + 1]
        )
        loss.backward()
        sq = sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None)
        norms.append(torch.sqrt(sq))
    return torch.stack(norms)


@pytest.mark.parametrize("name", MODELS)
def test_ghost_clipping_claim_is_true(name: str) -> None:
    """``ghost_clipping=True`` iff ghost mode runs and its per-sample norms are right."""
    try:
        norms = _ghost_norms(name, 5)
        works = bool(torch.allclose(norms, _reference_norms(name, 5), rtol=1e-4, atol=1e-6))
    except (NotImplementedError, RuntimeError, ValueError):
        works = False
    assert works == model_info(name).ghost_clipping


@pytest.mark.parametrize("name", [n for n in MODELS if model_info(n).ghost_clipping])
def test_one_dp_sgd_step_with_ghost_clipping(name: str) -> None:
    dp_model, before = _dp_step(name, "ghost")
    after = dp_model._module.state_dict()
    assert set(after) == set(before)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", MODELS)
def test_ghost_norm_only_claim_matches_opacus_norm_samplers(name: str) -> None:
    model = build_model(name, input_dims=DIMS)
    samplers = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    with_params = [m for m in model.modules() if list(m.parameters(recurse=False))]
    all_ghost = all(type(m) in samplers for m in with_params)
    assert all_ghost == model_info(name).ghost_norm_only
    assert nn.Linear in samplers  # guard: the lookup above reads the real table


REFERENCE_DIMS = {"ehr": 40, "imaging": (1, 32, 32), "genomics": 5000}
PARAMETER_BUDGET = {
    "ehr_mlp": 10_000,
    "imaging_cnn": 10_000,
    "genomics_mlp": 400_000,
    "genomics_linear": 5_001,  # one weight per gene and a bias
    "fusion": 400_000,
}


@pytest.mark.parametrize("name", MODELS)
def test_default_sizes_stay_small(name: str) -> None:
    model = build_model(name, input_dims=REFERENCE_DIMS)
    assert sum(p.numel() for p in model.parameters()) <= PARAMETER_BUDGET[name]


def test_hidden_widths_set_the_mlp_size() -> None:
    model = build_model("ehr_mlp", input_dims={"ehr": 40}, hidden=(16,))
    assert sum(p.numel() for p in model.parameters()) == 40 * 16 + 16 + 16 + 1


@pytest.mark.parametrize("shape", [(1, 4, 4), (1, 17, 23), (1, 64, 64), (3, 32, 32)])
def test_cnn_accepts_other_image_sizes(shape: tuple[int, int, int]) -> None:
    model = build_model("imaging_cnn", input_dims={"imaging": shape})
    out = model(torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2,)
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- fusion


def _fusion_batch(seed: int) -> dict[str, torch.Tensor]:
    return _modal_inputs(8, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("placeholder", ["random", "nan", "huge"])
def test_fusion_output_ignores_masked_out_modalities(placeholder: str) -> None:
    model = build_model("fusion", input_dims=DIMS, dropout=0.0)
    x = _fusion_batch(0)
    other = _fusion_batch(1)
    mask = torch.tensor(ALL_MASKS, dtype=torch.float32)  # every pattern once
    base = model(x["ehr"], x["imaging"], x["genomics"], mask)
    changed = {}
    for j, name in enumerate(("ehr", "imaging", "genomics")):
        fill = {
            "random": other[name],
            "nan": torch.full_like(x[name], float("nan")),
            "huge": torch.full_like(x[name], 1e6),
        }[placeholder]
        keep = mask[:, j].view(-1, *([1] * (x[name].dim() - 1))) > 0
        changed[name] = torch.where(keep, x[name], fill)
    out = model(changed["ehr"], changed["imaging"], changed["genomics"], mask)
    torch.testing.assert_close(out, base)


def test_fusion_output_does_depend_on_present_modalities() -> None:
    model = build_model("fusion", input_dims=DIMS)
    x, other = _fusion_batch(0), _fusion_batch(1)
    mask = torch.ones(8, 3)
    base = model(x["ehr"], x["imaging"], x["genomics"], mask)
    for name in ("ehr", "imaging", "genomics"):
        args = {**x, name: other[name]}
        out = model(args["ehr"], args["imaging"], args["genomics"], mask)
        assert (out - base).abs().max() > 1e-4, f"{name} is present but has no effect"


def test_fusion_averages_embeddings_of_present_modalities() -> None:
    """Reference: the head applied to the mean of the present encoders' outputs."""
    model = build_model("fusion", input_dims=DIMS)
    x = _fusion_batch(2)
    mask = torch.tensor(ALL_MASKS, dtype=torch.float32)
    z = {m: model.encoders[m](x[m]) for m in ("ehr", "imaging", "genomics")}
    expected = []
    for i, row in enumerate(ALL_MASKS):
        present = [m for m, on in zip(("ehr", "imaging", "genomics"), row, strict=True) if on]
        fused = (
            torch.stack([z[m][i] for m in present]).mean(dim=0)
            if present
            else torch.zeros(model.head[0].in_features - 3)
        )
        expected.append(model.head(torch.cat([fused, mask[i]])))
    torch.testing.assert_close(
        model(x["ehr"], x["imaging"], x["genomics"], mask),
        torch.cat(expected),
        rtol=1e-5,
        atol=1e-6,
    )


def test_fusion_built_for_a_subset_ignores_the_other_inputs() -> None:
    model = build_model("fusion", input_dims={"ehr": DIMS["ehr"], "genomics": DIMS["genomics"]})
    assert model.modalities == ("ehr", "genomics")
    x = _fusion_batch(0)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.float32)
    out_none = model(x["ehr"][:4], None, x["genomics"][:4], mask)
    mask_no_img = mask.clone()
    mask_no_img[:, 1] = 0
    out_zero_col = model(x["ehr"][:4], None, x["genomics"][:4], mask_no_img)
    # The data layer passes an unread modality as a zero-width (B, 0) tensor.
    out_zero_width = model(x["ehr"][:4], torch.zeros(4, 0), x["genomics"][:4], mask_no_img)
    assert out_none.shape == (4,)
    torch.testing.assert_close(out_none, out_zero_col)
    torch.testing.assert_close(out_none, out_zero_width)
    assert not any(isinstance(m, nn.Conv2d) for m in model.modules())
    ModuleValidator.validate(model, strict=True)


def test_fusion_rejects_none_for_a_modality_it_was_built_for() -> None:
    model = build_model("fusion", input_dims=DIMS)
    x = _fusion_batch(0)
    with pytest.raises(ValueError, match="placeholder"):
        model(x["ehr"], None, x["genomics"], torch.ones(8, 3))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
def test_model_trains_on_cuda(name: str) -> None:
    device = torch.device("cuda")
    model = build_model(name, input_dims=DIMS).to(device)
    inputs = [x.to(device) for x in _inputs(name, 4)]
    out = model(*inputs)
    assert out.shape == (4,) and out.device.type == "cuda"
    F.binary_cross_entropy_with_logits(out, _labels(4).to(device)).backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("name", [n for n in MODELS if model_info(n).ghost_clipping])
def test_ghost_clipping_on_cuda_matches_cpu_norms(name: str) -> None:
    device = torch.device("cuda")
    model = build_model(name, input_dims=DIMS).to(device)
    cpu_model = copy.deepcopy(model).cpu()
    inputs = _inputs(name, 4, seed=3)
    engine = PrivacyEngine(accountant="prv")
    dp_model, _, dp_crit, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.BCEWithLogitsLoss(),
        data_loader=DataLoader(TensorDataset(*inputs, _labels(4)), batch_size=4),
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        poisson_sampling=False,
        grad_sample_mode="ghost",
    )
    dp_crit(dp_model(*[x.to(device) for x in inputs]), _labels(4).to(device)).backward()
    norms = dp_model.per_sample_gradient_norms.detach().cpu()
    ref = []
    for i in range(4):
        cpu_model.zero_grad()
        F.binary_cross_entropy_with_logits(
            cpu_model(*[x[i : i + 1] for x in inputs]), _labels(4)[i : i + 1]
        ).backward()
        ref.append(torch.sqrt(sum((p.grad**2).sum() for p in cpu_model.parameters())))
    torch.testing.assert_close(norms, torch.stack(ref), rtol=1e-3, atol=1e-5)


def test_fusion_subset_trains_under_ghost_clipping_with_zero_width_placeholders() -> None:
    """The data layer's multimodal batch for an EHR+genomics task, through Opacus."""
    model = build_model("fusion", input_dims={"ehr": DIMS["ehr"], "genomics": DIMS["genomics"]})
    x = _fusion_batch(0)
    mask = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 0, 1], [1, 0, 1]], dtype=torch.float32)
    data = TensorDataset(x["ehr"][:4], torch.zeros(4, 0), x["genomics"][:4], mask, _labels(4))
    engine = PrivacyEngine(accountant="prv")
    dp_model, dp_opt, dp_crit, dp_loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        criterion=nn.BCEWithLogitsLoss(),
        data_loader=DataLoader(data, batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        grad_sample_mode="ghost",
        noise_generator=torch.Generator().manual_seed(0),
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for *xs, y in dp_loader:
        dp_opt.zero_grad()
        dp_crit(dp_model(*xs), y).backward()
        dp_opt.step()
    after = dp_model._module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
