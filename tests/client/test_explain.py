"""A site's attributions: every model input named after the schema, for every kind of task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcare.client.data.datasets import build_task_data
from fedcare.client.explain import input_parts, site_attributions
from fedcare.common.encoding import MISSING_SUFFIX
from fedcare.models import build_model, default_model_for
from tests.client.data._memsites import EHR_COLUMNS, GENES, make_site

SITE, _ = make_site(90, seed=4)
SCHEMA = SITE.spec.feature_schema


def _model(data):  # noqa: ANN001, ANN202
    name = default_model_for(data.modalities)
    return build_model(name, input_dims=data.input_dims, generator=torch.Generator().manual_seed(0))


def _feature_of(column: str) -> str:
    """The schema feature an encoded EHR column belongs to, read off its name."""
    return column.split("=")[0].removesuffix(MISSING_SUFFIX)


def test_ehr_columns_are_grouped_by_the_feature_the_encoder_wrote_them_for() -> None:
    data = build_task_data(SITE, "readmission", seed=0)
    (part,) = input_parts(SCHEMA, data)
    assert part is not None and part.groups is not None
    encoder_columns = data.encoders["ehr"].feature_names
    assert part.groups == tuple(_feature_of(c) for c in encoder_columns)
    rows, features, modalities = site_attributions(_model(data), SCHEMA, data)
    assert features == tuple(f"ehr:{c}" for c in EHR_COLUMNS)
    assert set(modalities) == {"ehr"}
    assert rows.shape == (data.n["test"], len(EHR_COLUMNS))
    assert np.isfinite(rows).all() and (rows >= 0).all() and rows.sum() > 0


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("genomics_only", tuple(f"genomics:{g}" for g in GENES)),
        ("imaging_only", ("imaging:imaging",)),
        (
            "multimodal",
            (
                *(f"ehr:{c}" for c in EHR_COLUMNS),
                "imaging:imaging",
                *(f"genomics:{g}" for g in GENES),
            ),
        ),
    ],
)
def test_every_modality_is_named_and_the_mask_is_not_attributed(
    task: str, expected: tuple[str, ...]
) -> None:
    data = build_task_data(SITE, task, seed=0)
    rows, features, _ = site_attributions(_model(data), SCHEMA, data, steps=8)
    assert features == expected
    assert rows.shape == (data.n["test"], len(expected))
    assert np.isfinite(rows).all()


def test_the_model_s_mode_is_left_as_it_was() -> None:
    data = build_task_data(SITE, "readmission", seed=0)
    model = _model(data)
    model.train()
    site_attributions(model, SCHEMA, data, steps=4)
    assert model.training
