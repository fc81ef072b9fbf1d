"""Book-keeping DP-SGD (``grad_sample_mode="bookkeeping"``, :mod:`fedcare.client.bookkeeping`).

The clipped, summed gradient before noise is checked against an independent reference: plain
torch autograd, one patient at a time, each gradient clipped to ``C`` (``min(1, C/||g||)``),
summed; the per-patient norms of the CNN against Opacus's own per-sample gradients (hooks
mode). Models are random all-Linear MLPs, the registered models, a sequence model, and
convolution + GroupNorm networks over stride, padding, dilation, groups, no bias, frozen
parameters and odd image sizes; batches mix patients whose gradient norm is far below and far
above ``C``, are empty (Poisson) or hold a patient whose gradient is not finite. The noise and
the accounting are checked against Opacus's ghost-clipping set-up with the same plan.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from fedcare.client.bookkeeping import BookkeepingClipper, check_supported
from fedcare.client.dpsgd import (
    DPPlan,
    PrivateTraining,
    make_private,
    resolve_grad_sample_mode,
    sampling,
)
from fedcare.client.training import fit
from fedcare.common.encoding import TIMELINE_CHANNELS, TIMELINE_KEY
from fedcare.common.errors import ConfigError
from fedcare.models import available_models, build_model, model_info
from fedcare.models.registry import init_parameters

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

C = 1.0
STATIC, LENGTH, CODES = 4, 5, 3
TIMELINE_DIMS = {"ehr": STATIC + LENGTH * len(TIMELINE_CHANNELS), TIMELINE_KEY: (LENGTH, CODES)}


# ------------------------------------------------------------------------------ reference


def _reference_clipped_sum(
    model: nn.Module,
    x: torch.Tensor | tuple[torch.Tensor, ...],
    y: torch.Tensor,
    *,
    max_norm: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i min(1, C/||g_i||) g_i, norms)`` by torch autograd, one patient at a time;
    patients whose gradient is not finite are left out. ``x`` may be a tuple of inputs."""
    inputs = x if isinstance(x, tuple) else (x,)
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    norms = []
    for i in range(len(y)):
        patient = tuple(t[i : i + 1] for t in inputs)
        loss = F.binary_cross_entropy_with_logits(model(*patient), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        flat = torch.cat([g.reshape(-1) for g in grads]).double()
        norm = float(flat.norm())
        norms.append(norm)
        if math.isfinite(norm) and norm > 0:
            total += flat * min(1.0, max_norm / norm)
    return total, torch.tensor(norms, dtype=torch.float64)


def _bookkeeping_clipped_sum(
    model: nn.Module,
    x: torch.Tensor | tuple[torch.Tensor, ...],
    y: torch.Tensor,
    *,
    max_norm: float,
) -> torch.Tensor:
    inputs = x if isinstance(x, tuple) else (x,)
    clipper = BookkeepingClipper(model, max_grad_norm=max_norm)
    try:
        per_sample = F.binary_cross_entropy_with_logits(model(*inputs), y, reduction="none")
        flat = clipper.clipped_sum(per_sample)
        # The parameters' .grad are the slices of the flat sum, in parameter order.
        assert torch.equal(_grads(model), flat)
        return flat.double()
    finally:
        clipper.remove()


def _grads(model: nn.Module) -> torch.Tensor:
    """The trainable parameters' ``.grad``, flattened in parameter order (each must be set)."""
    grads = []
    for p in model.parameters():
        if p.requires_grad:
            assert p.grad is not None
            grads.append(p.grad.reshape(-1))
    return torch.cat(grads)


def _spread(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Scale each patient's input by 10^u, u uniform in [-3, 4]: gradient norms far below and
    far above C in one batch."""
    shape = (len(x),) + (1,) * (x.dim() - 1)
    return x * 10.0 ** (torch.rand(shape, generator=gen, dtype=x.dtype) * 7 - 3)


def _mlp(gen: torch.Generator) -> nn.Module:
    widths = [
        int(w)
        for w in torch.randint(
            4, 24, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen
        )
    ]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:] + [1], strict=True)):
        layers.append(nn.Linear(a, b, bias=bool(i % 2 == 0)))
        layers.append(nn.ReLU())
    model = nn.Sequential(*layers[:-1], nn.Flatten(0))
    init_parameters(model, generator=gen)
    return model


class _SequenceModel(nn.Module):
    """Linear layers on ``(B, L, k)`` inputs (positions summed in the gradient), then a head."""

    def __init__(self, k: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Linear(k, hidden)
        self.mix = nn.Linear(hidden, hidden, bias=False)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.mix(torch.relu(self.embed(x))))
        return self.head(h.mean(dim=1)).squeeze(-1)


def _assert_matches(
    model: nn.Module,
    x: torch.Tensor | tuple[torch.Tensor, ...],
    y: torch.Tensor,
    *,
    max_norm: float = C,
) -> torch.Tensor:
    expected, norms = _reference_clipped_sum(model, x, y, max_norm=max_norm)
    got = _bookkeeping_clipped_sum(model, x, y, max_norm=max_norm)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=_atol(len(y), max_norm))
    return norms


def _atol(n: int, max_norm: float = C) -> float:
    """Opacus's clip factor is ``C / (||g|| + 1e-6)``, the reference's the exact
    ``min(1, C/||g||)``: a clipped patient's contribution differs by at most ``1e-6 * C``
    in norm, so the sums by at most ``n * 1e-6 * C``. Everything else is float64."""
    return n * 1e-6 * max_norm


# ------------------------------------------------------------------------------ the sum


@pytest.mark.parametrize("seed", range(6))
def test_clipped_sum_equals_per_patient_autograd_on_random_mlps(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = _mlp(gen).double()
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    x = _spread(torch.randn(17, first.in_features, generator=gen, dtype=torch.float64), gen)
    y = torch.randint(0, 2, (17,), generator=gen).double()
    norms = _assert_matches(model, x, y)
    # Not vacuous: some patients are clipped hard, some not at all.
    assert (norms > 10 * C).any() and (norms < C).any()


@pytest.mark.parametrize("seed", range(3))
def test_clipped_sum_equals_per_patient_autograd_on_sequence_inputs(seed: int) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    model = _SequenceModel(6, 16)
    init_parameters(model, generator=gen)
    model.double()
    x = _spread(torch.randn(16, 7, 6, generator=gen, dtype=torch.float64), gen)
    y = torch.randint(0, 2, (16,), generator=gen).double()
    norms = _assert_matches(model, x, y)
    assert (norms > 10 * C).any() and (norms < C).any()


def _timeline_batch(n: int, gen: torch.Generator) -> torch.Tensor:
    seq = torch.randn(n, LENGTH, len(TIMELINE_CHANNELS), generator=gen, dtype=torch.float64)
    seq[..., TIMELINE_CHANNELS.index("code")] = torch.randint(
        0, CODES + 1, (n, LENGTH), generator=gen
    ).double()
    seq[..., TIMELINE_CHANNELS.index("present")] = (
        torch.rand(n, LENGTH, generator=gen, dtype=torch.float64) < 0.7
    ).double()
    static = torch.randn(n, STATIC, generator=gen, dtype=torch.float64)
    return torch.cat([static, seq.reshape(n, -1)], dim=1)


@pytest.mark.parametrize(
    ("name", "dims"),
    [("ehr_mlp", {"ehr": 11}), ("genomics_mlp", {"genomics": 30}), ("timeline", TIMELINE_DIMS)],
)
def test_clipped_sum_equals_per_patient_autograd_on_registered_models(
    name: str, dims: dict[str, object]
) -> None:
    gen = torch.Generator().manual_seed(7)
    model = build_model(name, input_dims=dims).double()
    n = 12
    if name == "timeline":
        x = _timeline_batch(n, gen) * 10.0 ** (torch.rand(n, 1, generator=gen) * 4 - 2)
    else:
        x = _spread(torch.randn(n, next(iter(dims.values())), generator=gen).double(), gen)  # type: ignore[call-overload]
    y = torch.randint(0, 2, (n,), generator=gen).double()
    norms = _assert_matches(model, x, y)
    assert (norms > C).any() and (norms < C).any()


def test_an_empty_batch_gives_a_zero_sum() -> None:
    model = _SequenceModel(4, 5)
    init_parameters(model, generator=torch.Generator().manual_seed(0))
    flat = _bookkeeping_clipped_sum(model, torch.zeros(0, 3, 4), torch.zeros(0), max_norm=C)
    assert flat.shape == (sum(p.numel() for p in model.parameters()),)
    assert torch.count_nonzero(flat) == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_patient_with_a_non_finite_gradient_is_dropped_alone(bad: float) -> None:
    """Clip factor 0 for that patient; the others' clipped sum is exactly the reference's."""
    gen = torch.Generator().manual_seed(3)
    model = _mlp(gen).double()
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    x = _spread(torch.randn(8, first.in_features, generator=gen, dtype=torch.float64), gen)
    x[2, 0] = bad
    y = torch.randint(0, 2, (8,), generator=gen).double()
    expected, norms = _reference_clipped_sum(model, x, y, max_norm=C)
    assert not math.isfinite(float(norms[2])) and torch.isfinite(norms[[0, 1, 3]]).all()
    got = _bookkeeping_clipped_sum(model, x, y, max_norm=C)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=_atol(len(x)))


def test_a_new_clipper_replaces_the_old_and_a_forward_without_backward_is_forgotten() -> None:
    gen = torch.Generator().manual_seed(5)
    model = _mlp(gen).double()
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    x = _spread(torch.randn(6, first.in_features, generator=gen, dtype=torch.float64), gen)
    y = torch.randint(0, 2, (6,), generator=gen).double()
    old = BookkeepingClipper(model, max_grad_norm=C)
    new = BookkeepingClipper(model, max_grad_norm=C)
    model(x * 3)  # a forward no backward follows
    per_sample = F.binary_cross_entropy_with_logits(model(x), y, reduction="none")
    assert old._captured == []  # its hooks are gone
    got = new.clipped_sum(per_sample).double()
    new.remove()
    expected, _ = _reference_clipped_sum(model, x, y, max_norm=C)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=_atol(len(x)))


def test_frozen_layers_get_no_gradient_and_do_not_count_in_the_norm() -> None:
    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(
        nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 1), nn.Flatten(0)
    )
    init_parameters(model, generator=gen)
    model.double()
    model[0].weight.requires_grad_(False)
    model[2].requires_grad_(False)  # a layer with nothing trained
    x = _spread(torch.randn(10, 5, generator=gen, dtype=torch.float64), gen)
    y = torch.randint(0, 2, (10,), generator=gen).double()
    _assert_matches(model, x, y)
    assert model[0].weight.grad is None and model[2].bias.grad is None


def test_clipped_sum_equals_per_patient_autograd_on_four_dimensional_inputs() -> None:
    gen = torch.Generator().manual_seed(8)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.ReLU(), nn.Flatten(1), nn.Linear(24, 1), nn.Flatten(0)
    )
    init_parameters(model, generator=gen)
    model.double()
    x = _spread(torch.randn(10, 2, 3, 3, generator=gen, dtype=torch.float64), gen)
    y = torch.randint(0, 2, (10,), generator=gen).double()
    norms = _assert_matches(model, x, y)
    assert (norms > 10 * C).any() and (norms < C).any()


# ------------------------------------------------------------------------------ where it applies


def test_auto_picks_bookkeeping_for_every_bundled_model() -> None:
    """Given the built model, ``auto`` is bookkeeping wherever :func:`check_supported` accepts
    it, which is every bundled model; by name alone, the registry's all-Linear flag."""
    dims = {"ehr": 9, "genomics": 7, "imaging": (1, 8, 8)}
    for name in available_models():
        info = model_info(name)
        single_timeline = info.timeline and not info.multimodal
        model = build_model(
            name,
            input_dims=TIMELINE_DIMS if single_timeline else {m: dims[m] for m in info.modalities},
        )
        check_supported(model)
        assert resolve_grad_sample_mode("auto", name, model=model) == "bookkeeping", name
        by_name = resolve_grad_sample_mode("auto", name)
        assert by_name == ("bookkeeping" if info.ghost_norm_only else "hooks"), name
    fusion = build_model("fusion", input_dims={**TIMELINE_DIMS, "imaging": (1, 8, 8)})
    assert resolve_grad_sample_mode("auto", "fusion", model=fusion) == "bookkeeping"
    embedded = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 1))
    assert resolve_grad_sample_mode("auto", "fusion", model=embedded) == "hooks"
    assert resolve_grad_sample_mode("ghost", "fusion", model=fusion) == "ghost"


