"""Encoders fitted on a site's train split only, then applied to every split.

Three encoders turn a site's raw values into finite ``float32`` arrays:

* :class:`TabularEncoder` -- EHR and event-derived features of the :class:`FeatureSchema`;
* :class:`GenomicsEncoder` -- the patients x genes (or variants) matrix;
* :class:`ImageNormalizer` -- grey-level images.

Each learns its statistics in :meth:`fit` from the **train** rows it is given (FLamby:
"normalise on train only") and nothing else; :meth:`transform` is then a pure function of
those statistics and its input. Output width and column order depend on the schema only, so
two sites sharing a schema encode patients into identically named and ordered columns.

Guarantees of every ``transform``: the output is ``float32`` and finite. Non-finite inputs
(``NaN``, ``±inf``) count as missing; standardised values are clipped to ``[-clip, clip]``
(default :data:`DEFAULT_CLIP` standard deviations), which also bounds extreme outliers.
Statistics are computed so they cannot overflow, and a column with no observed train value
gets neutral statistics (mean 0, std 1, median 0, mode 0) instead of ``NaN``.

Each encoder's fitted state is a plain ``dict`` of ``str``/``float``/``list`` values
(:meth:`state_dict`), JSON-serialisable, rebuilt with ``from_state``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from fedcare.common.encoding import MISSING_CATEGORY, MISSING_SUFFIX, encoded_names
from fedcare.common.errors import ConfigError, DataError
from fedcare.common.spec import EventFeature, Feature, GenomicsSchema

__all__ = [
    "DEFAULT_CLIP",
    "MISSING_SUFFIX",
    "MISSING_CATEGORY",
    "TabularEncoder",
    "GenomicsEncoder",
    "ImageNormalizer",
]

DEFAULT_CLIP = 10.0
"""Standardised values are clipped to ``[-DEFAULT_CLIP, DEFAULT_CLIP]``."""


_STATE_VERSION = 1


# --------------------------------------------------------------------------- statistics


def _as_float(series: pd.Series, what: str) -> np.ndarray:
    """``float64`` copy of ``series``, non-finite entries as ``NaN``.

    Raises :class:`DataError` naming ``what`` when a present value is not a number.
    """
    numeric = pd.to_numeric(series, errors="coerce")
    bad = numeric.isna().to_numpy() & ~series.isna().to_numpy()
    if bad.any():
        example = series[bad].iloc[0]
        raise DataError(
            f"{what} holds a value that is not a number ({example!r}); fix the data file "
            "or declare the feature categorical in the schema"
        )
    out = np.array(numeric.to_numpy(dtype=np.float64, na_value=np.nan), copy=True)
    out[~np.isfinite(out)] = np.nan
    return out


def _mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and population std of ``x`` (n, k), ``NaN`` = missing.

    Computed on values scaled into ``[-1, 1]`` so that no intermediate overflows; both
    results are finite. A column without observed values gets mean 0 and std 1; a
    constant column (std 0) gets std 1.
    """
    observed = ~np.isnan(x)
    count = observed.sum(axis=0)
    scale = np.max(np.where(observed, np.abs(x), 0.0), axis=0, initial=0.0)
    scale = np.where(scale > 0.0, scale, 1.0)
    u = np.where(observed, x / scale, 0.0)
    denom = np.maximum(count, 1)
    mean_u = u.sum(axis=0) / denom
    var_u = (np.where(observed, u - mean_u, 0.0) ** 2).sum(axis=0) / denom
    mean = mean_u * scale
    std = np.sqrt(var_u) * scale
    std = np.where(std > 0.0, std, 1.0)
    return mean, std


def _median(x: np.ndarray) -> float:
    """Median of the non-NaN values of the 1-D ``x`` (0.0 when none); never overflows."""
    v = np.sort(x[~np.isnan(x)])
    if v.size == 0:
        return 0.0
    mid = v.size // 2
    if v.size % 2:
        return float(v[mid])
    return float(v[mid - 1] / 2.0 + v[mid] / 2.0)


def _standardise(x: np.ndarray, mean: Any, std: Any, clip: float) -> np.ndarray:
    """``clip((x - mean) / std)``; ``x`` finite, ``std`` finite and > 0, so no ``NaN``."""
    with np.errstate(over="ignore"):
        z = (x - mean) / std
    return np.clip(z, -clip, clip)


