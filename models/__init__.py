"""Models and tasks: Opacus-valid ``nn.Module``s per modality, a registry, binary metrics.

Importing the package registers every model (``ehr_mlp``, ``imaging_cnn``, ``timeline``,
``genomics_mlp``, ``genomics_linear``, ``fusion``), then loads the plug-ins that add more
models, task kinds or strategies (:func:`fedcare.common.plugins.load_plugins`). Build one
with :func:`build_model`; see :mod:`fedcare.models.registry` for the input convention.
"""

from __future__ import annotations

from fedcare.common.plugins import load_plugins
from fedcare.models.ehr_mlp import EHRMLP, EHRMLPConfig
from fedcare.models.fusion import FusionConfig, FusionModel
from fedcare.models.genomics_linear import GenomicsLinear, GenomicsLinearConfig
from fedcare.models.genomics_mlp import GenomicsMLP, GenomicsMLPConfig
from fedcare.models.imaging_cnn import ImagingCNN, ImagingCNNConfig
from fedcare.models.metrics import (
    BINARY_METRICS,
    MetricInputError,
    UndefinedMetricError,
    accuracy,
    auprc,
    auroc,
    balanced_accuracy,
    binary_metrics,
    brier,
    ece,
    log_loss,
)
from fedcare.models.registry import (
    DEFAULT_SEED,
    HParams,
    ModelInfo,
    ModelRegistry,
    available_models,
    build_model,
    default_registry,
    model_info,
    register_model,
)
from fedcare.models.survival import SurvivalTask
from fedcare.models.tasks import (
    BinaryClassification,
    TaskDefinition,
    TaskKind,
    available_task_kinds,
    canonical_modalities,
    default_model_for,
    register_task_kind,
    task_definition,
    task_kind,
)
from fedcare.models.timeline import TimelineConfig, TimelineModel

__all__ = [
    # registry
    "DEFAULT_SEED",
    "HParams",
    "ModelInfo",
    "ModelRegistry",
    "available_models",
    "build_model",
    "default_registry",
    "model_info",
    "register_model",
    # models
    "EHRMLP",
    "EHRMLPConfig",
    "ImagingCNN",
    "ImagingCNNConfig",
    "GenomicsMLP",
    "GenomicsMLPConfig",
    "GenomicsLinear",
    "GenomicsLinearConfig",
    "FusionModel",
    "FusionConfig",
    "TimelineModel",
    "TimelineConfig",
    # metrics
    "BINARY_METRICS",
    "MetricInputError",
    "UndefinedMetricError",
    "accuracy",
    "auprc",
    "auroc",
    "balanced_accuracy",
    "binary_metrics",
    "brier",
    "ece",
    "log_loss",
    # tasks
    "BinaryClassification",
    "SurvivalTask",
    "TaskDefinition",
    "TaskKind",
    "available_task_kinds",
    "canonical_modalities",
    "default_model_for",
    "register_task_kind",
    "task_definition",
    "task_kind",
]

# Last: a plug-in registers beside fedcare's own models and task kinds, in every process
# that imports this package (a plug-in that clashes with a name is refused, naming it).
load_plugins()
