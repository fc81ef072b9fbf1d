"""Imaging: 2-D grey images with a lesion, a site-specific scanner, three file formats.

Clean image (values in [0, 1], ``S = image_size``, geometry scaled by ``S / 32``)
    A soft-edged body ellipse (centre ``S/2 + N(0, 0.02 S)`` per axis, semi-axes
    ``U(0.38, 0.44) S`` and ``U(0.32, 0.40) S``) of intensity ``0.12 + 0.26 body``, plus
    four smooth texture blobs (amplitude ``N(0, 0.04)``, width ``U(0.06, 0.15) S``) inside
    it. The lesion (when present) is a disc of radius ``r32 * S / 32`` pixels and height
    ``lesion_contrast`` with a logistic edge of width ``0.5 S / 32`` pixels, centred at a
    uniform angle and ``U(0, 0.6)`` of the way from the body centre to its edge.

Scanner (one per site, drawn from the site's ``scanner`` stream)
    ``grey = 4095 * clip(gain * blur(clean, blur_px) + offset + noise * N(0, 1), 0, 1)``,
    ``gain = exp(N(0, 0.12))``, ``offset ~ N(0, 0.03)``, ``noise ~ U(0.02, 0.06)``,
    ``blur_px ~ U(0.2, 1.2) * S / 32`` (Gaussian sd; lower effective resolution, same
    pixel grid). Grey levels are 12-bit scanner units in ``[0, 4095]``.

Encodings (registry :data:`ENCODERS`; every format yields the same grey levels)
    ``png``   16-bit greyscale PNG (Pillow mode ``I;16``), pixel = ``round(grey)``.
    ``npy``   ``float32`` array of ``grey`` (unrounded), shape ``(S, S)``.
    ``dicom`` Secondary Capture, MONOCHROME2, 16 bits allocated/stored, unsigned,
              stored value ``round(grey) + 1024`` with ``RescaleSlope = 1`` and
              ``RescaleIntercept = -1024``: apply the rescale (modality LUT) to get
              ``round(grey)``. UIDs derive from (seed, site, patient); no dates or times.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "GREY_MAX",
    "Scanner",
    "ImageEncoder",
    "ENCODERS",
    "draw_scanner",
    "render_clean",
    "apply_scanner",
    "gaussian_blur",
]

GREY_MAX = 4095.0
DICOM_INTERCEPT = -1024.0
_CHUNK = 64  # patients rendered at once (bounds memory for large images)


@dataclass(frozen=True)
class Scanner:
    """A site's scanner: gain, offset, noise sd (in [0, 1] units), blur sd (pixels)."""

    gain: float
    offset: float
    noise: float
    blur_px: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in asdict(self).items()}


def draw_scanner(rng: np.random.Generator, *, image_size: int) -> Scanner:
    """Draw one site's scanner parameters."""
    return Scanner(
        gain=float(np.exp(rng.normal(0.0, 0.12))),
        offset=float(rng.normal(0.0, 0.03)),
        noise=float(rng.uniform(0.02, 0.06)),
        blur_px=float(rng.uniform(0.2, 1.2) * image_size / 32.0),
    )


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a stack ``(n, H, W)`` with reflected edges.

    Examples
    --------
    >>> x = np.zeros((1, 9, 9)); x[0, 4, 4] = 1.0
    >>> y = gaussian_blur(x, 1.0)
    >>> bool(abs(y.sum() - 1.0) < 1e-9 and y[0, 4, 4] < 1.0)
    True
    """
    if sigma < 1e-3:
        return images.copy()
    radius = max(1, int(np.ceil(3.0 * sigma)))
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    out = images
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        size = out.shape[axis]
        acc = np.zeros_like(out, dtype=float)
        for k, w in enumerate(kernel):
            acc += w * np.take(padded, np.arange(k, k + size), axis=axis)
        out = acc
    return out


def render_clean(rng: np.random.Generator, lesions: pd.DataFrame, *, image_size: int) -> np.ndarray:
    """Clean images in [0, 1] for each row of ``lesions`` (columns ``lesion``,
    ``lesion_r32``, ``lesion_contrast``); shape ``(n, S, S)``."""
    n, s = len(lesions), image_size
    scale = s / 32.0
    yy, xx = np.mgrid[0:s, 0:s].astype(float) + 0.5
    cy = s / 2 + rng.normal(0.0, 0.02 * s, size=n)
    cx = s / 2 + rng.normal(0.0, 0.02 * s, size=n)
    ay = rng.uniform(0.38, 0.44, size=n) * s
    ax = rng.uniform(0.32, 0.40, size=n) * s
    blob_amp = rng.normal(0.0, 0.04, size=(n, 4))
    blob_w = rng.uniform(0.06, 0.15, size=(n, 4)) * s
    blob_q = np.sqrt(rng.uniform(0.0, 0.8, size=(n, 4)))
    blob_t = rng.uniform(0.0, 2 * np.pi, size=(n, 4))
    les_q = rng.uniform(0.0, 0.6, size=n)
    les_t = rng.uniform(0.0, 2 * np.pi, size=n)
    present = lesions["lesion"].to_numpy() == 1
    radius = lesions["lesion_r32"].to_numpy(dtype=float) * scale
    contrast = lesions["lesion_contrast"].to_numpy(dtype=float)
    out = np.empty((n, s, s), dtype=float)
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, min(n, lo + _CHUNK))
        c_y, c_x = cy[sl, None, None], cx[sl, None, None]
        a_y, a_x = ay[sl, None, None], ax[sl, None, None]
        rho = np.sqrt(((yy - c_y) / a_y) ** 2 + ((xx - c_x) / a_x) ** 2)
        body = 1.0 / (1.0 + np.exp(np.clip((rho - 1.0) / 0.03, -50, 50)))
        img = 0.12 + 0.26 * body
        for b in range(4):
            by = c_y + blob_q[sl, b, None, None] * a_y * np.sin(blob_t[sl, b, None, None])
            bx = c_x + blob_q[sl, b, None, None] * a_x * np.cos(blob_t[sl, b, None, None])
            d2 = (yy - by) ** 2 + (xx - bx) ** 2
            img += (
                body
                * blob_amp[sl, b, None, None]
                * np.exp(-0.5 * d2 / blob_w[sl, b, None, None] ** 2)
            )
        ly = c_y + les_q[sl, None, None] * a_y * np.sin(les_t[sl, None, None])
        lx = c_x + les_q[sl, None, None] * a_x * np.cos(les_t[sl, None, None])
        dist = np.sqrt((yy - ly) ** 2 + (xx - lx) ** 2)
        edge = 0.5 * scale
        disc = 1.0 / (1.0 + np.exp(np.clip((dist - radius[sl, None, None]) / edge, -50, 50)))
        img += np.where(present[sl, None, None], contrast[sl, None, None] * disc, 0.0)
        out[sl] = img
    return out


def apply_scanner(rng: np.random.Generator, clean: np.ndarray, scanner: Scanner) -> np.ndarray:
    """Grey levels (float32, ``[0, 4095]``) that the site's scanner records."""
    blurred = gaussian_blur(clean, scanner.blur_px)
    noisy = (
        scanner.gain * blurred + scanner.offset + scanner.noise * rng.standard_normal(clean.shape)
    )
    return (GREY_MAX * np.clip(noisy, 0.0, 1.0)).astype(np.float32)