def test_auto_keeps_hooks_for_a_plugin_model_that_did_not_declare_bookkeeping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A plugin CNN registered without ``bookkeeping=True`` may call a layer twice (found
    # only at the first step, after the round's charge): hooks, as before convolutions
    # were handled. Declared, the same layers get bookkeeping.
    from fedcare.models.registry import HParams, ModelRegistry

    class Net(nn.Module):
        class Config(HParams):
            pass

        @classmethod
        def from_config(cls, config: HParams, input_dims: dict[str, object]) -> Net:
            return cls()

        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(1, 2, 3), nn.Linear(2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x).mean(dim=(2, 3)))

    import fedcare.models.registry as registry

    for declared in (False, True):
        table = ModelRegistry()
        table.register(
            "plugin_cnn", modalities=("imaging",), ghost_clipping=True,
            ghost_norm_only=False, bookkeeping=declared,
        )(Net)  # fmt: skip
        monkeypatch.setattr(registry, "_DEFAULT_REGISTRY", table)  # a registry of its own
        mode = resolve_grad_sample_mode("auto", "plugin_cnn", model=Net())
        assert mode == ("bookkeeping" if declared else "hooks")


def test_a_patient_folded_into_several_rows_is_refused_not_clipped_per_row() -> None:
    # A model that reshapes each patient's 8 slices into 8 rows before a layer would have
    # each slice clipped on its own: one patient could add up to 8 C.
    class Folded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.reshape(-1, 4)).reshape(x.shape[0], -1).sum(dim=1)

    model = Folded()
    clip = BookkeepingClipper(model, max_grad_norm=1.0)
    try:
        out = model(torch.randn(2, 8, 4))
        with pytest.raises(ConfigError, match="first dimension"):
            clip.clipped_sum(out.square())
    finally:
        clip.remove()