def _check_clip(clip: float) -> float:
    clip = float(clip)
    if not (np.isfinite(clip) and clip > 0.0):
        raise ConfigError(f"clip must be a finite number above 0, got {clip}; e.g. 10.0")
    return clip


def _check_state(state: Mapping[str, Any], kind: str) -> None:
    if state.get("encoder") != kind or state.get("version") != _STATE_VERSION:
        raise ConfigError(
            f"encoder state is not a version-{_STATE_VERSION} {kind} state (got "
            f"encoder={state.get('encoder')!r}, version={state.get('version')!r}); "
            "re-fit the encoder or load a checkpoint written by this fedcare version"
        )


# ------------------------------------------------------------------ tabular column codecs


class _ColumnCodec(ABC):
    """Encodes one schema feature into a fixed block of columns.

    ``fit`` returns the feature's train statistics as a plain dict; ``transform`` is a pure
    function of those statistics and the column.
    """

    kind: ClassVar[str]

    def __init__(self, feature: Feature | EventFeature) -> None:
        self.feature = feature

    @abstractmethod
    def names(self) -> tuple[str, ...]:
        """Output column names, in output order."""

    @abstractmethod
    def fit(self, values: pd.Series) -> dict[str, float]:
        """Statistics learnt from the train column."""

    @abstractmethod
    def transform(self, values: pd.Series, stats: Mapping[str, float], clip: float) -> np.ndarray:
        """The ``(n, len(names()))`` float64 block for ``values``."""


_CODECS: dict[str, type[_ColumnCodec]] = {}


def _register(cls: type[_ColumnCodec]) -> type[_ColumnCodec]:
    _CODECS[cls.kind] = cls
    return cls


def _kind(feature: Feature | EventFeature) -> str:
    # Event features are aggregates of measurements (or counts): numeric.
    return getattr(feature, "kind", "numeric")


@_register
class _NumericCodec(_ColumnCodec):
    """Median imputation, train standardisation, plus a missing-indicator column."""

    kind = "numeric"

    def names(self) -> tuple[str, ...]:
        return encoded_names(self.feature)

    def fit(self, values: pd.Series) -> dict[str, float]:
        x = _as_float(values, f"feature {self.feature.name!r}")
        mean, std = _mean_std(x[:, None])
        return {"median": _median(x), "mean": float(mean[0]), "std": float(std[0])}

    def transform(self, values: pd.Series, stats: Mapping[str, float], clip: float) -> np.ndarray:
        x = _as_float(values, f"feature {self.feature.name!r}")
        missing = np.isnan(x)
        filled = np.where(missing, stats["median"], x)
        z = _standardise(filled, stats["mean"], stats["std"], clip)
        return np.column_stack([z, missing.astype(np.float64)])


@_register
class _BinaryCodec(_ColumnCodec):
    """0/1 kept as is, missing imputed with the train mode (ties: 0), plus an indicator."""

    kind = "binary"

    def names(self) -> tuple[str, ...]:
        return encoded_names(self.feature)

    def _values(self, values: pd.Series) -> np.ndarray:
        x = _as_float(values, f"binary feature {self.feature.name!r}")
        bad = ~np.isnan(x) & (x != 0.0) & (x != 1.0)
        if bad.any():
            raise DataError(
                f"binary feature {self.feature.name!r} holds {x[bad][0]!r}; it takes 0 or 1 "
                "only -- fix the data or declare it numeric in the schema"
            )
        return x

    def fit(self, values: pd.Series) -> dict[str, float]:
        x = self._values(values)
        ones = float(np.sum(x == 1.0))
        zeros = float(np.sum(x == 0.0))
        return {"mode": 1.0 if ones > zeros else 0.0}

    def transform(self, values: pd.Series, stats: Mapping[str, float], clip: float) -> np.ndarray:
        x = self._values(values)
        missing = np.isnan(x)
        return np.column_stack([np.where(missing, stats["mode"], x), missing.astype(np.float64)])