class ImageEncoder(ABC):
    """Writes grey images (float32, ``[0, 4095]``) as files of one format."""

    suffix: str

    @abstractmethod
    def write(
        self, path: Path, grey: np.ndarray, *, patient_id: str, uid_entropy: tuple[str, ...]
    ) -> None:
        """Write ``grey`` to ``path`` (which ends in :attr:`suffix`)."""

    def write_all(
        self,
        folder: Path,
        patient_ids: Sequence[str],
        images: np.ndarray,
        *,
        uid_entropy: tuple[str, ...],
    ) -> list[str]:
        """Write ``<patient_id><suffix>`` per image into ``folder``; returns the names."""
        names = []
        for pid, grey in zip(patient_ids, images, strict=True):
            names.append(f"{pid}{self.suffix}")
            self.write(folder / names[-1], grey, patient_id=pid, uid_entropy=uid_entropy)
        return names


class PngEncoder(ImageEncoder):
    """16-bit greyscale PNG; pixel value = ``round(grey)``."""

    suffix = ".png"

    def write(
        self, path: Path, grey: np.ndarray, *, patient_id: str, uid_entropy: tuple[str, ...]
    ) -> None:
        from PIL import Image

        Image.fromarray(np.round(grey).astype(np.uint16)).save(path, format="PNG")


class NpyEncoder(ImageEncoder):
    """``numpy.save`` of the float32 grey levels."""

    suffix = ".npy"

    def write(
        self, path: Path, grey: np.ndarray, *, patient_id: str, uid_entropy: tuple[str, ...]
    ) -> None:
        np.save(path, np.ascontiguousarray(grey, dtype=np.float32))


class DicomEncoder(ImageEncoder):
    """Secondary Capture DICOM; stored = ``round(grey) + 1024``, rescale intercept -1024."""

    suffix = ".dcm"

    def write(
        self, path: Path, grey: np.ndarray, *, patient_id: str, uid_entropy: tuple[str, ...]
    ) -> None:
        self.write_all(path.parent, [patient_id], grey[None], uid_entropy=uid_entropy)

    def write_all(
        self,
        folder: Path,
        patient_ids: Sequence[str],
        images: np.ndarray,
        *,
        uid_entropy: tuple[str, ...],
    ) -> list[str]:
        from pydicom.uid import generate_uid

        ds = self._template(images.shape[1:])
        names = []
        for pid, grey in zip(patient_ids, images, strict=True):

            def uid(kind: str, pid: str = pid) -> str:
                return str(generate_uid(entropy_srcs=[*uid_entropy, pid, kind]))

            sop_uid = uid("sop")
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.SOPInstanceUID = sop_uid
            ds.StudyInstanceUID = uid("study")
            ds.SeriesInstanceUID = uid("series")
            ds.PatientID = pid
            ds.PatientName = f"SYNTHETIC^{pid}"
            ds.PixelData = (np.round(grey) - DICOM_INTERCEPT).astype("<u2").tobytes()
            names.append(f"{pid}{self.suffix}")
            ds.save_as(folder / names[-1], enforce_file_format=True)
        return names

    @staticmethod
    def _template(shape: tuple[int, ...]) -> Any:
        """Every attribute that does not depend on the patient."""
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyDate = ""
        ds.StudyTime = ""
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Modality = "OT"
        ds.ConversionType = "WSD"
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        ds.Manufacturer = "fedcare synthetic"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = shape
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = f"{DICOM_INTERCEPT:g}"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.WindowCenter = "2048"
        ds.WindowWidth = "4096"
        return ds


#: format name -> encoder; a new format is one class and one line here.
ENCODERS: dict[str, ImageEncoder] = {
    "png": PngEncoder(),
    "npy": NpyEncoder(),
    "dicom": DicomEncoder(),
}
