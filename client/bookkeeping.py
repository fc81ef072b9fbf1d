"""Book-keeping DP-SGD: per-sample clipping of an all-``nn.Linear`` model in one backward pass.

Opacus's ghost clipping (``grad_sample_mode="ghost"``) runs two backward passes: the first
with norm hooks (each patient's gradient norm from the layer's activations and output
gradients, never the gradient itself), the second of the loss re-weighted by each patient's
clip factor, which autograd turns into the clipped sum. For a layer ``y = a W^T + b`` the
clipped sum needs nothing the first pass has not already seen::

    sum_i c_i grad_W(loss_i) = sum_i c_i g_i^T a_i        sum_i c_i grad_b(loss_i) = sum_i c_i g_i 1

with ``a_i`` patient ``i``'s input to the layer, ``g_i`` the gradient of ``loss_i`` at its
output (summed over sequence positions where the layer sees ``(B, L, k)`` inputs), and
``c_i = min(1, C / (||grad(loss_i)|| + 1e-6))``, Opacus's clip factor. Book-Keeping DP
(Bu et al., ICML 2023) forms it that way; so does this module, in fedcare's mode
``"bookkeeping"``:

1. a forward hook on every ``nn.Linear`` keeps its input (detached) and its output;
2. one backward pass, :func:`torch.autograd.grad` of the summed per-patient losses with
   respect to those outputs only: no parameter gradient is formed by autograd;
3. each patient's gradient norm by Opacus's ghost-norm formula for ``nn.Linear``: its own
   sampler (``GradSampleModuleFastGradientClipping.NORM_SAMPLERS``) for sequence inputs,
   the same formula as two dot products for ``(B, k)`` inputs; squared, summed over layers;
4. Opacus's clip factor, then each layer's clipped sum ``(c * g)^T a`` written into one flat
   buffer whose slices are the parameters' ``.grad``;
5. :class:`DPOptimizerBookkeeping` (Opacus's fast-gradient-clipping optimizer, taking that
   buffer without a copy) adds Opacus's Gaussian noise (``_generate_noise``, standard
   deviation ``noise_multiplier * max_grad_norm``) once to the whole buffer, divides by the
   expected batch size, and steps; Opacus's accountant hook counts the step as before.

It applies only where every trainable parameter belongs to an ``nn.Linear`` called once per
forward pass and nothing mixes the patients of a batch (:func:`check_supported`; Opacus's
module validator has already refused batch norm and the like).

A patient whose gradient norm is not finite (weights crafted to overflow on them) gets clip
factor 0, and that patient's activations and output gradients are zeroed before the sum:
their contribution is dropped, the round goes on, and nothing tells the sender which
patient overflowed. Each patient's contribution still depends on that patient only and
has norm at most ``C``, so the sensitivity bound of DP-SGD holds.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _generate_noise
from torch import nn

from fedcare.common.errors import ConfigError

__all__ = [
    "BOOKKEEPING",
    "check_supported",
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


def check_supported(module: nn.Module) -> None:
    """Refuse a module the one-backward clipping cannot handle exactly.

    Every trainable parameter must be the ``weight`` or ``bias`` of one ``nn.Linear``: a
    parameter two layers share (tied weights) would get one layer's clipped sum written over
    the other's, and its per-patient norm would miss the cross terms.

    Raises
    ------
    ConfigError
        Naming the first layer that is not, and what to use instead.
    """
    owner: dict[int, str] = {}
    for name, sub in module.named_modules():
        own = [p for p in sub.parameters(recurse=False) if p.requires_grad]
        if own and type(sub) is not nn.Linear:
            raise ConfigError(
                f"grad_sample_mode 'bookkeeping' needs every trainable layer to be nn.Linear, "
                f"but {name or 'the model'} is {type(sub).__name__}; use 'auto', 'ghost' or "
                "'hooks' for this model"
            )
        for p in own:
            if id(p) in owner:
                raise ConfigError(
                    f"grad_sample_mode 'bookkeeping' needs each trainable parameter in one "
                    f"layer, but {name or 'the model'} shares one with {owner[id(p)]}; use "
                    "'hooks' for this model"
                )
            owner[id(p)] = name or "the model"


class BookkeepingClipper:
    """Forward hooks on a module's ``nn.Linear`` layers and the one-backward clipped sum.

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
        self.params: list[nn.Parameter] = [p for p in module.parameters() if p.requires_grad]
        self._norm_sampler = GradSampleModuleFastGradientClipping.NORM_SAMPLERS[nn.Linear]
        self._captured: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
        # Where each parameter's gradient lies in the flat buffer.
        self._slices: dict[int, tuple[int, torch.Size]] = {}
        offset = 0
        for p in self.params:
            self._slices[id(p)] = (offset, p.shape)
            offset += p.numel()
        self.numel = offset
        # One clipper per module: a new one (a later round on the same module) replaces it.
        previous = module.__dict__.get(_ATTRIBUTE)
        if isinstance(previous, BookkeepingClipper):
            previous.remove()
        module.__dict__[_ATTRIBUTE] = self
        self._module = module
        layers = [
            m
            for m in module.modules()
            if type(m) is nn.Linear and any(p.requires_grad for p in m.parameters())
        ]
        # Each forward pass starts afresh: a forward that no backward followed (the module
        # used outside DP-SGD) keeps nothing alive.
        self._handles = [module.register_forward_pre_hook(self._start)]
        self._handles += [m.register_forward_hook(self._capture) for m in layers]

    def _start(self, _module: nn.Module, _inputs: tuple[Any, ...]) -> None:
        self._captured = []

    def _capture(
        self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> None:
        if layer.training and torch.is_grad_enabled() and output.requires_grad:
            self._captured.append((layer, inputs[0].detach(), output))  # type: ignore[arg-type]

    def remove(self) -> None:
        """Remove the hooks (the module trains without DP again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._captured = []
        if self._module.__dict__.get(_ATTRIBUTE) is self:
            del self._module.__dict__[_ATTRIBUTE]

    def _squared_norms(self, layer: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Each patient's squared gradient norm in ``layer`` (weight and bias together).

        For ``(B, k)`` inputs this is Opacus's ghost-norm formula for ``nn.Linear``,
        ``||g_i||^2 ||a_i||^2`` for the weight plus ``||g_i||^2`` for the bias, in two dot
        products (Opacus's sampler spends about five times as long on its einsums and square
        roots, measured at batch 256). For sequence inputs ``(B, L, k)`` it is Opacus's norm
        sampler itself (``<g_i g_i^T, a_i a_i^T>``, positions summed), squared.
        """
        if g.dim() == 2:
            gg = torch.linalg.vecdot(g, g)
            if not layer.weight.requires_grad:
                return gg  # the bias alone is trained (a layer with neither has no hook)
            out = gg * torch.linalg.vecdot(a, a)
            return out + gg if layer.bias is not None and layer.bias.requires_grad else out
        if g.dim() > 3:  # (B, ..., k): every position of the middle dimensions
            a, g = a.flatten(1, -2), g.flatten(1, -2)
        total: torch.Tensor | None = None
        for norm in self._norm_sampler(layer, [a], g).values():
            total = norm.square() if total is None else total + norm.square()
        assert total is not None
        return total

    def clipped_sum(self, loss_per_sample: torch.Tensor) -> torch.Tensor:
        """One backward pass: ``sum_i c_i grad(loss_i)`` as one flat tensor, in parameter order.

        Each parameter's ``.grad`` is set to its slice of the returned tensor.
        """
        captured, self._captured = self._captured, []
        seen: set[int] = set()
        for layer, _, _ in captured:
            if id(layer) in seen:
                raise ConfigError(
                    f"grad_sample_mode 'bookkeeping' needs every nn.Linear called once per "
                    f"forward pass, but {layer} ran twice (shared weights); use 'hooks'"
                )
            seen.add(id(layer))
        flat = torch.zeros(self.numel, dtype=self.params[0].dtype, device=self.params[0].device)
        for p in self.params:
            offset, shape = self._slices[id(p)]
            p.grad = flat[offset : offset + p.numel()].view(shape)
        if not captured:
            return flat
        backprops = torch.autograd.grad(
            loss_per_sample.sum(), [out for _, _, out in captured], allow_unused=True
        )
        layers: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
        squared: torch.Tensor | None = None
        for (layer, activation, output), backprop in zip(captured, backprops, strict=True):
            g = torch.zeros_like(output) if backprop is None else backprop.detach()
            a = activation if activation.dtype == g.dtype else activation.to(g.dtype)
            layer_squared = self._squared_norms(layer, a, g)
            squared = layer_squared if squared is None else squared + layer_squared
            layers.append((layer, a, g))
        assert squared is not None
        norms = squared.sqrt()
        # Opacus's clip factor (GradSampleHooksFastGradientClipping.get_clipping_coef).
        coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        finite = torch.isfinite(norms)
        dropped = not bool(finite.all())
        if dropped:
            coef = torch.where(finite, coef, torch.zeros_like(coef))
        for layer, a, g in layers:
            broadcast = (-1,) + (1,) * (g.dim() - 1)
            if dropped:
                keep = finite.view(broadcast)
                g = torch.where(keep, g, torch.zeros_like(g))
                a = torch.where(keep, a, torch.zeros_like(a))
            cg = (g * coef.view(broadcast)).reshape(-1, g.shape[-1])
            if layer.weight.requires_grad:
                torch.mm(cg.t(), a.reshape(-1, a.shape[-1]), out=layer.weight.grad)
            if layer.bias is not None and layer.bias.requires_grad:
                torch.sum(cg, dim=0, out=layer.bias.grad)
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
