"""A site's feature attributions of a model, over one of its splits.

:func:`input_parts` names every column of the model's inputs after the schema feature it
encodes (an EHR feature's one-hot and missing-flag columns all belong to that feature; a gene
is a feature; an image is one feature named ``imaging``), from the shared schema alone, so
every site of a federation names its attributions the same way and the server can add their
releases up. :func:`site_attributions` computes each patient's absolute attribution per
feature with :func:`fedcare.models.explain.integrated_gradients`; what leaves the site is only
the clipped, noised sum (:func:`fedcare.models.explain.release`), charged to the ledger.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedcare.client.data.datasets import TaskData
from fedcare.common.errors import ConfigError
from fedcare.common.spec import MODALITIES, FeatureSchema
from fedcare.models.explain import DEFAULT_STEPS, InputPart, integrated_gradients, task_parts

__all__ = ["input_parts", "site_attributions"]


def input_parts(schema: FeatureSchema, data: TaskData) -> list[InputPart | None]:
    """What each of the task's model inputs holds, in the dataset item's order (no label).

    A single-modality task has one input; a multimodal one has ``(x_ehr, x_img, x_gen,
    mask)`` (:class:`fedcare.client.data.datasets.MultimodalDataset`), of which a modality
    the task does not read (a zero-width tensor) and the mask are not attributed.
    """
    parts = {p.modality: p for p in task_parts(schema, data.task)}
    if not data.multimodal:
        return [parts[m] for m in MODALITIES if m in parts]
    return [*(parts.get(m) for m in MODALITIES), None]  # None: unread modality, the mask


def site_attributions(
    model: nn.Module,
    schema: FeatureSchema,
    data: TaskData,
    *,
    split: str = "test",
    steps: int = DEFAULT_STEPS,
    device: torch.device | None = None,
) -> tuple[np.ndarray, tuple[str, ...], tuple[str, ...]]:
    """Each patient of ``split``: absolute attribution per feature, ``(rows, features,
    modalities)`` (see :func:`fedcare.models.explain.integrated_gradients`). The rows stay
    at the site; only their release leaves it."""
    dataset = data.dataset(split)
    batches = list(DataLoader(dataset, batch_size=max(len(dataset), 1), shuffle=False))  # type: ignore[arg-type]
    parts = input_parts(schema, data)
    if not batches:
        width = len(parts)
        empty = [torch.zeros(0) for _ in range(width)]
        return integrated_gradients(model, empty, parts, steps=steps)
    *inputs, _y = batches[0]
    if len(inputs) != len(parts):
        raise ConfigError(
            f"site {data.site_id!r}: the {split} split has {len(inputs)} model inputs, the "
            f"task's schema describes {len(parts)}"
        )
    target = device or next(model.parameters()).device
    return integrated_gradients(model, [t.to(target) for t in inputs], parts, steps=steps)
