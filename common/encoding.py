"""The encoded feature vector's layout, derived from the shared schema alone.

Sites (which fit the encoders on their own train split) and the coordinating server (which
builds the initial model without seeing any data) must agree on every input width. Both
read it from here, so the rule has one home.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedcare.common.errors import ConfigError
from fedcare.common.spec import EventFeature, Feature, FeatureSchema, TaskSpec, TimelineSchema

__all__ = [
    "MISSING_SUFFIX",
    "MISSING_CATEGORY",
    "encoded_names",
    "task_ehr_features",
    "input_dims",
    "TIMELINE_KEY",
    "TIMELINE_CHANNELS",
    "task_timeline",
    "timeline_width",
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


TIMELINE_KEY = "timeline"
"""The ``input_dims`` key of a task's timeline: ``(max_length, number of codes)``."""

TIMELINE_CHANNELS: tuple[str, ...] = (
    "code",
    "value",
    "value_present",
    "gap_before",
    "time_to_latest",
    "present",
)
"""The per-event channels of an encoded timeline (:mod:`fedcare.client.data.sequences`)."""


def task_timeline(schema: FeatureSchema, task: TaskSpec) -> TimelineSchema | None:
    """The timeline ``task`` reads, or None."""
    return None if task.timeline is None else schema.timeline(task.timeline)


def timeline_width(timeline: TimelineSchema) -> int:
    """Columns the timeline adds to the end of the EHR vector: ``max_length x channels``.

    >>> from fedcare.common.spec import TimelineCode
    >>> timeline_width(TimelineSchema(name="vitals", codes=(TimelineCode(code="HR"),),
    ...                               max_length=8, time_unit="hours"))
    48
    """
    return timeline.max_length * len(TIMELINE_CHANNELS)


def input_dims(
    schema: FeatureSchema, task: TaskSpec
) -> dict[str, int | tuple[int, int] | tuple[int, int, int]]:
    """Modality -> encoded input size of ``task`` under ``schema``.

    EHR: the number of encoded columns; genomics: the number of genes/variants;
    imaging: ``(1, H, W)``. A task reading a timeline gets its flattened sequence appended
    to the EHR vector (:func:`timeline_width` more columns) and the key
    :data:`TIMELINE_KEY` ``-> (max_length, number of codes)``, which tells a model where
    the sequence starts and how to read it.
    """
    dims: dict[str, int | tuple[int, int] | tuple[int, int, int]] = {}
    for modality in task.modalities:
        if modality == "ehr":
            width = sum(len(encoded_names(f)) for f in task_ehr_features(schema, task))
            timeline = task_timeline(schema, task)
            if timeline is not None:
                width += timeline_width(timeline)
                dims[TIMELINE_KEY] = (timeline.max_length, len(timeline.codes))
            dims["ehr"] = width
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
