"""The model registry: every model is built by name, with validated hyper-parameters.

A model is an ``nn.Module`` class registered with :func:`register_model`. The class
declares a frozen pydantic ``Config`` (its hyper-parameters, unknown keys rejected) and a
``from_config(*, input_dims, config)`` class method. :func:`build_model` looks the name up,
validates the hyper-parameters, builds the module and initialises its parameters from an
injected ``torch.Generator`` (fixed default seed), so two builds with the same arguments
are identical and the global RNG is never touched.

Input convention (fixed by the data layer): ``input_dims`` maps a modality to its shape,
e.g. ``{"ehr": 40, "imaging": (1, 32, 32), "genomics": 200}``. A single-modality model is
called as ``model(x)``; a multimodal one (``model_info(name).multimodal``) as
``model(x_ehr, x_img, x_gen, mask)`` with ``mask`` of shape ``(B, 3)`` in the order of
:data:`fedcare.common.spec.MODALITIES`. Every model returns one logit per sample, shape ``(B,)``.

Adding a model = a new file with one decorated class + one import line in
``models/__init__.py``::

    @register_model("my_mlp", modalities=("ehr",), ghost_clipping=True, ghost_norm_only=True)
    class MyMLP(nn.Module):
        Config = MyMLPConfig

        @classmethod
        def from_config(cls, *, input_dims, config): ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from fedcare.common.encoding import TIMELINE_KEY
from fedcare.common.errors import ConfigError, format_validation_error
from fedcare.common.spec import MODALITIES

__all__ = [
    "HParams",
    "ModelInfo",
    "ModelRegistry",
    "DEFAULT_SEED",
    "register_model",
    "build_model",
    "available_models",
    "model_info",
    "default_registry",
    "init_parameters",
    "feature_dim",
    "image_shape",
]

DEFAULT_SEED = 0


class HParams(BaseModel):
    """Base of every model's hyper-parameters: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