@_register
class _CategoricalCodec(_ColumnCodec):
    """One-hot over the schema's categories in schema order, plus a missing column.

    Nothing is learnt from the data. A value outside the schema's categories (which site
    validation should already have rejected) encodes as all zeros -- no category and not
    missing -- so it never borrows another category's column.
    """

    kind = "categorical"

    def __init__(self, feature: Feature | EventFeature) -> None:
        super().__init__(feature)
        categories = tuple(getattr(feature, "categories", None) or ())
        if MISSING_CATEGORY in categories:
            raise ConfigError(
                f"categorical feature {feature.name!r} lists the reserved category "
                f"{MISSING_CATEGORY!r}; rename that category in the schema"
            )
        self.categories = categories

    def names(self) -> tuple[str, ...]:
        return encoded_names(self.feature)

    def fit(self, values: pd.Series) -> dict[str, float]:
        return {}

    def transform(self, values: pd.Series, stats: Mapping[str, float], clip: float) -> np.ndarray:
        missing = values.isna().to_numpy()
        raw = values.to_numpy(dtype=object)
        as_text = np.array(
            ["" if m else str(v) for v, m in zip(raw, missing, strict=True)], dtype=object
        )
        blocks = [(~missing & (as_text == c)).astype(np.float64) for c in self.categories]
        blocks.append(missing.astype(np.float64))
        return np.column_stack(blocks)


# ---------------------------------------------------------------------------- encoders


def _feature_to_dict(feature: Feature | EventFeature) -> dict[str, Any]:
    source = "events" if isinstance(feature, EventFeature) else "ehr"
    return {"source": source, **feature.model_dump(mode="json", exclude_none=True)}


def _feature_from_dict(raw: Mapping[str, Any]) -> Feature | EventFeature:
    fields = {k: v for k, v in raw.items() if k != "source"}
    if raw.get("source") == "events":
        return EventFeature.model_validate(fields)
    return Feature.model_validate(fields)