def test_a_layer_called_twice_is_refused() -> None:
    layer = nn.Linear(3, 3)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(torch.tanh(self.layer(x))).sum(-1)

    model = Tied()
    clipper = BookkeepingClipper(model, max_grad_norm=C)
    loss = F.binary_cross_entropy_with_logits(
        model(torch.ones(4, 3)), torch.ones(4), reduction="none"
    )
    with pytest.raises(ConfigError, match="once per"):
        clipper.clipped_sum(loss)


def test_a_weight_two_layers_share_is_refused_before_anything_runs() -> None:
    """Tied weights: each layer's clipped sum would be written over the other's, and the
    per-patient norm would miss the cross terms (found by review)."""
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second)
    with pytest.raises(ConfigError, match="shares one with"):
        check_supported(model)
    second.weight = nn.Parameter(first.weight.detach().clone())
    check_supported(model)  # untied: fine


def test_make_private_refuses_bookkeeping_for_a_model_with_an_unhandled_layer() -> None:
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(1), nn.Linear(12, 1), nn.Flatten(0))
    data = TensorDataset(torch.zeros(8, 1, 8), torch.ones(8))
    with pytest.raises(ConfigError, match="Conv1d"):
        _private(model, data, "bookkeeping", sigma=1.0)


# ------------------------------------------------------------------------------ noise, accounting


