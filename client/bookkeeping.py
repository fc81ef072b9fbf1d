"""Book-keeping DP-SGD: per-sample clipping in one backward pass, without Opacus's hooks.

Opacus's ghost clipping (``grad_sample_mode="ghost"``) runs two backward passes: the first
with norm hooks (each patient's gradient norm from the layer's activations and output
gradients), the second of the loss re-weighted by each patient's clip factor, which
autograd turns into the clipped sum. Its per-sample hooks (``"hooks"``) keep every
patient's gradient and clip in the optimizer. For the layers fedcare's models are made of,
the clipped sum needs nothing one backward pass has not already seen. For ``nn.Linear``,
``y = a W^T + b``::

    sum_i c_i grad_W(loss_i) = sum_i c_i g_i^T a_i        sum_i c_i grad_b(loss_i) = sum_i c_i g_i 1

with ``a_i`` patient ``i``'s input to the layer, ``g_i`` the gradient of ``loss_i`` at its
output (summed over sequence positions where the layer sees ``(B, L, k)`` inputs), and
``c_i = min(1, C / (||grad(loss_i)|| + 1e-6))``, Opacus's clip factor. Book-Keeping DP
(Bu et al., ICML 2023) forms it that way; so does this module, in fedcare's mode
``"bookkeeping"``:

1. a forward hook on every trainable supported layer keeps its input (detached) and its
   output;
2. one backward pass, :func:`torch.autograd.grad` of the summed per-patient losses with
   respect to those outputs only: no parameter gradient is formed by autograd;
3. each patient's squared gradient norm per layer, summed over layers, by the layer's rule
   (:data:`LAYER_RULES`):

   - ``nn.Linear``: on ``(B, k)`` inputs the ghost-norm formula ``||g_i||^2 ||a_i||^2``
     as two dot products, no per-sample gradient formed; on sequences each patient's
     weight gradient ``g_i^T a_i`` (:meth:`LinearRule.squared_norms`: Opacus's Gram-matrix
     ghost norm can be cancelled in floating point by crafted weights);
   - ``nn.Conv2d`` (any stride, integer padding, dilation, groups; zero padding mode): each
     patient's kernel gradient ``g_i unfold(a_i)^T`` (:func:`_kernel_grads`: a batched
     product over a strided view of the input windows, or torch's weight gradient of the
     convolution with the patients as extra groups; the kernels of fedcare's CNN hold a few
     thousand weights, so these are small), and its bias gradient ``g_i`` summed over
     positions;
   - ``nn.GroupNorm``: each patient's affine gradients, ``sum over positions of
     normalize(a_i) * g_i`` (weight) and of ``g_i`` (bias), ``normalize`` being the layer's
     own group normalisation without its affine part;

4. Opacus's clip factor, then each layer's clipped sum (``(c * g)^T a`` for a linear layer,
   ``sum_i c_i G_i`` over the per-patient gradients ``G_i`` of the others) written into
   one flat buffer whose slices are the parameters' ``.grad``;
5. :class:`DPOptimizerBookkeeping` (Opacus's fast-gradient-clipping optimizer, taking that
   buffer without a copy) adds Opacus's Gaussian noise (``_generate_noise``, standard
   deviation ``noise_multiplier * max_grad_norm``) once to the whole buffer, divides by the
   expected batch size, and steps; Opacus's accountant hook counts the step as before.

It applies only where :func:`check_supported` finds every trainable parameter in one layer
of a type above (with options its rule handles exactly), no batch-norm layer (it mixes the
patients of a batch) and no in-place activation; at run time a layer called twice in one
forward pass, or a layer's input or output changed in place after the layer ran, is
refused too (Opacus's module validator has already refused batch norm and the like). An
empty (Poisson) batch gives a zero sum.

A patient whose gradient norm is not finite (weights crafted to overflow on them) gets clip
factor 0, and that patient's activations, output gradients and per-sample gradients are
zeroed before the sum: their contribution is dropped, the round goes on, and nothing tells
the sender which patient overflowed. Each patient's contribution still depends on that
patient only and has norm at most ``C``, so the sensitivity bound of DP-SGD holds.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, cast

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _generate_noise
from torch import nn
from torch.nn import functional as F
from torch.nn.grad import conv2d_weight

from fedcare.common.errors import ConfigError

__all__ = [
    "BOOKKEEPING",
    "LAYER_RULES",
    "LayerRule",
    "check_supported",
    "is_supported",
    "BookkeepingClipper",
    "DPOptimizerBookkeeping",
    "BookkeepingLoss",
    "BookkeepingTensor",
    "wrap_bookkeeping",
]

#: The grad-sample mode name fedcare gives this mechanism (``DPConfig.grad_sample_mode``).
BOOKKEEPING = "bookkeeping"
#: Where a module keeps its clipper (so that a second one replaces the first).
_ATTRIBUTE = "_fedcare_bookkeeping_clipper"


def _trains(param: torch.Tensor | None) -> bool:
    return param is not None and param.requires_grad


class LayerRule:
    """How one layer type gives each patient's gradient norm and the clipped sum.

    A rule sees the layer's detached input ``a`` and the gradient ``g`` of the summed
    per-patient losses at its output (batch first), from the one backward pass.
    """

    #: The layer type the rule handles (exactly this type, not subclasses).
    layer_type: ClassVar[type[nn.Module]]

    def refusal(self, layer: Any) -> str | None:
        """Why ``layer``'s options are not handled exactly (``None``: they are)."""
        return None

    def squared_norms(
        self, layer: Any, a: torch.Tensor, g: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        """Each patient's squared gradient norm in ``layer`` (trainable parameters only),
        and what :meth:`add_clipped_sum` needs."""
        raise NotImplementedError

    def add_clipped_sum(
        self, layer: Any, state: Any, coef: torch.Tensor, keep: torch.Tensor | None
    ) -> None:
        """Write ``sum_i coef_i grad_i`` into the ``.grad`` of ``layer``'s trainable
        parameters; ``keep`` (where given) is ``False`` for patients to leave out whole."""
        raise NotImplementedError


def _zero_dropped(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``t`` with the rows of the patients ``keep`` leaves out set to zero."""
    if keep is None:
        return t
    return torch.where(keep.view((-1,) + (1,) * (t.dim() - 1)), t, torch.zeros_like(t))


def _add_per_sample(
    layer: Any,
    per_sample: tuple[torch.Tensor | None, torch.Tensor | None],
    coef: torch.Tensor,
    keep: torch.Tensor | None,
) -> None:
    """``.grad = sum_i coef_i G_i`` for the layer's ``(weight, bias)`` from each patient's
    gradients ``G`` (``(B, numel)``, ``None`` where not trained): one matrix-vector product
    each, written into the flat buffer's slice."""
    for param, grads in zip((layer.weight, layer.bias), per_sample, strict=True):
        if grads is not None:
            torch.mv(_zero_dropped(grads, keep).t(), coef, out=param.grad.view(-1))


class LinearRule(LayerRule):
    """``nn.Linear`` on ``(B, k)`` inputs (ghost norms) or ``(B, ..., k)`` inputs (each
    patient's gradient)."""

    layer_type = nn.Linear

    def squared_norms(
        self, layer: nn.Linear, a: torch.Tensor, g: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        """For ``(B, k)`` inputs Opacus's ghost-norm formula for ``nn.Linear``,
        ``||g_i||^2 ||a_i||^2`` for the weight plus ``||g_i||^2`` for the bias, in two dot
        products (Opacus's sampler spends about five times as long on its einsums and square
        roots, measured at batch 256).

        For sequence inputs ``(B, L, k)`` (positions summed), each patient's weight gradient
        ``g_i^T a_i``, as the convolutions do: the norm is then that of the very vector the
        clipped sum adds. Opacus's ghost-norm formula (``<g_i g_i^T, a_i a_i^T>``, two
        ``L x L`` Gram matrices) is a sum of large terms of both signs: weights crafted so
        that they cancel in floating point give a norm of ~0 for a patient whose gradient
        is huge, who would then pass unclipped (``tests/security/test_bookkeeping_conv.py``
        ``test_a_sequence_linear_gram_cancellation_cannot_pass_a_patient_unclipped``).
        """
        if g.dim() == 2:
            gg = torch.linalg.vecdot(g, g)
            if not layer.weight.requires_grad:
                return gg, ("ghost", a, g)  # the bias alone is trained
            out = gg * torch.linalg.vecdot(a, a)
            return (out + gg if _trains(layer.bias) else out), ("ghost", a, g)
        sa, sg = (a.flatten(1, -2), g.flatten(1, -2)) if g.dim() > 3 else (a, g)
        weight = (
            torch.bmm(sg.transpose(1, 2), sa).flatten(1) if layer.weight.requires_grad else None
        )
        bias = sg.sum(dim=1) if _trains(layer.bias) else None
        squared = sum(torch.linalg.vecdot(t, t) for t in (weight, bias) if t is not None)
        return squared, ("per_sample", weight, bias)  # type: ignore[return-value]

    def add_clipped_sum(
        self,
        layer: nn.Linear,
        state: tuple[str, Any, Any],
        coef: torch.Tensor,
        keep: torch.Tensor | None,
    ) -> None:
        kind, first, second = state
        if kind == "per_sample":
            _add_per_sample(layer, (first, second), coef, keep)
            return
        a, g = _zero_dropped(first, keep), _zero_dropped(second, keep)
        cg = (g * coef.view((-1,) + (1,) * (g.dim() - 1))).reshape(-1, g.shape[-1])
        if layer.weight.requires_grad:
            torch.mm(cg.t(), a.reshape(-1, a.shape[-1]), out=layer.weight.grad)
        if _trains(layer.bias):
            torch.sum(cg, dim=0, out=layer.bias.grad)


class _PerSampleRule(LayerRule):
    """A rule that forms each patient's gradient of the layer (``(B, numel)`` per
    parameter): the clipped sum is one matrix-vector product with the clip factors."""

    def add_clipped_sum(
        self,
        layer: Any,
        state: tuple[torch.Tensor | None, torch.Tensor | None],
        coef: torch.Tensor,
        keep: torch.Tensor | None,
    ) -> None:
        _add_per_sample(layer, state, coef, keep)


def _windows(layer: nn.Conv2d, a: torch.Tensor, positions: int) -> torch.Tensor:
    """The input window each output position of ``layer`` reads, per patient:
    ``(B, groups, C/groups * kh * kw, positions)``, laid out as the kernel is.

    What ``F.unfold`` gives, from a strided view of the zero-padded input (copied once by
    the reshape): three to five times faster than ``F.unfold`` on fedcare's CNN.
    """
    (kh, kw), (dh, dw), (sh, sw) = layer.kernel_size, layer.dilation, layer.stride
    ph, pw = cast(tuple[int, int], layer.padding)  # integers (check_supported)
    padded = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
    rows = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    cols = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    if rows * cols != positions:
        raise RuntimeError(f"{layer}: {rows}x{cols} windows for {positions} output positions")
    b, c, h, w = padded.stride()
    view = padded.as_strided(
        (padded.shape[0], padded.shape[1], kh, kw, rows, cols),
        (b, c, h * dh, w * dw, h * sh, w * sw),
    )
    return view.reshape(padded.shape[0], layer.groups, -1, positions)


def _kernel_grads(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each patient's gradient of ``layer.weight``, ``(B, weight.numel())``.

    ``g`` is the gradient at the layer's output, ``(B, out, rows, cols)``. With one input
    channel per group (the first layer of an image model, depthwise layers) the kernel
    gradient is ``g_i windows(a_i)^T``, one batched product over each patient's input
    windows; with more, torch's weight gradient of the same convolution run with the
    patients as extra groups (``B * groups`` groups, so each patient's kernel gradient
    stays apart), which was faster there on this CPU (and the other way round with one).
    """
    batch, groups = g.shape[0], layer.groups
    if layer.in_channels == groups:
        positions = g.shape[2] * g.shape[3]
        cols = _windows(layer, a, positions)  # (B, G, kh * kw, L)
        per_group = g.reshape(batch, groups, -1, positions)  # (B, G, out/G, L)
        return torch.matmul(per_group, cols.transpose(-1, -2)).reshape(batch, -1)
    out_channels, per_group_in, kh, kw = layer.weight.shape
    grads = conv2d_weight(
        a.reshape(1, -1, *a.shape[2:]),
        (batch * out_channels, per_group_in, kh, kw),
        g.reshape(1, -1, *g.shape[2:]),
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=batch * layer.groups,
    )
    return grads.reshape(batch, -1)


class Conv2dRule(_PerSampleRule):
    """``nn.Conv2d``: per-patient kernel gradients (:func:`_kernel_grads`)."""

    layer_type = nn.Conv2d

    def refusal(self, layer: nn.Conv2d) -> str | None:
        if layer.padding_mode != "zeros":
            return f"padding_mode {layer.padding_mode!r} (only 'zeros' is handled)"
        if isinstance(layer.padding, str):
            return f"padding {layer.padding!r} (give the padding as integers)"
        return None

    def squared_norms(
        self, layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        batch = g.shape[0]
        weight = bias = None
        squared = torch.zeros(batch, dtype=g.dtype, device=g.device)
        if layer.weight.requires_grad:
            weight = _kernel_grads(layer, a, g)
            squared = squared + torch.linalg.vecdot(weight, weight)
        if _trains(layer.bias):
            bias = g.sum(dim=(2, 3))
            squared = squared + torch.linalg.vecdot(bias, bias)
        return squared, (weight, bias)


class GroupNormRule(_PerSampleRule):
    """``nn.GroupNorm``: per-patient affine gradients from the re-normalised input."""

    layer_type = nn.GroupNorm

    def squared_norms(
        self, layer: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        batch = g.shape[0]
        g = g.reshape(batch, layer.num_channels, -1)
        weight = bias = None
        squared = torch.zeros(batch, dtype=g.dtype, device=g.device)
        if _trains(layer.weight):
            normalized = F.group_norm(a, layer.num_groups, eps=layer.eps)
            weight = torch.linalg.vecdot(normalized.reshape(batch, layer.num_channels, -1), g)
            squared = squared + torch.linalg.vecdot(weight, weight)
        if _trains(layer.bias):
            bias = g.sum(dim=-1)
            squared = squared + torch.linalg.vecdot(bias, bias)
        return squared, (weight, bias)


#: The layer types bookkeeping handles, each with its rule (exact types: a subclass may
#: change the forward pass, so it is refused).
LAYER_RULES: dict[type[nn.Module], LayerRule] = {
    rule.layer_type: rule for rule in (LinearRule(), Conv2dRule(), GroupNormRule())
}
_NAMES = ", ".join(f"nn.{t.__name__}" for t in LAYER_RULES)


def check_supported(module: nn.Module) -> None:
    """Refuse a module the one-backward clipping cannot handle exactly.

    Every trainable parameter must be a parameter of one layer whose exact type has a rule
    in :data:`LAYER_RULES` (``nn.Linear``, ``nn.Conv2d``, ``nn.GroupNorm``), with options
    the rule handles: a parameter two layers share (tied weights) would get one layer's
    clipped sum written over the other's, and its per-patient norm would miss the cross
    terms. A batch-norm layer, even frozen, mixes the patients of a batch; an in-place
    activation would change a layer's captured output after the layer ran.

    Raises
    ------
    ConfigError
        Naming the first layer that is not, and what to use instead.
    """
    dtypes = {p.dtype for p in module.parameters() if p.requires_grad}
    if len(dtypes) > 1:
        raise ConfigError(
            f"grad_sample_mode 'bookkeeping' sums every gradient into one buffer, but the "
            f"trainable parameters mix {sorted(str(d) for d in dtypes)}; use one dtype or 'hooks'"
        )
    owner: dict[int, str] = {}
    for name, sub in module.named_modules():
        label = name or "the model"
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(
                f"grad_sample_mode 'bookkeeping' cannot train {label} ({type(sub).__name__}): "
                "batch statistics mix the patients of a batch; use GroupNorm"
            )
        if getattr(sub, "inplace", False) is True:
            raise ConfigError(
                f"grad_sample_mode 'bookkeeping' needs out-of-place activations, but {label} "
                f"({type(sub).__name__}) has inplace=True; set inplace=False or use 'hooks'"
            )
        own = [p for p in sub.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        rule = LAYER_RULES.get(type(sub))
        if rule is None:
            raise ConfigError(
                f"grad_sample_mode 'bookkeeping' needs every trainable layer to be one of "
                f"{_NAMES}, but {label} is {type(sub).__name__}; use 'auto', 'ghost' or "
                "'hooks' for this model"
            )
        names = {n for n, _ in sub.named_parameters(recurse=False)}
        if not names <= {"weight", "bias"}:
            raise ConfigError(
                f"grad_sample_mode 'bookkeeping' needs {label} to hold its own weight and "
                f"bias, but it has {sorted(names)} (a reparametrised layer, e.g. weight_norm); "
                "use 'hooks' for this model"
            )
        reason = rule.refusal(sub)
        if reason is not None:
            raise ConfigError(
                f"grad_sample_mode 'bookkeeping' cannot train {label} with {reason}; use "
                "'hooks' for this model"
            )
        for p in own:
            if id(p) in owner:
                raise ConfigError(
                    f"grad_sample_mode 'bookkeeping' needs each trainable parameter in one "
                    f"layer, but {label} shares one with {owner[id(p)]}; use 'hooks' for "
                    "this model"
                )
            owner[id(p)] = label


def is_supported(module: nn.Module) -> bool:
    """Whether :func:`check_supported` accepts ``module``."""
    try:
        check_supported(module)
    except ConfigError:
        return False
    return True


class BookkeepingClipper:
    """Forward hooks on a module's supported layers and the one-backward clipped sum.

    Parameters
    ----------
    module:
        The user's module (checked with :func:`check_supported`).
    max_grad_norm:
        ``C``, the per-patient clipping norm.
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float) -> None:
        check_supported(module)
        self.max_grad_norm = float(max_grad_norm)
        #: The last step's per-patient gradient norms (before clipping; not finite for a
        #: patient left out), for inspection.
        self.last_norms: torch.Tensor | None = None
        self.params: list[nn.Parameter] = [p for p in module.parameters() if p.requires_grad]
        # (layer, its rule, its input, its output, their versions when captured)
        self._captured: list[
            tuple[nn.Module, LayerRule, torch.Tensor, torch.Tensor, tuple[int, int]]
        ] = []
        # Where each parameter's gradient lies in the flat buffer.
        self._slices: list[tuple[nn.Parameter, int, int, torch.Size]] = []
        offset = 0
        for p in self.params:
            self._slices.append((p, offset, offset + p.numel(), p.shape))
            offset += p.numel()
        self.numel = offset
        # One clipper per module: a new one (a later round on the same module) replaces it.
        previous = module.__dict__.get(_ATTRIBUTE)
        if isinstance(previous, BookkeepingClipper):
            previous.remove()
        module.__dict__[_ATTRIBUTE] = self
        self._module = module
        self._rules = {
            m: LAYER_RULES[type(m)]
            for m in module.modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))
        }
        # Each forward pass starts afresh: a forward that no backward followed (the module
        # used outside DP-SGD) keeps nothing alive.
        self._handles = [module.register_forward_pre_hook(self._start)]
        self._handles += [m.register_forward_hook(self._capture) for m in self._rules]

    def _start(self, _module: nn.Module, _inputs: tuple[Any, ...]) -> None:
        self._captured = []

    def _capture(
        self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> None:
        if layer.training and torch.is_grad_enabled() and output.requires_grad:
            if not inputs:
                raise ConfigError(
                    f"grad_sample_mode 'bookkeeping' needs {layer} called with its input as "
                    "a positional argument (not input=...); use 'hooks' for this model"
                )
            versions = (inputs[0]._version, output._version)
            self._captured.append((layer, self._rules[layer], inputs[0].detach(), output, versions))

    def remove(self) -> None:
        """Remove the hooks (the module trains without DP again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._captured = []
        if self._module.__dict__.get(_ATTRIBUTE) is self:
            del self._module.__dict__[_ATTRIBUTE]

    def clipped_sum(self, loss_per_sample: torch.Tensor) -> torch.Tensor:
        """One backward pass: ``sum_i c_i grad(loss_i)`` as one flat tensor, in parameter order.

        Each parameter's ``.grad`` is set to its slice of the returned tensor.
        """
        captured, self._captured = self._captured, []
        self.last_norms = None
        seen: set[int] = set()
        for layer, _, activation, output, versions in captured:
            if id(layer) in seen:
                raise ConfigError(
                    f"grad_sample_mode 'bookkeeping' needs every layer called once per "
                    f"forward pass, but {layer} ran twice (shared weights); use 'hooks'"
                )
            seen.add(id(layer))
            if output.shape[0] != loss_per_sample.shape[0]:
                raise ConfigError(
                    f"grad_sample_mode 'bookkeeping' needs each layer's first dimension to "
                    f"be the batch's patients, but {layer} saw {output.shape[0]} rows for "
                    f"{loss_per_sample.shape[0]} patients (a patient's slices or positions "
                    "folded into the batch would be clipped one by one); keep the patients "
                    "in the first dimension"
                )
            if (activation._version, output._version) != versions:
                raise ConfigError(
                    f"grad_sample_mode 'bookkeeping' needs each layer's input and output "
                    f"unchanged after it ran, but one of {layer} was modified in place; use "
                    "'hooks'"
                )
        flat = torch.zeros(self.numel, dtype=self.params[0].dtype, device=self.params[0].device)
        for p, start, stop, shape in self._slices:
            p.grad = flat[start:stop].view(shape)
        if not captured or loss_per_sample.shape[0] == 0:
            return flat  # an empty (Poisson) batch: nothing to sum, the step is noise alone
        backprops = torch.autograd.grad(
            loss_per_sample.sum(), [c[3] for c in captured], allow_unused=True
        )
        states: list[tuple[nn.Module, LayerRule, Any]] = []
        squared: torch.Tensor | None = None
        for (layer, rule, activation, output, _), backprop in zip(captured, backprops, strict=True):
            g = torch.zeros_like(output) if backprop is None else backprop.detach()
            a = activation if activation.dtype == g.dtype else activation.to(g.dtype)
            layer_squared, state = rule.squared_norms(layer, a, g)
            squared = layer_squared if squared is None else squared + layer_squared
            states.append((layer, rule, state))
        assert squared is not None
        norms = squared.sqrt()
        self.last_norms = norms
        # Opacus's clip factor (GradSampleHooksFastGradientClipping.get_clipping_coef).
        coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        finite = torch.isfinite(norms)
        keep: torch.Tensor | None = None
        if not bool(finite.all()):
            keep = finite
            coef = torch.where(finite, coef, torch.zeros_like(coef))
        for layer, rule, state in states:
            rule.add_clipped_sum(layer, state, coef, keep)
        return flat


class DPOptimizerBookkeeping(DPOptimizerFastGradientClipping):
    """Opacus's fast-gradient-clipping optimizer, given the clipped sum as one flat buffer.

    Opacus's version deep-copies every ``p.grad`` into ``p.summed_grad``, then draws, adds
    and scales noise parameter by parameter. Here the buffer :meth:`BookkeepingClipper.
    clipped_sum` wrote this step (the parameters' ``.grad`` are its slices) is taken as the
    summed gradient without a copy, and Opacus's ``_generate_noise`` draws the noise for the
    whole buffer at once: the same Gaussian, standard deviation ``noise_multiplier *
    max_grad_norm`` per coordinate, then the same division by the expected batch size.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
    ) -> None:
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=generator,
            secure_mode=secure_mode,
        )
        self._flat: torch.Tensor | None = None
        self._noised = False

    def take_clipped_sum(self, flat: torch.Tensor) -> None:
        """The step's clipped gradient sum (its slices are already the ``.grad``)."""
        self._flat, self._noised = flat, False

    def accumulate(self) -> None:
        """Nothing to copy: the clipped sum is this step's own buffer."""
        if self._flat is None:
            raise RuntimeError(
                "DPOptimizerBookkeeping.step() without a clipped sum: call backward() on the "
                "loss of the bookkeeping criterion first"
            )

    def add_noise(self) -> None:
        """Opacus's Gaussian noise, ``std = noise_multiplier * max_grad_norm``, once."""
        assert self._flat is not None
        if self._noised:
            raise RuntimeError("noise was already added to this step's gradient")
        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        self._flat.add_(
            _generate_noise(
                std=multiplier * self.max_grad_norm,
                reference=self._flat,
                generator=self.generator,
                secure_mode=self.secure_mode,
            )
        )
        self._noised = True

    def scale_grad(self) -> None:
        """Divide by the expected batch size (``loss_reduction="mean"``)."""
        assert self._flat is not None
        self._flat.div_(self.expected_batch_size * self.accumulated_iterations)

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Forget this step's buffer and clear ``.grad`` (no ``summed_grad`` is ever kept)."""
        self._flat = None
        self.original_optimizer.zero_grad(set_to_none)


class BookkeepingTensor:
    """The loss of one batch; ``backward()`` is the one-backward clipped sum."""

    def __init__(self, loss: BookkeepingLoss, loss_per_sample: torch.Tensor) -> None:
        self._owner = loss
        self.loss_per_sample = loss_per_sample

    def detach(self) -> torch.Tensor:
        """The batch's mean loss (what ``fit`` reports)."""
        return self.loss_per_sample.detach().mean()

    def item(self) -> float:
        return float(self.detach().item())

    def backward(self) -> None:
        """Clip every patient's gradient and sum, in one backward pass; hand it to the
        optimizer, which adds the noise at its step."""
        flat = self._owner.clipper.clipped_sum(self.loss_per_sample)
        self._owner.optimizer.take_clipped_sum(flat)


class BookkeepingLoss:
    """The criterion of mode ``"bookkeeping"``: per-patient losses, clipped at ``backward``.

    Parameters
    ----------
    criterion:
        The task's loss with a ``reduction`` attribute (set to ``"none"`` while it runs).
    clipper, optimizer:
        The module's :class:`BookkeepingClipper` and the :class:`DPOptimizerBookkeeping`.
    """

    def __init__(
        self,
        criterion: nn.Module,
        *,
        clipper: BookkeepingClipper,
        optimizer: DPOptimizerBookkeeping,
    ) -> None:
        if not hasattr(criterion, "reduction"):
            raise ConfigError(
                f"grad_sample_mode 'bookkeeping' needs a loss with a 'reduction' attribute; "
                f"{type(criterion).__name__} has none"
            )
        ids = {id(p) for p in clipper.params}
        if ids != {id(p) for p in optimizer.params}:
            raise ConfigError(
                "the optimizer must hold exactly the model's trainable parameters for "
                "grad_sample_mode 'bookkeeping'"
            )
        self.criterion: Any = criterion  # its `reduction` is switched while it runs
        self.clipper = clipper
        self.optimizer = optimizer

    def __call__(self, *args: Any, **kwargs: Any) -> BookkeepingTensor:
        old = self.criterion.reduction
        self.criterion.reduction = "none"
        try:
            per_sample = self.criterion(*args, **kwargs)
        finally:
            self.criterion.reduction = old
        if per_sample.dim() != 1:
            raise ConfigError(
                f"grad_sample_mode 'bookkeeping' needs one loss per patient, got shape "
                f"{tuple(per_sample.shape)}"
            )
        return BookkeepingTensor(self, per_sample)


def wrap_bookkeeping(
    *,
    module: nn.Module,
    optimizer: DPOptimizerFastGradientClipping,
    criterion: nn.Module,
    max_grad_norm: float,
) -> tuple[DPOptimizerBookkeeping, BookkeepingLoss]:
    """Turn Opacus's ghost-clipping optimizer into the bookkeeping one, criterion included.

    ``optimizer`` is what ``PrivacyEngine.make_private(..., grad_sample_mode="ghost")``
    returned: its noise multiplier, clipping norm, expected batch size, noise generator and
    accountant hook (the same sample rate) carry over unchanged.
    """
    clipper = BookkeepingClipper(module, max_grad_norm=max_grad_norm)
    if not math.isclose(optimizer.max_grad_norm, max_grad_norm):
        raise ConfigError("the clipping norm differs from the optimizer's")
    dp_optimizer = DPOptimizerBookkeeping(
        optimizer.original_optimizer,
        noise_multiplier=optimizer.noise_multiplier,
        max_grad_norm=optimizer.max_grad_norm,
        expected_batch_size=optimizer.expected_batch_size,
        generator=optimizer.generator,
        secure_mode=optimizer.secure_mode,
    )
    if optimizer.step_hook is not None:
        dp_optimizer.attach_step_hook(optimizer.step_hook)
    return dp_optimizer, BookkeepingLoss(criterion, clipper=clipper, optimizer=dp_optimizer)