class TabularEncoder:
    """Encodes EHR and event features into one fixed-width ``float32`` vector per patient.

    Columns, feature by feature in the order given (the schema's order):

    * numeric and event features: ``name`` -- value imputed with the train median, then
      standardised with the train mean/std of the *observed* values (std 0 -> 1), clipped
      to ``[-clip, clip]``; ``name__missing`` -- 1.0 where the value was missing;
    * binary: ``name`` -- 0/1, missing imputed with the train mode; ``name__missing``;
    * categorical: ``name=<category>`` for each schema category in schema order, then
      ``name=__missing__``; an unknown category encodes as all zeros.

    The missing indicators are always present, so the width is a function of the schema
    only, never of the data.

    Parameters
    ----------
    features:
        Schema features (:class:`Feature` / :class:`EventFeature`), in encoding order.
    clip:
        Bound on standardised values, in train standard deviations.

    Examples
    --------
    >>> import pandas as pd
    >>> from fedcare.common.spec import Feature
    >>> enc = TabularEncoder([
    ...     Feature(name="age", kind="numeric"),
    ...     Feature(name="sex", kind="categorical", categories=("F", "M")),
    ... ])
    >>> enc.feature_names
    ('age', 'age__missing', 'sex=F', 'sex=M', 'sex=__missing__')
    >>> train = pd.DataFrame({"age": [20.0, 40.0, None], "sex": ["M", None, "F"]})
    >>> enc.fit(train).transform(train).tolist()
    [[-1.0, 0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0, 0.0]]
    """

    def __init__(
        self, features: Sequence[Feature | EventFeature], *, clip: float = DEFAULT_CLIP
    ) -> None:
        self._features = tuple(features)
        names = [f.name for f in self._features]
        if len(set(names)) != len(names):
            raise ConfigError("TabularEncoder got a feature twice; pass each schema feature once")
        self._codecs = tuple(_CODECS[_kind(f)](f) for f in self._features)
        self._clip = _check_clip(clip)
        self._stats: tuple[dict[str, float], ...] | None = None

    @property
    def features(self) -> tuple[Feature | EventFeature, ...]:
        """The features encoded, in order."""
        return self._features

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Output column names, in output order (a function of the features only)."""
        return tuple(name for codec in self._codecs for name in codec.names())

    @property
    def width(self) -> int:
        """Number of output columns."""
        return len(self.feature_names)

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`from_state`) has set the statistics."""
        return self._stats is not None

    def _columns(self, df: pd.DataFrame) -> list[pd.Series]:
        absent = [f.name for f in self._features if f.name not in df.columns]
        if absent:
            raise DataError(
                f"the EHR table lacks schema feature(s) {', '.join(absent)}; add the "
                "column(s) (empty where unknown) or remove them from the schema"
            )
        return [df[f.name].reset_index(drop=True) for f in self._features]

    def fit(self, df: pd.DataFrame) -> TabularEncoder:
        """Learn every feature's statistics from ``df``, the site's **train** rows only.

        Returns ``self``. Columns not in the schema are ignored.
        """
        self._stats = tuple(
            codec.fit(col) for codec, col in zip(self._codecs, self._columns(df), strict=True)
        )
        return self

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """The ``(len(df), width)`` ``float32`` matrix, rows in ``df``'s order; finite."""
        if self._stats is None:
            raise RuntimeError("TabularEncoder.transform before fit; call fit(train_df) first")
        columns = self._columns(df)
        blocks = [
            codec.transform(col, stats, self._clip)
            for codec, col, stats in zip(self._codecs, columns, self._stats, strict=True)
        ]
        if not blocks:
            return np.zeros((len(df), 0), dtype=np.float32)
        return np.hstack(blocks).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable state: the features, ``clip`` and fitted statistics."""
        return {
            "encoder": "tabular",
            "version": _STATE_VERSION,
            "clip": self._clip,
            "features": [_feature_to_dict(f) for f in self._features],
            "stats": None if self._stats is None else [dict(s) for s in self._stats],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> TabularEncoder:
        """Rebuild an encoder from :meth:`state_dict` output."""
        _check_state(state, "tabular")
        try:
            encoder = cls([_feature_from_dict(f) for f in state["features"]], clip=state["clip"])
            stats = state["stats"]
            if stats is not None:
                if len(stats) != len(encoder._features):
                    raise ValueError("one statistics entry per feature is needed")
                encoder._stats = tuple({k: float(v) for k, v in s.items()} for s in stats)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"tabular encoder state is malformed ({e}); re-fit the encoder"
            ) from e
        return encoder


class GenomicsEncoder:
    """Per-feature standardisation of the genomics matrix with train statistics.

    Missing values are imputed with the train mean (so they encode as 0); ``dosage``
    matrices (0/1/2 allele counts) are treated as numeric like ``expression`` ones.
    Output columns are ``schema.features`` in schema order, values clipped to
    ``[-clip, clip]``.

    Parameters
    ----------
    schema:
        The federation's :class:`GenomicsSchema`.
    clip:
        Bound on standardised values, in train standard deviations.
    """

    def __init__(self, schema: GenomicsSchema, *, clip: float = DEFAULT_CLIP) -> None:
        self._schema = schema
        self._clip = _check_clip(clip)
        self._mean: np.ndarray | None = None
        self._std: np.ndarray | None = None

    @property
    def schema(self) -> GenomicsSchema:
        return self._schema

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._schema.features

    @property
    def width(self) -> int:
        return len(self._schema.features)

    @property
    def is_fitted(self) -> bool:
        return self._mean is not None

    def _matrix(self, df: pd.DataFrame) -> np.ndarray:
        absent = [g for g in self._schema.features if g not in df.columns]
        if absent:
            raise DataError(
                f"the genomics matrix lacks schema feature(s) {', '.join(absent[:5])}; add "
                "the column(s) (empty where unknown) or remove them from [schema.genomics]"
            )
        sub = df.loc[:, list(self._schema.features)]
        if all(pd.api.types.is_numeric_dtype(t) for t in sub.dtypes):  # the loaders' case
            out = np.array(sub.to_numpy(dtype=np.float64, na_value=np.nan), copy=True)
            out[~np.isfinite(out)] = np.nan
            return out
        out = np.empty((len(df), self.width), dtype=np.float64)
        for j, g in enumerate(self._schema.features):
            out[:, j] = _as_float(sub[g].reset_index(drop=True), f"genomics feature {g!r}")
        return out

    def fit(self, df: pd.DataFrame) -> GenomicsEncoder:
        """Learn per-feature mean/std from ``df``, the site's **train** rows only."""
        self._mean, self._std = _mean_std(self._matrix(df))
        return self

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """The ``(len(df), width)`` ``float32`` matrix; finite."""
        if self._mean is None or self._std is None:
            raise RuntimeError("GenomicsEncoder.transform before fit; call fit(train_df) first")
        x = self._matrix(df)
        x = np.where(np.isnan(x), self._mean, x)
        return _standardise(x, self._mean, self._std, self._clip).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {
            "encoder": "genomics",
            "version": _STATE_VERSION,
            "clip": self._clip,
            "schema": self._schema.model_dump(mode="json"),
            "mean": None if self._mean is None else self._mean.tolist(),
            "std": None if self._std is None else self._std.tolist(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> GenomicsEncoder:
        _check_state(state, "genomics")
        try:
            encoder = cls(GenomicsSchema.model_validate(state["schema"]), clip=state["clip"])
            if state["mean"] is not None:
                mean = np.asarray(state["mean"], dtype=np.float64)
                std = np.asarray(state["std"], dtype=np.float64)
                if mean.shape != (encoder.width,) or std.shape != (encoder.width,):
                    raise ValueError("mean/std length differs from the schema's features")
                encoder._mean, encoder._std = mean, std
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"genomics encoder state is malformed ({e}); re-fit the encoder"
            ) from e
        return encoder


class ImageNormalizer:
    """Standardises grey-level images with the global pixel mean/std of the train images.

    Non-finite pixels count as missing and encode as 0 (the train mean). Output is a
    ``float32`` array of shape ``(1, H, W)`` clipped to ``[-clip, clip]``.

    Parameters
    ----------
    shape:
        ``(H, W)`` of every image (the schema's ``imaging.shape``).
    clip:
        Bound on standardised values, in train standard deviations.
    """

    def __init__(self, shape: tuple[int, int], *, clip: float = DEFAULT_CLIP) -> None:
        self._shape = (int(shape[0]), int(shape[1]))
        self._clip = _check_clip(clip)
        self._mean: float | None = None
        self._std: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (1, *self._shape)

    @property
    def is_fitted(self) -> bool:
        return self._mean is not None

    def _pixels(self, image: np.ndarray) -> np.ndarray:
        arr = np.asarray(image)
        if arr.shape != self._shape:
            raise DataError(
                f"an image has shape {arr.shape}, but the schema's imaging.shape is "
                f"{self._shape}; resize the images or fix [schema.imaging]"
            )
        out = arr.astype(np.float64)
        out[~np.isfinite(out)] = np.nan
        return out

    def fit(self, images: Iterable[np.ndarray]) -> ImageNormalizer:
        """Learn the global pixel mean/std from ``images``, the **train** images only."""
        pixels = [self._pixels(img).ravel() for img in images]
        flat = np.concatenate(pixels) if pixels else np.empty(0, dtype=np.float64)
        mean, std = _mean_std(flat[:, None])
        self._mean, self._std = float(mean[0]), float(std[0])
        return self

    def transform(self, image: np.ndarray) -> np.ndarray:
        """One image as a finite ``float32`` array of shape ``(1, H, W)``."""
        if self._mean is None or self._std is None:
            raise RuntimeError("ImageNormalizer.transform before fit; call fit(train_images)")
        x = self._pixels(image)
        x = np.where(np.isnan(x), self._mean, x)
        z = _standardise(x, self._mean, self._std, self._clip)
        return z.astype(np.float32).reshape(self.output_shape)

    def transform_many(self, images: Iterable[np.ndarray]) -> np.ndarray:
        """Images stacked as ``(n, 1, H, W)`` ``float32``."""
        out = [self.transform(img) for img in images]
        if not out:
            return np.zeros((0, *self.output_shape), dtype=np.float32)
        return np.stack(out)

    def state_dict(self) -> dict[str, Any]:
        return {
            "encoder": "image",
            "version": _STATE_VERSION,
            "clip": self._clip,
            "shape": list(self._shape),
            "mean": self._mean,
            "std": self._std,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ImageNormalizer:
        _check_state(state, "image")
        try:
            shape = tuple(int(s) for s in state["shape"])
            if len(shape) != 2:
                raise ValueError(f"shape {shape} is not (H, W)")
            encoder = cls((shape[0], shape[1]), clip=state["clip"])
            if state["mean"] is not None:
                encoder._mean, encoder._std = float(state["mean"]), float(state["std"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"image normalizer state is malformed ({e}); re-fit it") from e
        return encoder