M = TypeVar("M", bound=type)


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model, without building it.

    Attributes
    ----------
    name:
        The registered name (``build_model(name, ...)``).
    modalities:
        The modalities the model can read. A single-modality model reads exactly one; the
        fusion model reads any non-empty subset of :data:`fedcare.common.spec.MODALITIES`.
    multimodal:
        ``True`` when the forward call is ``model(x_ehr, x_img, x_gen, mask)``;
        ``False`` when it is ``model(x)``.
    ghost_clipping:
        ``True`` when the model trains under Opacus
        ``make_private(..., grad_sample_mode="ghost")`` with correct per-sample gradient
        norms (verified by ``tests/models/test_models.py``).
    ghost_norm_only:
        ``True`` when *every* trainable layer has an Opacus ghost-norm sampler (in Opacus
        1.6: ``nn.Linear`` and ``nn.Embedding``), so no per-sample gradient is ever
        materialised. ``False`` when some layers (``nn.Conv2d``, ``nn.GroupNorm``) fall
        back to per-sample gradients inside ghost mode ("fast gradient clipping"); ghost
        mode still works then, it is just less of a saving. Where a site trains a built
        model, fedcare's ``auto`` mode asks the model itself: one-backward bookkeeping
        (:mod:`fedcare.client.bookkeeping`) wherever every trainable layer is an
        ``nn.Linear``, ``nn.Conv2d`` or ``nn.GroupNorm`` it handles exactly
        (``check_supported``), per-sample hooks elsewhere. By name alone (no model), a
        ``True`` model gets bookkeeping: declare ``True`` only for a model whose every
        trainable layer is ``nn.Linear`` (``tests/client/test_bookkeeping.py`` checks each).
    bookkeeping:
        ``True`` when the model may also train by one-backward bookkeeping though not every
        layer is ``nn.Linear`` (its ``nn.Conv2d`` and ``nn.GroupNorm`` layers are handled
        too): every layer is called once per forward pass, on inputs whose first
        dimension is the patients. ``auto`` picks bookkeeping for a built model only when
        this or ``ghost_norm_only`` is declared and ``check_supported`` accepts it, since a
        layer called twice is found only at the first step, after the round's charge; an
        undeclared model keeps per-sample hooks.
    config_cls:
        The pydantic hyper-parameter model; its defaults are the model's default size.
    description:
        First line of the model class's docstring.
    timeline:
        ``True`` when the model reads a task's patient timeline (``input_dims["timeline"]``,
        :mod:`fedcare.common.encoding`); a model that does not is refused such a task.
    """

    name: str
    modalities: tuple[str, ...]
    multimodal: bool
    ghost_clipping: bool
    ghost_norm_only: bool
    config_cls: type[HParams]
    description: str
    timeline: bool = False
    bookkeeping: bool = False

    def default_hparams(self) -> dict[str, Any]:
        """The default hyper-parameters, as a plain dict."""
        return self.config_cls().model_dump()


@dataclass(frozen=True)
class _Entry:
    info: ModelInfo
    cls: Any  # an nn.Module subclass with `Config` and `from_config` (checked at registration)


class ModelRegistry:
    """A name -> model-class table. The package keeps one (:func:`default_registry`).

    Examples
    --------
    >>> reg = ModelRegistry()
    >>> reg.names()
    ()
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def register(
        self,
        name: str,
        *,
        modalities: tuple[str, ...],
        ghost_clipping: bool,
        ghost_norm_only: bool,
        multimodal: bool = False,
        timeline: bool = False,
        bookkeeping: bool = False,
    ) -> Callable[[M], M]:
        """Class decorator adding a model under ``name``; see :func:`register_model`."""
        if name in self._entries:
            raise ConfigError(
                f"a model named {name!r} is already registered; pick another name for the new model"
            )
        bad = [m for m in modalities if m not in MODALITIES]
        if not modalities or bad:
            raise ConfigError(
                f"model {name!r} declares modalities {modalities!r}; use a non-empty subset "
                f"of {MODALITIES}"
            )
        if not multimodal and len(modalities) != 1:
            raise ConfigError(
                f"model {name!r} is single-modality but declares {modalities!r}; declare "
                "exactly one modality or set multimodal=True"
            )

        def decorate(cls: M) -> M:
            config_cls = getattr(cls, "Config", None)
            if not (isinstance(config_cls, type) and issubclass(config_cls, HParams)):
                raise TypeError(f"model class {cls.__name__} needs a `Config` (HParams subclass)")
            if not callable(getattr(cls, "from_config", None)):
                raise TypeError(f"model class {cls.__name__} needs a `from_config` classmethod")
            doc = (cls.__doc__ or "").strip().splitlines()
            info = ModelInfo(
                name=name,
                modalities=tuple(modalities),
                multimodal=multimodal,
                ghost_clipping=ghost_clipping,
                ghost_norm_only=ghost_norm_only,
                config_cls=config_cls,
                description=doc[0] if doc else "",
                timeline=timeline,
                bookkeeping=bookkeeping,
            )
            self._entries[name] = _Entry(info=info, cls=cls)
            return cls

        return decorate

    def names(self) -> tuple[str, ...]:
        """Registered names, sorted."""
        return tuple(sorted(self._entries))

    def info(self, name: str) -> ModelInfo:
        """The :class:`ModelInfo` of ``name``; :class:`ConfigError` if unknown."""
        return self._entry(name).info

    def build(
        self,
        name: str,
        *,
        input_dims: Mapping[str, Any],
        generator: torch.Generator | None = None,
        **hparams: Any,
    ) -> nn.Module:
        """Build ``name``; see :func:`build_model`."""
        entry = self._entry(name)
        if not isinstance(input_dims, Mapping):
            raise ConfigError(
                f"input_dims must be a mapping of modality -> shape, got "
                f"{type(input_dims).__name__}; pass e.g. {{'ehr': 40}}"
            )
        unknown = sorted(set(input_dims) - set(MODALITIES) - {TIMELINE_KEY})
        if unknown:
            raise ConfigError(
                f"input_dims names unknown modalities {unknown}; use keys from {MODALITIES}"
            )
        if TIMELINE_KEY in input_dims and not entry.info.timeline:
            readers = ", ".join(n for n in self.names() if self._entries[n].info.timeline)
            raise ConfigError(
                f"model {name!r} cannot read the task's patient timeline; use a model that "
                f"does ({readers or 'none registered'}), or a task without a timeline"
            )
        try:
            config = entry.info.config_cls(**hparams)
        except ValidationError as e:
            fields = ", ".join(entry.info.config_cls.model_fields)
            problems = format_validation_error(
                f"hyper-parameters of model {name!r}",
                e,
                known_keys=lambda _: list(entry.info.config_cls.model_fields),
            )
            raise ConfigError(f"{problems} (model {name!r} takes: {fields})") from e
        # Build without storage (no draw from the global RNG), then draw every initial
        # weight from the injected generator.
        with torch.device("meta"):
            model = entry.cls.from_config(input_dims=input_dims, config=config)
        if any(True for _ in model.buffers()):
            raise TypeError(
                f"model {name!r} has buffers; fedcare models must not (Opacus strict mode "
                "rejects them, and build_model cannot initialise them)"
            )
        model = model.to_empty(device="cpu")
        if generator is None:
            generator = torch.Generator().manual_seed(DEFAULT_SEED)
        init_parameters(model, generator=generator)
        return model

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names()) or "(none)"
            raise ConfigError(f"unknown model {name!r}; choose one of: {known}") from None


_DEFAULT_REGISTRY = ModelRegistry()


def default_registry() -> ModelRegistry:
    """The registry the ``register_model``/``build_model`` functions use."""
    return _DEFAULT_REGISTRY