def _recording(loader: Any, sizes: list[int]) -> Iterator[Any]:
    """``loader``'s batches, each one's size appended to ``sizes`` (empty Poisson batches
    included)."""
    for batch in loader:
        sizes.append(len(batch[1]))
        yield batch


def _private(
    model: nn.Module, data: TensorDataset, mode: str, *, sigma: float, batch: int = 4
) -> PrivateTraining:
    q, steps = sampling(len(data), batch_size=batch, epochs=1)
    return make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.BCEWithLogitsLoss(),
        dataset=data,
        batch_size=batch,
        plan=DPPlan(noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=C),
        grad_sample_mode=mode,
        sampling_generator=torch.Generator().manual_seed(1),
        noise_generator=torch.Generator().manual_seed(2),
    )


@pytest.mark.parametrize("sigma", [0.7, 2.0])
def test_noise_has_opacus_std_on_an_empty_batch(sigma: float) -> None:
    """Nothing sampled: the step's gradient is the noise alone, N(0, (sigma C)^2) / E[B]."""
    model = nn.Sequential(nn.Linear(300, 400), nn.Linear(400, 1), nn.Flatten(0))
    init_parameters(model, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(
        torch.randn(64, 300, generator=torch.Generator().manual_seed(1)), torch.ones(64)
    )
    private = _private(model, data, "bookkeeping", sigma=sigma, batch=16)
    private.optimizer.zero_grad(set_to_none=True)
    logits = private.model(torch.zeros(0, 300))
    private.criterion(logits, torch.zeros(0)).backward()
    assert torch.count_nonzero(_grads(model)) == 0
    assert private.optimizer.pre_step()
    noise = _grads(model).double()
    expected_std = sigma * C / 16  # Opacus: std sigma * C, divided by the expected batch size
    assert noise.numel() > 100_000
    assert abs(float(noise.std()) / expected_std - 1) < 0.02
    assert abs(float(noise.mean())) < 0.02 * expected_std


def test_same_mechanism_and_epsilon_as_ghost_clipping_with_empty_poisson_batches() -> None:
    """Same sigma, sample rate and step count in Opacus's accountant (hence the same epsilon);
    the Poisson loader's empty batches are stepped, noise only."""
    data = TensorDataset(
        torch.randn(3, 5, generator=torch.Generator().manual_seed(1)), torch.ones(3)
    )
    seen: dict[str, object] = {}
    for mode in ("bookkeeping", "ghost"):
        model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 1), nn.Flatten(0))
        init_parameters(model, generator=torch.Generator().manual_seed(0))
        private = _private(model, data, mode, sigma=1.3, batch=2)
        sizes: list[int] = []

        for _ in range(20):
            before = [p.detach().clone() for p in model.parameters()]
            stats = fit(
                private.model,
                _recording(private.loader, sizes),
                optimizer=private.optimizer,
                criterion=private.criterion,
                epochs=1,
                device=torch.device("cpu"),
            )
            assert stats.steps == 2
            moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
            assert all(moved)
        assert 0 in sizes and max(sizes) > 0  # empty Poisson batches were stepped too
        seen[mode] = (private.accountant.history, private.accountant.get_epsilon(delta=1e-5))
    assert seen["bookkeeping"][0] == [(1.3, 0.5, 40)]  # type: ignore[index]
    assert seen["bookkeeping"] == seen["ghost"]


