"""build_task_data: patient selection, train-only fitting, tensor shapes, modality masks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from fedcare.client.data.datasets import (
    ImageDataset,
    MultimodalDataset,
    TabularDataset,
    build_task_data,
)
from fedcare.client.data.preprocess import TabularEncoder
from fedcare.client.data.split import SPLIT_NAMES, split_patients
from fedcare.common.errors import ConfigError, DataError
from tests.client.data._memsites import EHR_COLUMNS, GENES, SHAPE, make_site

SITE, TRUTH = make_site(80, seed=1)
H, W = SHAPE
EHR_WIDTH = 2 + (3 + 1) + 2 + 2  # age, sex (3 levels + missing), diabetes, hr_mean


def _ids(task_data) -> list[str]:  # noqa: ANN001
    return [p for name in SPLIT_NAMES for p in task_data.patient_ids[name]]


def _labels(ids) -> np.ndarray:  # noqa: ANN001
    return SITE.labels.loc[list(ids), "outcome"].to_numpy(dtype=np.float32)


def test_ehr_task_shapes_dtypes_and_patients() -> None:
    td = build_task_data(SITE, "readmission")
    assert td.site_id == "site-0" and td.task.name == "readmission"
    assert td.modalities == ("ehr",) and not td.multimodal
    assert td.input_dims == {"ehr": EHR_WIDTH}
    assert sorted(_ids(td)) == sorted(TRUTH.labelled & TRUTH.has_ehr)
    for name in SPLIT_NAMES:
        ds = td.dataset(name)
        assert isinstance(ds, TabularDataset)
        assert len(ds) == td.n[name] == len(td.patient_ids[name]) > 0
        x, y = ds[0]
        assert x.shape == (EHR_WIDTH,) and x.dtype == torch.float32
        assert y.shape == () and y.dtype == torch.float32
        torch.testing.assert_close(ds.y, torch.from_numpy(_labels(td.patient_ids[name])))
        assert torch.isfinite(ds.x).all()


def test_split_is_the_patient_hash_split_of_the_eligible_patients() -> None:
    td = build_task_data(SITE, "readmission", seed=3)
    assert td.patient_ids == split_patients(sorted(TRUTH.labelled & TRUTH.has_ehr), seed=3)
    assert build_task_data(SITE, "readmission", seed=3).patient_ids == td.patient_ids
    assert build_task_data(SITE, "readmission", seed=4).patient_ids != td.patient_ids


def test_single_modality_tasks_drop_patients_lacking_the_modality() -> None:
    img = build_task_data(SITE, "imaging_only")
    assert sorted(_ids(img)) == sorted(TRUTH.labelled & TRUTH.has_image)
    assert isinstance(img.train, ImageDataset)
    x, y = img.train[0]
    assert x.shape == (1, H, W) and x.dtype == torch.float32 and y.shape == ()
    assert img.input_dims == {"imaging": (1, H, W)}

    gen = build_task_data(SITE, "genomics_only")
    assert sorted(_ids(gen)) == sorted(TRUTH.labelled & TRUTH.has_genomics)
    assert isinstance(gen.val, TabularDataset)
    assert gen.val[0][0].shape == (len(GENES),)
    assert gen.input_dims == {"genomics": len(GENES)}


def test_multimodal_masks_and_zero_fills_missing_modalities() -> None:
    td = build_task_data(SITE, "multimodal")
    assert td.modalities == ("ehr", "imaging", "genomics") and td.multimodal
    assert td.input_dims == {"ehr": EHR_WIDTH, "imaging": (1, H, W), "genomics": len(GENES)}
    any_modality = TRUTH.has_ehr | TRUTH.has_image | TRUTH.has_genomics
    assert sorted(_ids(td)) == sorted(TRUTH.labelled & any_modality)
    seen_partial = False
    for name in SPLIT_NAMES:
        ds = td.dataset(name)
        assert isinstance(ds, MultimodalDataset)
        for i, pid in enumerate(td.patient_ids[name]):
            x_ehr, x_img, x_gen, mask, y = ds[i]
            assert (x_ehr.shape, x_img.shape, x_gen.shape) == ((EHR_WIDTH,), (1, H, W), (5,))
            assert mask.dtype == torch.float32 and y.shape == ()
            truth = [pid in TRUTH.has_ehr, pid in TRUTH.has_image, pid in TRUTH.has_genomics]
            assert mask.tolist() == [float(t) for t in truth], pid
            for x, present in zip((x_ehr, x_img, x_gen), truth, strict=True):
                if not present:
                    assert not x.any()
            if pid in TRUTH.has_image:  # present images are the normalised raw pixels
                norm = td.encoders["imaging"]
                ref = torch.from_numpy(norm.transform(SITE.images[pid]))
                torch.testing.assert_close(x_img, ref)
            seen_partial |= not all(truth)
    assert seen_partial


def test_two_modality_task_leaves_the_third_slot_empty() -> None:
    td = build_task_data(SITE, "ehr_imaging")
    assert set(td.input_dims) == {"ehr", "imaging"} and set(td.encoders) == {"ehr", "imaging"}
    x_ehr, x_img, x_gen, mask, _ = td.train[0]
    assert x_gen.shape == (0,) and mask[2] == 0.0
    batch = next(iter(DataLoader(td.train, batch_size=4)))
    assert isinstance(batch, (list, tuple)) and len(batch) == 5
    assert batch[1].shape == (4, 1, H, W) and batch[2].shape == (4, 0)


def test_task_feature_restriction_keeps_schema_order() -> None:
    td = build_task_data(SITE, "restricted")  # the task lists ("hr_mean", "age")
    enc = td.encoders["ehr"]
    assert isinstance(enc, TabularEncoder)
    assert enc.feature_names == ("age", "age__missing", "hr_mean", "hr_mean__missing")
    assert td.input_dims == {"ehr": 4} and td.train[0][0].shape == (4,)


def test_encoders_are_fitted_on_the_train_split_only() -> None:
    td = build_task_data(SITE, "multimodal")
    train = list(td.patient_ids.train)
    held_out = [*td.patient_ids.val, *td.patient_ids.test]

    # reference statistics over the train patients only
    age = SITE.ehr.loc[[p for p in train if p in TRUTH.has_ehr], "age"].dropna().to_numpy()
    ehr_stats = td.encoders["ehr"].state_dict()["stats"][0]
    assert ehr_stats["mean"] == pytest.approx(age.mean())
    assert ehr_stats["std"] == pytest.approx(age.std())
    pixels = np.concatenate([SITE.images[p].ravel() for p in train if p in TRUTH.has_image])
    assert td.encoders["imaging"].state_dict()["mean"] == pytest.approx(pixels.mean(), rel=1e-6)

    # wreck every held-out patient's data: nothing fitted, nothing of train may change
    ehr = SITE.ehr.copy()
    rows = [p for p in held_out if p in ehr.index]
    ehr.loc[rows, "age"] = 1e6
    ehr.loc[rows, "hr_mean"] = -1e6
    ehr.loc[rows, "diabetes"] = 1.0
    genomics = SITE.genomics.copy()
    genomics.loc[held_out, list(GENES)] = 1e5
    images = {p: (im * 50 + 1e4 if p in held_out else im) for p, im in SITE.images.items()}
    changed = dataclasses.replace(SITE, ehr=ehr, genomics=genomics, images=images)
    # the test is sensitive: statistics over all patients would now differ a lot
    assert ehr["age"].mean() > 10 * age.mean()

    again = build_task_data(changed, "multimodal")
    assert again.patient_ids == td.patient_ids
    for m in td.modalities:
        # Equal up to the last bits: pandas may sum a column in another order once other
        # rows of the frame changed (pandas 2 vs 3 differ here), never more.
        _assert_same_state(again.encoders[m].state_dict(), td.encoders[m].state_dict(), m)
    for a, b in zip(td.train.tensors, again.train.tensors, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(td.val.tensors[0], again.val.tensors[0])


def test_two_sites_with_one_schema_encode_identically_shaped_inputs() -> None:
    other, _ = make_site(50, site_id="site-9", seed=7, shift=40.0, p_image=0.3)
    for task in ("readmission", "multimodal", "genomics_only"):
        a, b = build_task_data(SITE, task), build_task_data(other, task)
        assert a.input_dims == b.input_dims
        for m in a.modalities:
            enc_a, enc_b = a.encoders[m], b.encoders[m]
            assert getattr(enc_a, "feature_names", None) == getattr(enc_b, "feature_names", None)
            assert enc_a.state_dict() != enc_b.state_dict()  # fitted on different data


def test_too_few_patients_is_a_data_error_naming_site_task_and_fix() -> None:
    keep = sorted(TRUTH.labelled & TRUTH.has_ehr)[:2]
    labels = SITE.labels.copy()
    labels.loc[~labels.index.isin(keep), "outcome"] = np.nan
    tiny = dataclasses.replace(SITE, labels=labels)
    with pytest.raises(DataError, match=r"site 'site-0', task 'readmission'.*empty.*at least 3"):
        build_task_data(tiny, "readmission")


def test_one_class_in_train_is_a_data_error() -> None:
    labels = SITE.labels.copy()
    labels.loc[labels["outcome"].notna(), "outcome"] = 0.0
    with pytest.raises(DataError, match=r"'readmission'.*only class 0.*other class"):
        build_task_data(dataclasses.replace(SITE, labels=labels), "readmission")


def test_missing_modality_and_unknown_task() -> None:
    no_images = dataclasses.replace(SITE, images=None)
    with pytest.raises(DataError, match="no imaging data.*'imaging_only'"):
        build_task_data(no_images, "imaging_only")
    td = build_task_data(no_images, "multimodal")  # multimodal: the mask says "absent"
    assert not td.train.mask[:, 1].any() and not td.train.tensors[1].any()
    with pytest.raises(ConfigError, match="no task 'nope'.*readmission"):
        build_task_data(SITE, "nope")


def test_ehr_index_conventions_both_count_as_missing() -> None:
    # the builder leaves half of the EHR-less patients out of the index and half as NaN rows
    nan_rows = [p for p in SITE.ehr.index if p not in TRUTH.has_ehr]
    absent = [p for p in SITE.patient_ids if p not in SITE.ehr.index]
    assert nan_rows and absent
    ids = set(_ids(build_task_data(SITE, "readmission")))
    assert ids.isdisjoint(nan_rows) and ids.isdisjoint(absent)


def test_dataset_constructors_validate_and_mask() -> None:
    with pytest.raises(ValueError, match="NaN"):
        TabularDataset(np.array([[np.nan]]), np.array([1.0]))
    with pytest.raises(ValueError, match="number of patients"):
        TabularDataset(np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="one channel"):
        ImageDataset(np.zeros((2, 3, 4, 4)), np.zeros(2))
    ds = MultimodalDataset(
        np.ones((2, 3)),
        np.ones((2, 1, 4, 4)),
        np.zeros((2, 0)),
        np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
        np.array([0.0, 1.0]),
    )
    x_ehr, x_img, x_gen, mask, y = ds[0]
    assert x_ehr.tolist() == [1.0, 1.0, 1.0] and not x_img.any() and x_gen.shape == (0,)
    assert not ds[1][0].any() and ds[1][1].all()


def test_ehr_columns_of_the_builder_match_the_schema() -> None:
    # guards the builder itself: SiteData.ehr holds the schema's columns in schema order
    names = [f.name for f in SITE.spec.feature_schema.ehr] + [
        f.name for f in SITE.spec.feature_schema.events
    ]
    assert tuple(names) == EHR_COLUMNS == tuple(SITE.ehr.columns)
    assert isinstance(SITE.ehr, pd.DataFrame)


def _assert_same_state(a: object, b: object, where: str) -> None:
    """Two encoder states equal, floats to 1e-12 relative, everything else exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-12), where
    else:
        assert a == b, where
