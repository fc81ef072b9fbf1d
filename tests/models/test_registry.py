"""The model registry (names, hyper-parameters, input dims) and the task definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import PositiveInt
from torch import nn

from fedcare import models
from fedcare.common.errors import ConfigError
from fedcare.common.keys import TASK_METRICS
from fedcare.common.spec import MODALITIES, TaskSpec
from fedcare.models import (
    BinaryClassification,
    HParams,
    ModelRegistry,
    TaskKind,
    available_models,
    available_task_kinds,
    build_model,
    default_model_for,
    model_info,
    register_task_kind,
    task_definition,
    task_kind,
)
from fedcare.models.registry import init_parameters

DIMS = {"ehr": 6, "imaging": (1, 8, 8), "genomics": 30}

# ----------------------------------------------------------------------------- registry


def test_available_models_lists_the_bundled_models() -> None:
    assert available_models() == (
        "ehr_mlp",
        "fusion",
        "genomics_linear",
        "genomics_mlp",
        "imaging_cnn",
        "timeline",
    )


def test_unknown_model_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        build_model("resnet152", input_dims=DIMS)
    message = str(info.value)
    assert "resnet152" in message
    for name in available_models():
        assert name in message
    with pytest.raises(ConfigError, match="ehr_mlp"):
        model_info("nope")


def test_unknown_hyper_parameter_is_rejected_with_the_valid_names() -> None:
    with pytest.raises(ConfigError, match="hidden_size") as info:
        build_model("ehr_mlp", input_dims=DIMS, hidden_size=10)
    assert "hidden" in str(info.value) and "dropout" in str(info.value)


@pytest.mark.parametrize(
    ("name", "hparams"),
    [
        ("ehr_mlp", {"dropout": 1.5}),
        ("ehr_mlp", {"hidden": ()}),
        ("ehr_mlp", {"hidden": (0, 4)}),
        ("genomics_mlp", {"hidden": (-3,)}),
        ("imaging_cnn", {"channels": (8, 10), "groups": 4}),
        ("fusion", {"embed_dim": 0}),
        ("fusion", {"imaging_channels": (6,), "imaging_groups": 4}),
    ],
)
def test_invalid_hyper_parameter_values_are_config_errors(name: str, hparams: dict) -> None:
    with pytest.raises(ConfigError, match=name):
        build_model(name, input_dims=DIMS, **hparams)


def test_hyper_parameters_from_toml_lists_are_accepted() -> None:
    model = build_model("imaging_cnn", input_dims=DIMS, channels=[4, 8], groups=2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8]


@pytest.mark.parametrize(
    ("name", "dims", "match"),
    [
        ("ehr_mlp", {"imaging": (1, 8, 8)}, "no 'ehr' key"),
        ("ehr_mlp", {"ehr": 0}, "positive int"),
        ("ehr_mlp", {"ehr": "40"}, "positive int"),
        ("ehr_mlp", {"ehr": True}, "positive int"),
        ("genomics_mlp", {"genomics": 2.5}, "positive int"),
        ("imaging_cnn", {"imaging": (32, 32)}, "channels, height, width"),
        ("imaging_cnn", {"imaging": (1, 0, 32)}, "channels, height, width"),
        ("fusion", {}, "at least one modality"),
        ("ehr_mlp", {"ehr": 4, "proteomics": 10}, "unknown modalities"),
        ("ehr_mlp", [("ehr", 4)], "mapping"),
    ],
)
def test_bad_input_dims_are_config_errors(name: str, dims, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_model(name, input_dims=dims)


def test_single_element_width_is_accepted() -> None:
    assert build_model("ehr_mlp", input_dims={"ehr": (6,)})(torch.zeros(2, 6)).shape == (2,)


def test_model_info_describes_each_model() -> None:
    for name in available_models():
        info = model_info(name)
        assert info.name == name
        assert info.description
        assert set(info.modalities) <= set(MODALITIES)
        assert info.default_hparams() == info.config_cls().model_dump()
    assert model_info("fusion").multimodal and model_info("fusion").modalities == MODALITIES
    assert [n for n in available_models() if model_info(n).multimodal] == ["fusion"]
    assert model_info("ehr_mlp").modalities == ("ehr",)
    assert model_info("imaging_cnn").modalities == ("imaging",)
    assert model_info("genomics_mlp").modalities == ("genomics",)


def test_model_info_is_frozen() -> None:
    with pytest.raises(AttributeError):
        model_info("ehr_mlp").ghost_clipping = False  # type: ignore[misc]


class _TinyConfig(HParams):
    width: PositiveInt = 3


def _tiny_class():
    class Tiny(nn.Module):
        """A tiny test model."""

        Config = _TinyConfig

        def __init__(self, width: int) -> None:
            super().__init__()
            self.layer = nn.Linear(width, 1)

        @classmethod
        def from_config(cls, *, input_dims, config):
            return cls(config.width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x).squeeze(-1)

    return Tiny


def test_a_fresh_registry_registers_and_builds() -> None:
    reg = ModelRegistry()
    reg.register("tiny", modalities=("ehr",), ghost_clipping=True, ghost_norm_only=True)(
        _tiny_class()
    )
    assert reg.names() == ("tiny",)
    assert reg.info("tiny").description == "A tiny test model."
    model = reg.build("tiny", input_dims={"ehr": 3}, width=3)
    assert model(torch.zeros(4, 3)).shape == (4,)
    assert "tiny" not in available_models(), "a fresh registry must not leak into the default"


def test_registering_a_name_twice_is_refused() -> None:
    reg = ModelRegistry()
    reg.register("tiny", modalities=("ehr",), ghost_clipping=True, ghost_norm_only=True)(
        _tiny_class()
    )
    with pytest.raises(ConfigError, match="already registered"):
        reg.register("tiny", modalities=("ehr",), ghost_clipping=True, ghost_norm_only=True)


@pytest.mark.parametrize(
    ("modalities", "multimodal"), [((), False), (("ehr", "imaging"), False), (("xray",), True)]
)
def test_registration_checks_modalities(modalities: tuple, multimodal: bool) -> None:
    with pytest.raises(ConfigError):
        ModelRegistry().register(
            "x",
            modalities=modalities,
            multimodal=multimodal,
            ghost_clipping=True,
            ghost_norm_only=True,
        )


def test_registration_requires_config_and_builder() -> None:
    class NoConfig(nn.Module):
        pass

    with pytest.raises(TypeError, match="Config"):
        ModelRegistry().register(
            "x", modalities=("ehr",), ghost_clipping=True, ghost_norm_only=True
        )(NoConfig)


def test_init_parameters_reproduces_pytorch_default_bounds() -> None:
    layer = nn.Linear(50, 20)
    init_parameters(layer, generator=torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(50)  # kaiming_uniform(a=sqrt(5)) and bias both give 1/sqrt(fan_in)
    assert layer.weight.abs().max() <= bound
    assert layer.bias.abs().max() <= bound
    assert layer.weight.std() > bound / 3  # actually spread, not zeros


def test_init_parameters_rejects_unknown_parametrised_layers() -> None:
    with pytest.raises(TypeError, match="Embedding"):
        init_parameters(nn.Embedding(4, 2), generator=torch.Generator())


def test_package_exports_are_explicit_and_importable() -> None:
    for name in models.__all__:
        assert hasattr(models, name), name


# ----------------------------------------------------------------------------- tasks


@pytest.mark.parametrize(
    ("modalities", "expected"),
    [
        (("ehr",), "ehr_mlp"),
        (("imaging",), "imaging_cnn"),
        (("genomics",), "genomics_mlp"),
        (("ehr", "imaging"), "fusion"),
        (("genomics", "ehr"), "fusion"),
        (("ehr", "imaging", "genomics"), "fusion"),
    ],
)
def test_default_model_for_modalities(modalities: tuple[str, ...], expected: str) -> None:
    assert default_model_for(modalities) == expected
    assert expected in available_models()


@pytest.mark.parametrize("modalities", [(), ("ehr", "ehr"), ("proteomics",)])
def test_default_model_for_bad_modalities(modalities: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError):
        default_model_for(modalities)


def test_binary_task_loss_is_bce_with_logits() -> None:
    task = task_kind("binary")
    assert isinstance(task, BinaryClassification)
    logits = torch.tensor([-2.0, 0.0, 3.0])
    y = torch.tensor([0.0, 1.0, 1.0])
    expected = -np.mean(
        [math.log(1 - 1 / (1 + math.exp(2.0))), math.log(0.5), math.log(1 / (1 + math.exp(-3.0)))]
    )
    assert task.make_loss()(logits, y).item() == pytest.approx(expected, rel=1e-6)
    per_sample = task.make_loss(reduction="sum")(logits, y).item()
    assert per_sample == pytest.approx(3 * expected, rel=1e-6)
    assert task.make_loss().reduction == "mean"  # Opacus ghost mode checks this attribute


def test_binary_task_scores_and_metrics() -> None:
    task = task_kind("binary")
    scores = task.scores(torch.tensor([0.0, 100.0, -100.0]))
    torch.testing.assert_close(scores, torch.tensor([0.5, 1.0, 0.0]))
    m = task.metrics([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8])
    assert m["auroc"] == 1.0
    assert set(m) <= set(task.metric_names) <= set(TASK_METRICS)
    assert task.output_dim == 1


def test_task_kinds_registry() -> None:
    assert available_task_kinds() == ("binary", "survival")
    with pytest.raises(ConfigError, match="binary, survival"):
        task_kind("regression")
    with pytest.raises(ConfigError, match="already registered"):
        register_task_kind(BinaryClassification)
    with pytest.raises(TypeError):
        TaskKind()  # type: ignore[abstract]


def test_task_definition_from_spec_uses_the_default_model() -> None:
    spec = TaskSpec(name="outcome", label="death", modalities=("imaging", "ehr"))
    task = task_definition(spec)
    assert task.model == "fusion"
    assert task.modalities == ("ehr", "imaging")
    assert task.label == "death" and task.name == "outcome"
    assert isinstance(task.kind, BinaryClassification)


def test_task_definition_rejects_a_model_that_cannot_read_the_modalities() -> None:
    spec = TaskSpec(name="outcome", label="death", modalities=("ehr", "genomics"))
    with pytest.raises(ConfigError, match="fusion"):
        task_definition(spec, model="ehr_mlp")
    with pytest.raises(ConfigError, match="unknown model"):
        task_definition(spec, model="nope")
    assert task_definition(spec, model="fusion").model == "fusion"