def test_one_step_before_noise_equals_opacus_ghost_clipping() -> None:
    """The clipped sum of one batch equals Opacus's two-backward ghost clipping's."""
    gen = torch.Generator().manual_seed(9)
    x = _spread(torch.randn(8, 6, generator=gen), gen)
    y = torch.randint(0, 2, (8,), generator=gen).float()
    data = TensorDataset(x, y)
    sums = {}
    for mode in ("bookkeeping", "ghost"):
        model = build_model("ehr_mlp", input_dims={"ehr": 6})
        private = _private(model, data, mode, sigma=1.0, batch=8)
        private.optimizer.zero_grad(set_to_none=True)
        private.criterion(private.model(x), y).backward()
        sums[mode] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(sums["bookkeeping"], sums["ghost"], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ convolutions


class _ConvNet(nn.Module):
    """One ``nn.Conv2d`` with the given options, GroupNorm, ReLU, a second convolution,
    pooling and a linear head. (A convolution with one input channel per group takes another
    way to its per-patient gradients than one with more: the depthwise options and the
    registered CNN's first layer test the first, every other convolution the second.)"""

    def __init__(self, conv: nn.Conv2d, *, groups: int, image: tuple[int, int]) -> None:
        super().__init__()
        self.conv = conv
        self.norm = nn.GroupNorm(groups, conv.out_channels)
        self.second = nn.Conv2d(conv.out_channels, 4, kernel_size=(2, 3), padding=(1, 0))
        with torch.no_grad():
            width = self._trunk(torch.zeros(1, conv.in_channels, *image)).shape[1]
        self.head = nn.Linear(width, 1)

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(x)))
        return F.max_pool2d(self.second(h), 2, ceil_mode=True).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._trunk(x)).squeeze(-1)


