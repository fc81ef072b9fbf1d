"""The encoded feature vector's layout, derived from the shared schema alone.

Sites (which fit the encoders on their own train split) and the coordinating server (which
builds the initial model without seeing any data) must agree on every input width. Both
read it from here, so the rule has one home.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedcare.common.errors import ConfigError
from fedcare.common.spec import EventFeature, Feature, FeatureSchema, TaskSpec

__all__ = [
    "MISSING_SUFFIX",
    "MISSING_CATEGORY",
    "encoded_names",
    "task_ehr_features",
    "input_dims",
]

MISSING_SUFFIX = "__missing"
MISSING_CATEGORY = "__missing__"


def encoded_names(feature: Feature | EventFeature) -> tuple[str, ...]:
    """Output columns of one feature, in order.

    >>> encoded_names(Feature(name="sex", kind="categorical", categories=("F", "M")))
    ('sex=F', 'sex=M', 'sex=__missing__')
    >>> encoded_names(Feature(name="age", kind="numeric"))
    ('age', 'age__missing')
    """
    if isinstance(feature, Feature) and feature.kind == "categorical":
        categories = feature.categories or ()
        return tuple(f"{feature.name}={c}" for c in categories) + (
            f"{feature.name}={MISSING_CATEGORY}",
        )
    return (feature.name, feature.name + MISSING_SUFFIX)


def task_ehr_features(schema: FeatureSchema, task: TaskSpec) -> tuple[Feature | EventFeature, ...]:
    """The EHR and event features a task reads, in schema order."""
    every: Sequence[Feature | EventFeature] = (*schema.ehr, *schema.events)
    if task.features is None:
        return tuple(every)
    if not task.features:
        raise ConfigError(
            f"task {task.name!r} lists an empty 'features'; name at least one "
            "feature, or remove the key to use every schema feature"
        )
    wanted = set(task.features)
    return tuple(f for f in every if f.name in wanted)


def input_dims(schema: FeatureSchema, task: TaskSpec) -> dict[str, int | tuple[int, int, int]]:
    """Modality -> encoded input size of ``task`` under ``schema``.

    EHR: the number of encoded columns; genomics: the number of genes/variants;
    imaging: ``(1, H, W)``.
    """
    dims: dict[str, int | tuple[int, int, int]] = {}
    for modality in task.modalities:
        if modality == "ehr":
            dims["ehr"] = sum(len(encoded_names(f)) for f in task_ehr_features(schema, task))
        elif modality == "genomics":
            if schema.genomics is None:
                raise ConfigError(f"task {task.name!r} reads genomics but the schema has none")
            dims["genomics"] = len(schema.genomics.features)
        elif modality == "imaging":
            if schema.imaging is None:
                raise ConfigError(f"task {task.name!r} reads imaging but the schema has none")
            h, w = schema.imaging.shape
            dims["imaging"] = (1, h, w)
    return dims
