"""Reading one grey-level image: PNG (8 or 16 bit), NumPy ``.npy`` or DICOM.

Readers are registered by file extension; a new format is one function and one
:func:`register_image_reader` line. A file with an unknown extension that carries the
DICOM magic bytes is read as DICOM (DICOM files often have no extension).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedcare.common.errors import DataError

__all__ = ["ImageReader", "register_image_reader", "image_suffixes", "read_image"]

ImageReader = Callable[[Path], np.ndarray]
_READERS: dict[str, ImageReader] = {}

# Pillow modes that hold one grey level per pixel.
_GREY_PNG_MODES = frozenset({"L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def register_image_reader(*suffixes: str) -> Callable[[ImageReader], ImageReader]:
    """Register ``reader`` for the given lower-case extensions (``".png"``)."""

    def decorate(reader: ImageReader) -> ImageReader:
        for suffix in suffixes:
            _READERS[suffix.lower()] = reader
        return reader

    return decorate


def image_suffixes() -> tuple[str, ...]:
    """The extensions a reader is registered for."""
    return tuple(sorted(_READERS))


@register_image_reader(".png")
def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode not in _GREY_PNG_MODES:
            raise ValueError(
                f"colour or palette image (Pillow mode {image.mode}); save it as an 8- or "
                "16-bit greyscale PNG"
            )
        return np.asarray(image)


@register_image_reader(".npy")
def _read_npy(path: Path) -> np.ndarray:
    array = np.load(path, allow_pickle=False)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(
        array
    ):
        raise ValueError(f"array of dtype {array.dtype}; save a real-valued numeric array")
    return array


@register_image_reader(".dcm", ".dicom")
def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    dataset = pydicom.dcmread(path)
    pixels = np.asarray(dataset.pixel_array, dtype=np.float64)
    slope = dataset.get("RescaleSlope")
    intercept = dataset.get("RescaleIntercept")
    if slope is not None:
        pixels = pixels * float(slope)
    if intercept is not None:
        pixels = pixels + float(intercept)
    return pixels


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def read_image(path: str | Path) -> np.ndarray:
    """Read one image as a float32 array of raw grey levels.

    DICOM pixels have ``RescaleSlope``/``RescaleIntercept`` applied when the file
    carries them. The shape is not checked here (validation compares it with the
    schema).

    Raises
    ------
    DataError
        When the file is absent, its format is not supported, or it cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file; add it or fix the imaging labels table")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        if _is_dicom(path):
            reader = _read_dicom
        else:
            raise DataError(
                f"{path}: unsupported image format {path.suffix or '(no extension)'!r}; "
                f"convert it to one of {', '.join(image_suffixes())}"
            )
    try:
        array = reader(path)
    except Exception as e:  # noqa: BLE001 - decoders raise anything on a corrupt file
        raise DataError(
            f"{path}: cannot read the image ({e}); re-export it as a valid "
            f"{path.suffix.lstrip('.').upper() or 'DICOM'} file"
        ) from e
    return np.asarray(array, dtype=np.float32)