CONV_OPTIONS = {
    "3x3 pad 1": dict(kernel_size=3, padding=1),
    "stride 2, no pad": dict(kernel_size=3, stride=2),
    "odd kernel, stride, pad": dict(kernel_size=(3, 2), stride=(2, 1), padding=(2, 1)),
    "dilation 2": dict(kernel_size=3, dilation=2, padding=2),
    "groups 2, no bias": dict(kernel_size=3, padding=1, groups=2, bias=False),
    "1x1, groups 4 (depthwise)": dict(kernel_size=1, groups=4),
    "depthwise 3x3, stride, dilation, pad": dict(
        kernel_size=3, stride=2, dilation=2, padding=(1, 2), groups=4
    ),
}


@pytest.mark.parametrize("options", list(CONV_OPTIONS), ids=list(CONV_OPTIONS))
def test_clipped_sum_equals_per_patient_autograd_on_convolutions(options: str) -> None:
    gen = torch.Generator().manual_seed(len(options))
    conv = nn.Conv2d(4, 8, **CONV_OPTIONS[options])  # type: ignore[arg-type]
    model = _ConvNet(conv, groups=2, image=(9, 7))
    init_parameters(model, generator=gen)
    model.double()
    x = _spread(torch.randn(11, 4, 9, 7, generator=gen, dtype=torch.float64), gen)
    y = torch.randint(0, 2, (11,), generator=gen).double()
    # GroupNorm takes out the input's scale: clip at the median norm, so that some
    # patients are clipped and some are not.
    _, norms = _reference_clipped_sum(model, x, y, max_norm=C)
    median = float(norms.median())
    _assert_matches(model, x, y, max_norm=median)
    assert (norms > 1.01 * median).any() and (norms < 0.99 * median).any()


def test_frozen_conv_and_group_norm_parameters_are_left_out() -> None:
    gen = torch.Generator().manual_seed(12)
    model = _ConvNet(nn.Conv2d(2, 4, 3, padding=1), groups=2, image=(6, 6))
    init_parameters(model, generator=gen)
    model.double()
    model.conv.weight.requires_grad_(False)
    model.norm.bias.requires_grad_(False)
    model.second.requires_grad_(False)
    x = _spread(torch.randn(9, 2, 6, 6, generator=gen, dtype=torch.float64), gen)
    y = torch.randint(0, 2, (9,), generator=gen).double()
    norms = _assert_matches(model, x, y)
    assert (norms > C).any() and (norms < C).any()
    assert model.conv.weight.grad is None and model.second.weight.grad is None