def register_model(
    name: str,
    *,
    modalities: tuple[str, ...],
    ghost_clipping: bool,
    ghost_norm_only: bool,
    multimodal: bool = False,
    timeline: bool = False,
    bookkeeping: bool = False,
) -> Callable[[M], M]:
    """Register an ``nn.Module`` class under ``name`` in the default registry.

    Parameters
    ----------
    name:
        Registered name; must be new.
    modalities:
        Modalities the model reads (exactly one unless ``multimodal``).
    ghost_clipping, ghost_norm_only:
        See :class:`ModelInfo`; the test-suite checks both claims.
    multimodal:
        ``True`` for a ``forward(x_ehr, x_img, x_gen, mask)`` model.
    timeline:
        ``True`` for a model that reads a task's patient timeline (see :class:`ModelInfo`).
    bookkeeping:
        ``True`` for a model with convolutions or GroupNorm that one-backward bookkeeping
        may train (see :class:`ModelInfo`).

    Returns
    -------
    Callable
        The class decorator.
    """
    return _DEFAULT_REGISTRY.register(
        name,
        modalities=modalities,
        ghost_clipping=ghost_clipping,
        ghost_norm_only=ghost_norm_only,
        multimodal=multimodal,
        timeline=timeline,
        bookkeeping=bookkeeping,
    )


def build_model(
    name: str,
    *,
    input_dims: Mapping[str, Any],
    generator: torch.Generator | None = None,
    **hparams: Any,
) -> nn.Module:
    """Build a registered model, on CPU, in training mode.

    Parameters
    ----------
    name:
        A name from :func:`available_models`.
    input_dims:
        Modality -> shape: ``"ehr"`` and ``"genomics"`` take an ``int`` width,
        ``"imaging"`` a ``(channels, height, width)`` tuple.
    generator:
        Source of the initial weights; ``None`` uses a fixed seed (:data:`DEFAULT_SEED`).
    **hparams:
        The model's hyper-parameters (fields of ``model_info(name).config_cls``).

    Returns
    -------
    nn.Module
        The model; move it with ``.to(device)``.

    Raises
    ------
    ConfigError
        Unknown name (the message lists the known ones), invalid or unknown
        hyper-parameters, or ``input_dims`` missing or malformed.

    Examples
    --------
    >>> import torch
    >>> model = build_model("ehr_mlp", input_dims={"ehr": 5})
    >>> model(torch.zeros(3, 5)).shape
    torch.Size([3])
    """
    return _DEFAULT_REGISTRY.build(name, input_dims=input_dims, generator=generator, **hparams)


def available_models() -> tuple[str, ...]:
    """Names of the registered models, sorted."""
    return _DEFAULT_REGISTRY.names()


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a registered model; :class:`ConfigError` if unknown."""
    return _DEFAULT_REGISTRY.info(name)


def feature_dim(input_dims: Mapping[str, Any], modality: str, *, model: str) -> int:
    """The positive ``int`` width of a vector modality; :class:`ConfigError` otherwise."""
    if modality not in input_dims:
        raise ConfigError(
            f"model {model!r} reads {modality!r} but input_dims has no {modality!r} key; "
            f"pass input_dims={{{modality!r}: <number of features>}}"
        )
    value = input_dims[modality]
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"input_dims[{modality!r}] = {input_dims[modality]!r} for model {model!r}; "
            "it must be a positive int (the number of features)"
        )
    return value


def image_shape(input_dims: Mapping[str, Any], *, model: str) -> tuple[int, int, int]:
    """The ``(channels, height, width)`` of ``input_dims["imaging"]``; checked."""
    if "imaging" not in input_dims:
        raise ConfigError(
            f"model {model!r} reads 'imaging' but input_dims has no 'imaging' key; pass "
            "input_dims={'imaging': (1, height, width)}"
        )
    value = input_dims["imaging"]
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    )
    if not ok:
        raise ConfigError(
            f"input_dims['imaging'] = {value!r} for model {model!r}; it must be "
            "(channels, height, width) of positive ints, e.g. (1, 32, 32)"
        )
    return (int(value[0]), int(value[1]), int(value[2]))


def init_parameters(model: nn.Module, *, generator: torch.Generator) -> None:
    """Re-initialise every parameter of ``model`` from ``generator``, in place.

    Same distributions as PyTorch's defaults (Kaiming-uniform weights, uniform biases for
    linear and convolution layers; ones and zeros for normalisation layers), but drawn from
    the injected generator so the global RNG is untouched.

    Raises
    ------
    TypeError
        A module owns parameters of a kind this function does not know; add it here.
    """
    with torch.no_grad():
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                if module.bias is not None:
                    fan_in = module.weight[0].numel()
                    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    nn.init.uniform_(module.bias, -bound, bound, generator=generator)
            elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            else:
                raise TypeError(
                    f"init_parameters does not know how to initialise {type(module).__name__}; "
                    "add a rule for it in models/registry.py"
                )
