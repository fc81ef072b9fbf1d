"""Encoders: reference statistics, schema-fixed columns, finite output, serialisable state."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.client.data.preprocess import (
    DEFAULT_CLIP,
    GenomicsEncoder,
    ImageNormalizer,
    TabularEncoder,
)
from fedcare.common.errors import ConfigError, DataError
from fedcare.common.spec import EventFeature, Feature, GenomicsSchema

AGE = Feature(name="age", kind="numeric", min=0, max=120)
COLOUR = Feature(name="colour", kind="categorical", categories=("red", "blue", "green"))
SMOKER = Feature(name="smoker", kind="binary")
HR = EventFeature(name="hr_mean", code="HR", agg="mean")
FEATURES = (AGE, COLOUR, SMOKER, HR)
NAMES = (
    "age",
    "age__missing",
    "colour=red",
    "colour=blue",
    "colour=green",
    "colour=__missing__",
    "smoker",
    "smoker__missing",
    "hr_mean",
    "hr_mean__missing",
)
nan = float("nan")


def frame(**cols: list) -> pd.DataFrame:
    return pd.DataFrame(cols)


def test_names_and_width_are_a_function_of_the_schema_only() -> None:
    site_a = frame(age=[30.0, 50.0], colour=["red", "red"], smoker=[1.0, 0.0], hr_mean=[70.0, 90.0])
    site_b = frame(  # other values, an all-missing column, an unseen category level
        age=[nan, nan, nan],
        colour=[None, "green", "green"],
        smoker=[nan, 1.0, 1.0],
        hr_mean=[200.0, 0.0, nan],
    )
    a = TabularEncoder(FEATURES).fit(site_a)
    b = TabularEncoder(FEATURES).fit(site_b)
    assert a.feature_names == b.feature_names == NAMES
    assert a.transform(site_b).shape == (3, len(NAMES))
    assert b.transform(site_a).shape == (2, len(NAMES))


def test_one_hot_follows_schema_order_with_missing_and_unseen() -> None:
    enc = TabularEncoder([COLOUR]).fit(frame(colour=["red"]))
    out = enc.transform(frame(colour=["green", "red", None, "blue", "purple"]))
    expected = np.array(
        [
            [0, 0, 1, 0],  # green is the schema's third category
            [1, 0, 0, 0],
            [0, 0, 0, 1],  # missing
            [0, 1, 0, 0],
            [0, 0, 0, 0],  # unseen: no category, not missing
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(out, expected)
    assert enc.feature_names == ("colour=red", "colour=blue", "colour=green", "colour=__missing__")


def test_numeric_matches_a_numpy_reference() -> None:
    train = np.array([12.0, nan, 40.0, 33.0, np.inf, 18.0, 90.0])
    enc = TabularEncoder([AGE]).fit(frame(age=train))
    observed = train[np.isfinite(train)]
    mean, std, median = observed.mean(), observed.std(), np.median(observed)
    state = enc.state_dict()["stats"][0]
    assert state["mean"] == pytest.approx(mean)
    assert state["std"] == pytest.approx(std)
    assert state["median"] == pytest.approx(median)

    other = np.array([nan, 12.0, 1000.0, -np.inf])
    out = enc.transform(frame(age=other))
    filled = np.where(np.isfinite(other), other, median)
    ref = np.clip((filled - mean) / std, -DEFAULT_CLIP, DEFAULT_CLIP)
    np.testing.assert_allclose(out[:, 0], ref, rtol=1e-6)
    np.testing.assert_array_equal(out[:, 1], [1, 0, 0, 1])
    assert out[2, 0] == DEFAULT_CLIP  # an extreme outlier is clipped


def test_all_missing_and_constant_columns_give_no_nan() -> None:
    enc = TabularEncoder([AGE, SMOKER, HR]).fit(
        frame(age=[nan, nan], smoker=[nan, nan], hr_mean=[72.0, 72.0])
    )
    out = enc.transform(frame(age=[nan, 5.0], smoker=[nan, 1.0], hr_mean=[72.0, nan]))
    assert np.isfinite(out).all()
    # all-missing numeric: mean 0 / std 1 / median 0; constant column: std 1, centred
    np.testing.assert_allclose(out, [[0, 1, 0, 1, 0, 0], [5, 0, 1, 0, 0, 1]])


def test_binary_is_imputed_with_the_train_mode() -> None:
    ones = TabularEncoder([SMOKER]).fit(frame(smoker=[1.0, 1.0, 0.0, nan]))
    zeros = TabularEncoder([SMOKER]).fit(frame(smoker=[1.0, 0.0, 0.0]))
    tie = TabularEncoder([SMOKER]).fit(frame(smoker=[1.0, 0.0]))
    probe = frame(smoker=[nan, 0.0, 1.0])
    np.testing.assert_array_equal(ones.transform(probe), [[1, 1], [0, 0], [1, 0]])
    np.testing.assert_array_equal(zeros.transform(probe)[:, 0], [0, 0, 1])
    np.testing.assert_array_equal(tie.transform(probe)[:, 0], [0, 0, 1])


def test_bad_values_and_absent_columns_are_data_errors() -> None:
    enc = TabularEncoder([AGE, SMOKER]).fit(frame(age=[1.0], smoker=[0.0]))
    with pytest.raises(DataError, match="'smoker'.*0 or 1"):
        enc.transform(frame(age=[1.0], smoker=[2.0]))
    with pytest.raises(DataError, match="'age'.*not a number"):
        enc.transform(frame(age=["old"], smoker=[0.0]))
    with pytest.raises(DataError, match="lacks schema feature.*smoker"):
        enc.transform(frame(age=[1.0]))
    with pytest.raises(RuntimeError, match="fit"):
        TabularEncoder([AGE]).transform(frame(age=[1.0]))
    with pytest.raises(ConfigError, match="clip"):
        TabularEncoder([AGE], clip=0.0)


def test_transform_is_row_wise_and_keeps_row_order() -> None:
    train = frame(age=[20.0, 40.0], colour=["red", "blue"], smoker=[1.0, 0.0], hr_mean=[60.0, 80.0])
    enc = TabularEncoder(FEATURES).fit(train)
    both = pd.concat([train, frame(age=[nan], colour=[None], smoker=[nan], hr_mean=[1e9])])
    np.testing.assert_array_equal(enc.transform(both)[:2], enc.transform(train))
    np.testing.assert_array_equal(enc.transform(train.iloc[::-1]), enc.transform(train)[::-1])


def test_tabular_state_round_trips_through_json() -> None:
    train = frame(
        age=[20.0, nan, 70.0],
        colour=["red", None, "blue"],
        smoker=[1.0, 1.0, 0.0],
        hr_mean=[60.0, 80.0, nan],
    )
    enc = TabularEncoder(FEATURES).fit(train)
    state = json.loads(json.dumps(enc.state_dict()))
    again = TabularEncoder.from_state(state)
    assert again.feature_names == enc.feature_names
    assert isinstance(again.features[3], EventFeature)
    np.testing.assert_array_equal(again.transform(train), enc.transform(train))
    with pytest.raises(ConfigError, match="re-fit"):
        TabularEncoder.from_state({**state, "stats": state["stats"][:1]})
    with pytest.raises(ConfigError, match="tabular"):
        TabularEncoder.from_state({**state, "encoder": "image"})


# ----------------------------------------------------------------- hypothesis: no NaN/inf

any_float = st.floats(allow_nan=True, allow_infinity=True, width=64)


@st.composite
def raw_tables(draw: st.DrawFn) -> pd.DataFrame:
    n = draw(st.integers(min_value=0, max_value=12))
    col = lambda s: draw(st.lists(s, min_size=n, max_size=n))  # noqa: E731
    return frame(
        age=col(any_float),
        colour=col(st.sampled_from(["red", "blue", "green", "mauve", None])),
        smoker=col(st.sampled_from([0.0, 1.0, nan])),
        hr_mean=col(any_float),
    )


@settings(max_examples=80, deadline=None)
@given(train=raw_tables(), other=raw_tables())
def test_tabular_output_is_always_finite_float32(train: pd.DataFrame, other: pd.DataFrame) -> None:
    enc = TabularEncoder(FEATURES).fit(train)
    for df in (train, other):
        out = enc.transform(df)
        assert out.dtype == np.float32 and out.shape == (len(df), len(NAMES))
        assert np.isfinite(out).all()
        assert np.abs(out).max(initial=0.0) <= DEFAULT_CLIP
        # the indicators say exactly which raw values were missing (NaN or inf)
        age = df["age"].to_numpy(dtype=float)
        np.testing.assert_array_equal(out[:, 1], ~np.isfinite(age))
    assert all(np.isfinite(v) for s in enc.state_dict()["stats"] for v in s.values())


@settings(max_examples=40, deadline=None)
@given(
    x=st.lists(st.floats(-1e6, 1e6) | st.just(nan), min_size=1, max_size=30),
    extra=st.lists(st.floats(-1e9, 1e9), min_size=1, max_size=10),
)
def test_fitted_state_comes_from_the_rows_given_only(x: list[float], extra: list[float]) -> None:
    """Rows never passed to fit change neither the statistics nor the train encoding."""
    train = frame(age=x)
    enc = TabularEncoder([AGE]).fit(train)
    state = enc.state_dict()
    before = enc.transform(train)
    enc.transform(frame(age=extra))  # encoding other rows must not update anything
    assert enc.state_dict() == state
    np.testing.assert_array_equal(enc.transform(train), before)
    observed = np.array([v for v in x if np.isfinite(v)])
    if observed.size:
        assert state["stats"][0]["mean"] == pytest.approx(observed.mean(), rel=1e-9, abs=1e-6)


# ------------------------------------------------------------------------------ genomics


def test_genomics_standardises_per_gene_with_train_stats() -> None:
    schema = GenomicsSchema(kind="expression", features=("b", "a", "c"))
    train = pd.DataFrame(
        {
            "a": [1.0, 2.0, 3.0],
            "b": [10.0, nan, 30.0],
            "c": [nan, nan, nan],
            "ignored": [0.0, 0.0, 0.0],
        }
    )
    enc = GenomicsEncoder(schema).fit(train)
    assert enc.feature_names == ("b", "a", "c")
    probe = pd.DataFrame({"c": [4.0, nan], "a": [4.0, nan], "b": [nan, 20.0]})
    out = enc.transform(probe)
    a_ref = (np.array([4.0, 2.0]) - 2.0) / np.std([1.0, 2.0, 3.0])
    np.testing.assert_allclose(out[:, 1], a_ref, rtol=1e-6)
    np.testing.assert_allclose(out[:, 0], [0.0, 0.0])  # missing -> train mean -> 0
    np.testing.assert_allclose(out[:, 2], [4.0, 0.0])  # no train value: mean 0, std 1
    assert out.dtype == np.float32


def test_genomics_dosage_and_state_round_trip() -> None:
    schema = GenomicsSchema(kind="dosage", features=("rs1", "rs2"))
    train = pd.DataFrame({"rs1": [0.0, 1.0, 2.0, 2.0], "rs2": [0.0, 0.0, 0.0, 0.0]})
    enc = GenomicsEncoder(schema).fit(train)
    out = enc.transform(train)
    ref = (train["rs1"] - 1.25) / train["rs1"].std(ddof=0)
    np.testing.assert_allclose(out[:, 0], ref, rtol=1e-6)
    np.testing.assert_array_equal(out[:, 1], 0.0)
    again = GenomicsEncoder.from_state(json.loads(json.dumps(enc.state_dict())))
    np.testing.assert_array_equal(again.transform(train), out)
    with pytest.raises(DataError, match="rs2"):
        enc.transform(train[["rs1"]])


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.lists(any_float, min_size=3, max_size=3), min_size=0, max_size=10),
    probe=st.lists(st.lists(any_float, min_size=3, max_size=3), min_size=1, max_size=5),
)
def test_genomics_output_is_always_finite(rows: list, probe: list) -> None:
    schema = GenomicsSchema(kind="expression", features=("x", "y", "z"))
    enc = GenomicsEncoder(schema).fit(pd.DataFrame(rows, columns=["x", "y", "z"]))
    out = enc.transform(pd.DataFrame(probe, columns=["x", "y", "z"]))
    assert out.shape == (len(probe), 3) and np.isfinite(out).all()


# -------------------------------------------------------------------------------- images


def test_images_use_the_global_train_pixel_statistics() -> None:
    rng = np.random.default_rng(0)
    train = [rng.normal(100, 20, (6, 5)).astype(np.float32) for _ in range(4)]
    norm = ImageNormalizer((6, 5)).fit(train)
    pixels = np.concatenate([im.ravel().astype(np.float64) for im in train])
    probe = rng.normal(120, 20, (6, 5)).astype(np.float32)
    probe[0, 0] = np.nan
    out = norm.transform(probe)
    assert out.shape == (1, 6, 5) and out.dtype == np.float32
    ref = (probe.astype(np.float64) - pixels.mean()) / pixels.std()
    np.testing.assert_allclose(out[0, 1:], ref[1:], rtol=1e-5)
    assert out[0, 0, 0] == 0.0  # a NaN pixel is imputed with the train mean
    assert norm.transform_many(train).shape == (4, 1, 6, 5)
    again = ImageNormalizer.from_state(json.loads(json.dumps(norm.state_dict())))
    np.testing.assert_array_equal(again.transform(probe), out)


def test_images_of_the_wrong_shape_and_degenerate_train_sets() -> None:
    norm = ImageNormalizer((4, 4)).fit([np.full((4, 4), 7.0)])
    np.testing.assert_array_equal(norm.transform(np.full((4, 4), 7.0)), 0.0)
    with pytest.raises(DataError, match=r"\(5, 4\).*\(4, 4\)"):
        norm.transform(np.zeros((5, 4)))
    empty = ImageNormalizer((4, 4)).fit([])
    assert np.isfinite(empty.transform(np.full((4, 4), np.inf))).all()
    assert empty.transform_many([]).shape == (0, 1, 4, 4)


@settings(max_examples=30, deadline=None)
@given(
    pixels=st.lists(any_float, min_size=16, max_size=16),
    probe=st.lists(any_float, min_size=16, max_size=16),
)
def test_image_output_is_always_finite(pixels: list[float], probe: list[float]) -> None:
    norm = ImageNormalizer((4, 4)).fit([np.array(pixels).reshape(4, 4)])
    out = norm.transform(np.array(probe).reshape(4, 4))
    assert out.dtype == np.float32 and np.isfinite(out).all()