def _opacus_per_sample_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each patient's gradient norm from Opacus's own per-sample gradients (hooks mode)."""
    from opacus import GradSampleModule

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        loss = F.binary_cross_entropy_with_logits(wrapped(x), y, reduction="sum")
        loss.backward()
        per_sample = torch.cat(
            [
                getattr(p, "grad_sample").reshape(len(x), -1)  # noqa: B009 (set by Opacus)
                for p in model.parameters()
                if p.requires_grad
            ],
            dim=1,
        )
        return per_sample.norm(dim=1)
    finally:
        wrapped._close()


@pytest.mark.parametrize(
    ("name", "image"), [("imaging_cnn", (1, 11, 9)), ("imaging_cnn", (1, 32, 32))]
)
def test_per_patient_norms_equal_opacus_per_sample_gradients(
    name: str, image: tuple[int, int, int]
) -> None:
    gen = torch.Generator().manual_seed(13)
    model = build_model(name, input_dims={"imaging": image}).double()
    x = _spread(torch.randn(7, *image, generator=gen, dtype=torch.float64), gen)
    y = torch.randint(0, 2, (7,), generator=gen).double()
    clipper = BookkeepingClipper(model, max_grad_norm=C)
    clipper.clipped_sum(F.binary_cross_entropy_with_logits(model(x), y, reduction="none"))
    ours = clipper.last_norms
    clipper.remove()
    assert ours is not None
    expected = _opacus_per_sample_norms(model, x, y)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    assert float(expected.max() / expected.min()) > 1.2  # the patients differ


def _fusion_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    ehr = _spread(torch.randn(n, 6, generator=gen, dtype=torch.float64), gen)
    img = _spread(torch.randn(n, 1, 10, 10, generator=gen, dtype=torch.float64), gen)
    gen_x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    mask = (torch.rand(n, 3, generator=gen) < 0.7).double()
    mask[0] = 1.0
    return ehr, img, gen_x, mask


def test_clipped_sum_equals_per_patient_autograd_on_the_registered_cnn_and_fusion() -> None:
    gen = torch.Generator().manual_seed(14)
    cnn = build_model("imaging_cnn", input_dims={"imaging": (1, 10, 10)}).double()
    x = _spread(torch.randn(10, 1, 10, 10, generator=gen, dtype=torch.float64), gen)
    y = torch.randint(0, 2, (10,), generator=gen).double()
    fusion = build_model(
        "fusion", input_dims={"ehr": 6, "imaging": (1, 10, 10), "genomics": 5}
    ).double()
    for model, inputs in ((cnn, x), (fusion, _fusion_batch(10, gen))):
        # Clip at the median norm: some patients are clipped and some are not.
        _, norms = _reference_clipped_sum(model, inputs, y, max_norm=C)
        median = float(norms.median())
        _assert_matches(model, inputs, y, max_norm=median)
        assert (norms > 1.01 * median).any() and (norms < 0.99 * median).any()


def test_an_empty_batch_gives_a_zero_sum_on_the_cnn_and_fusion() -> None:
    """Poisson sampling draws empty batches: the sum is zero (the step is noise alone)."""
    dims = {"ehr": 4, "imaging": (1, 8, 8), "genomics": 3}
    cnn = build_model("imaging_cnn", input_dims={"imaging": (1, 8, 8)})
    fusion = build_model("fusion", input_dims=dims)
    empty = (torch.zeros(0, 4), torch.zeros(0, 1, 8, 8), torch.zeros(0, 3), torch.zeros(0, 3))
    for model, inputs in ((cnn, (empty[1],)), (fusion, empty)):
        flat = _bookkeeping_clipped_sum(model, inputs, torch.zeros(0), max_norm=C)
        assert flat.shape == (sum(p.numel() for p in model.parameters()),)
        assert torch.count_nonzero(flat) == 0


def test_a_patient_whose_conv_gradient_overflows_is_dropped_alone() -> None:
    gen = torch.Generator().manual_seed(15)
    model = _ConvNet(nn.Conv2d(2, 4, 3, padding=1, groups=2), groups=2, image=(6, 5))
    init_parameters(model, generator=gen)
    model.double()
    x = _spread(torch.randn(8, 2, 6, 5, generator=gen, dtype=torch.float64), gen)
    x[3, 1, 2, 2] = 1e300  # finite input, overflowing gradient norm
    y = torch.randint(0, 2, (8,), generator=gen).double()
    expected, norms = _reference_clipped_sum(model, x, y, max_norm=C)
    assert not math.isfinite(float(norms[3])) and torch.isfinite(norms[[0, 1, 2, 4]]).all()
    got = _bookkeeping_clipped_sum(model, x, y, max_norm=C)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=_atol(len(x)))


class _InPlace(nn.Module):
    def __init__(self, changed: str) -> None:
        super().__init__()
        self.changed = changed
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        pooled = h.mean(dim=(2, 3))
        out = self.head(pooled)
        # Changes a captured output, or a captured input, after its layer ran.
        (h if self.changed == "output" else pooled).mul_(2)
        return out.squeeze(-1)


@pytest.mark.parametrize("changed", ["output", "input"])
def test_a_layer_input_or_output_changed_in_place_is_refused(changed: str) -> None:
    model = _InPlace(changed)
    clipper = BookkeepingClipper(model, max_grad_norm=C)
    loss = F.binary_cross_entropy_with_logits(
        model(torch.randn(3, 1, 5, 5)), torch.ones(3), reduction="none"
    )
    with pytest.raises(ConfigError, match="modified in place"):
        clipper.clipped_sum(loss)


def test_a_conv_called_twice_is_refused() -> None:
    conv = nn.Conv2d(2, 2, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv, nn.Flatten(1), nn.Linear(32, 1), nn.Flatten(0))
    clipper = BookkeepingClipper(model, max_grad_norm=C)
    loss = F.binary_cross_entropy_with_logits(
        model(torch.randn(3, 2, 4, 4)), torch.ones(3), reduction="none"
    )
    with pytest.raises(ConfigError, match="once per"):
        clipper.clipped_sum(loss)


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (nn.Conv1d(1, 2, 3), "Conv1d"),
        (nn.Conv3d(1, 2, 3), "Conv3d"),
        (nn.ConvTranspose2d(1, 2, 3), "ConvTranspose2d"),
        (nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), "padding_mode"),
        (nn.Conv2d(1, 2, 3, padding="same"), "padding 'same'"),
        (nn.LayerNorm(4), "LayerNorm"),
        (nn.Embedding(4, 2), "Embedding"),
        (nn.BatchNorm2d(2), "batch statistics"),
        (nn.BatchNorm1d(2).requires_grad_(False), "batch statistics"),
        (nn.ReLU(inplace=True), "inplace"),
    ],
)
def test_check_supported_refuses_what_it_does_not_handle_exactly(
    layer: nn.Module, match: str
) -> None:
    model = nn.Sequential(layer, nn.Flatten(1), nn.Linear(3, 1))
    with pytest.raises(ConfigError, match=match):
        check_supported(model)


def test_the_cnn_trains_by_bookkeeping_through_make_private_with_empty_poisson_batches() -> None:
    """The fit loop steps every Poisson batch, empty ones included; the accountant counts
    the same mechanism as Opacus's hooks set-up."""
    data = TensorDataset(
        torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(1)), torch.ones(3)
    )
    seen: dict[str, object] = {}
    for mode in ("bookkeeping", "hooks"):
        model = build_model("imaging_cnn", input_dims={"imaging": (1, 6, 6)})
        private = _private(model, data, mode, sigma=1.3, batch=2)
        assert private.grad_sample_mode == mode
        sizes: list[int] = []

        for _ in range(12):
            stats = fit(
                private.model,
                _recording(private.loader, sizes),
                optimizer=private.optimizer,
                criterion=private.criterion,
                epochs=1,
                device=torch.device("cpu"),
            )
            assert stats.steps == 2
        assert all(torch.isfinite(p).all() for p in model.parameters())
        if mode == "bookkeeping":
            assert 0 in sizes and max(sizes) > 0  # empty Poisson batches were stepped too
        seen[mode] = private.accountant.history
    assert seen["bookkeeping"] == seen["hooks"] == [(1.3, 0.5, 24)]


def test_a_reparametrised_linear_is_refused_not_trained_wrongly() -> None:
    # torch's old weight_norm keeps weight_g and weight_v and recomputes ``weight`` each
    # forward: a clipped sum written into ``weight.grad`` would be thrown away, and only
    # the bias would train. The new parametrization changes the layer's type. Both: hooks.
    from torch.nn.utils import parametrizations

    from fedcare.client.bookkeeping import is_supported

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = nn.utils.weight_norm(nn.Linear(4, 3))
    assert not is_supported(nn.Sequential(old))
    assert not is_supported(nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 3))))
    assert is_supported(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1)))


def test_mixed_dtypes_and_keyword_inputs_are_refused_with_a_config_error() -> None:
    # One flat buffer cannot hold float32 and float64 gradients; a layer called as
    # ``fc(input=x)`` hands its forward hook no positional input.
    from fedcare.client.bookkeeping import is_supported

    assert not is_supported(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1).double()))

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(input=x).squeeze(1)

    model = Keyword()
    clip = BookkeepingClipper(model, max_grad_norm=1.0)
    try:
        with pytest.raises(ConfigError, match="positional"):
            model(torch.randn(4, 3))
    finally:
        clip.remove()
