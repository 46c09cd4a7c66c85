"""DICOM pixels to model input, the way a radiology viewer shows them.

decode (pydicom + pylibjpeg plugins) -> Modality LUT -> VOI (config preset > the dataset's own
window or VOI LUT > percentile window) -> MONOCHROME1 inversion -> RGB for colour -> resize
(letterbox or centre crop) -> three channels -> normalise. Every LUT step is a `pydicom.pixels`
function; this module only chooses which one applies and maps the result to [0, 1].
Training (dxnode.training.train) goes through the same functions, so there is no train/serve skew.
Everything here is NumPy and Pillow: serving needs no torch.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing

from dxnode.bounds import (
    MB,
    DeclaredSizeError,
    all_finite,
    check_codestreams,
    check_deflated_file,
    check_pixel_attributes,
    check_rescale,
    number_of_frames,
    usable_window,
)
from dxnode.config import PipelineSettings
from dxnode.pixels import j2k

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
# Changes a LINEAR window (center, width) before it is applied: training's window jitter.
WindowAdjust = Callable[[float, float], tuple[float, float]]
_VOI_FULL_SCALE = 65535.0  # output range of the synthetic VOI datasets below (16-bit unsigned)

# SOP classes that carry no image for the model, whatever else they hold (PS3.4 Annex B).
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.104.2": "Encapsulated CDA",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT Plan",
    "1.2.840.10008.5.1.4.1.1.481.8": "RT Ion Plan",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.481.4": "RT Beams Treatment Record",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose",
    "1.2.840.10008.5.1.4.1.1.66": "Raw Data",
    "1.2.840.10008.5.1.4.1.1.66.1": "Spatial Registration",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
}
NON_IMAGE_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.88.": "Structured Report",
    "1.2.840.10008.5.1.4.1.1.11.": "Presentation State",
    "1.2.840.10008.5.1.4.1.1.9.": "Waveform",
}


class PipelineError(Exception):
    """An instance cannot become model input; the message is the specific reason, on one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(" ".join(str(reason).split())[:500])


def _three(values: Any) -> tuple[float, float, float]:
    """Three floats (a per-channel mean or std) from a manifest list."""
    a, b, c = (float(v) for v in values)
    return a, b, c


@dataclass(frozen=True)
class Preprocessing:
    """How a bundle wants its input made (stored in the bundle manifest)."""

    input_size: int = 224
    resize: str = "letterbox"  # or "center_crop"
    channels: str = "replicate"  # or "windows": one (center, width) window per channel
    windows: tuple[tuple[float, float], ...] = ()
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.resize not in ("letterbox", "center_crop"):
            raise ValueError(f"preprocessing.resize must be letterbox or center_crop, not {self.resize!r}")
        if self.channels not in ("replicate", "windows"):
            raise ValueError(f"preprocessing.channels must be replicate or windows, not {self.channels!r}")
        if self.channels == "windows" and len(self.windows) != 3:
            raise ValueError("preprocessing.channels = windows needs three (center, width) windows")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Read the manifest form back."""
        return cls(
            input_size=int(d.get("input_size", 224)),
            resize=d.get("resize", "letterbox"),
            channels=d.get("channels", "replicate"),
            windows=tuple((float(w[0]), float(w[1])) for w in d.get("windows", ())),
            mean=_three(d.get("mean", cls.mean)),
            std=_three(d.get("std", cls.std)),
        )


@dataclass
class Frame:
    """One model input at decoded resolution (source size, or a reduced JPEG 2000 level).

    display is the windowed image the heatmap is drawn on: image's extent, downsampled
    (antialiased) so that its longest side is at most the display_max_side it was read with.
    """

    image: np.ndarray  # HxWx3 float32 in [0, 1]: the model channels
    display: np.ndarray  # hxwx3 uint8: the windowed image as a viewer shows it, at most HxW
    frame_index: int
    sop_instance_uid: str = ""
    window: tuple[float, float] | None = field(default=None)  # the VOI window used, if one
    notes: tuple[str, ...] = ()  # what was done instead of what the header asked (e.g. an unusable window)
    image_shape: tuple[int, int] = (0, 0)  # H, W of image; kept when image is dropped (see without_image)

    def __post_init__(self) -> None:
        if self.image.size:
            self.image_shape = (int(self.image.shape[0]), int(self.image.shape[1]))

    def without_image(self) -> Frame:
        """This frame with only its display image (and the shape of its model image): what a heatmap needs."""
        return replace(self, image=np.zeros((0, 0, 3), np.float32))


def skip_reason(ds: Dataset, settings: PipelineSettings) -> str | None:
    """Why this instance does not go to the model (None: it does). Looks at the header only.

    PipelineError when the header values it reads cannot be read (pydicom converts them on access)."""
    try:
        return _skip_reason(ds, settings)
    except Exception as exc:
        raise PipelineError(f"header not readable: {type(exc).__name__}: {exc}"[:300]) from exc


def _skip_reason(ds: Dataset, settings: PipelineSettings) -> str | None:
    """skip_reason's checks, in order."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in NON_IMAGE_SOP_CLASSES:
        return f"not an image: {NON_IMAGE_SOP_CLASSES[sop_class]}"
    for prefix, name in NON_IMAGE_PREFIXES.items():
        if sop_class.startswith(prefix):
            return f"not an image: {name}"
    if "PixelData" not in ds:
        return "no pixel data" + (
            " (float or double float pixel data is not supported)"
            if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
            else ""
        )
    modality = str(ds.get("Modality", ""))
    if settings.modalities and modality not in settings.modalities:
        return f"modality {modality or '(none)'} is not in [pipeline] modalities"
    if settings.sop_classes and sop_class not in settings.sop_classes:
        return f"SOP class {sop_class} is not in [pipeline] sop_classes"
    body_part = str(ds.get("BodyPartExamined", "")).upper()
    if settings.body_parts and body_part not in {b.upper() for b in settings.body_parts}:
        return f"body part {body_part or '(none)'} is not in [pipeline] body_parts"
    if settings.photometric:
        photometric = str(ds.get("PhotometricInterpretation", "")).upper()
        if photometric not in {p.upper() for p in settings.photometric}:
            return (
                f"photometric {photometric or '(none)'} is not one the model takes ({'/'.join(settings.photometric)})"
            )
    if settings.min_rows or settings.min_columns:
        try:
            rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        except (TypeError, ValueError):
            return "Rows/Columns are not numbers"
        if rows < settings.min_rows or columns < settings.min_columns:
            return (
                f"{rows} x {columns} pixels is below the model's minimum {settings.min_rows} x {settings.min_columns}"
            )
    return None


def frame_indices(n_frames: int, max_frames: int) -> list[int]:
    """At most max_frames frame indices, evenly spaced over the instance."""
    if n_frames <= max_frames:
        return list(range(n_frames))
    return sorted({round(i) for i in np.linspace(0, n_frames - 1, max_frames)})


def decoder_panic(exc: BaseException) -> bool:
    """A Rust decoder's panic on this data (pyo3's PanicException, e.g. pylibjpeg-rle on segments longer
    than Rows x Columns): a BaseException, so ``except Exception`` lets it through, yet bad input like any other."""
    return type(exc).__name__ == "PanicException"


def decode_frames(ds: Dataset, indices: list[int], n_frames: int) -> dict[int, np.ndarray]:
    """The chosen frames, decoded (YBR_* arrives as RGB); only those frames when it is a subset."""
    try:
        if len(indices) == n_frames:
            arr = ds.pixel_array
            return {i: (arr if n_frames == 1 else arr[i]) for i in indices}
        frames = {}
        for i in indices:  # a long cine or multi-frame CT: never hold every frame in memory
            ds.pixel_array_options(index=i)
            frames[i] = ds.pixel_array
        ds.pixel_array_options(index=None)
        return frames
    except BaseException as exc:
        if not isinstance(exc, Exception) and not decoder_panic(exc):
            raise
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts)) if ts else "unknown transfer syntax"
        raise PipelineError(f"cannot decode pixel data ({name}): {exc}") from exc


@dataclass(frozen=True)
class J2KReduce:
    """How far a JPEG 2000 image may be reduced: longest side at most max_side, shortest >= min_side."""

    max_side: int
    min_side: int
    threads: int


def j2k_reduce(settings: PipelineSettings, prep: Preprocessing) -> J2KReduce | None:
    """The reduced-decode bounds for this config and bundle (None: always full size)."""
    if not settings.decode_max_side:
        return None
    return J2KReduce(settings.decode_max_side, prep.input_size, settings.j2k_threads or j2k.default_threads())


def reduction_level(rows: int, columns: int, available: int, reduce: J2KReduce) -> int:
    """Fewest halvings that bring the longest side to max_side, keeping the shortest >= min_side."""
    level = 0
    while level < available and -(-max(rows, columns) // 2**level) > reduce.max_side:
        level += 1
    while level > 0 and min(rows, columns) // 2**level < reduce.min_side:
        level -= 1
    return level


def decode_j2k_reduced(
    ds: Dataset, indices: list[int], n_frames: int, reduce: J2KReduce
) -> dict[int, np.ndarray] | None:
    """Grayscale JPEG 2000 frames decoded at a reduced resolution level, with several threads.

    None when full size is needed or the codestream is not plain (colour, a sign or precision
    other than the header's, a library missing): the caller then decodes full size with pydicom.
    Values keep the stored-pixel scale (the 5/3 and 9/7 low-pass filters have unit DC gain), so
    the Modality LUT, VOI and MONOCHROME1 steps apply unchanged.
    """
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if (
        ts not in j2k.J2K_TRANSFER_SYNTAXES
        or "PixelData" not in ds
        or int(ds.get("SamplesPerPixel", 1)) != 1
        or str(ds.get("PhotometricInterpretation", "")).upper() not in ("MONOCHROME1", "MONOCHROME2")
        or max(rows, columns) <= reduce.max_side
        or j2k.library() is None
    ):
        return None
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    bits_allocated, bits_stored = int(ds.get("BitsAllocated", 16)), int(ds.get("BitsStored", 16))
    dtype = np.dtype(f"{'i' if signed else 'u'}{max(1, bits_allocated // 8)}")
    frames = {}
    for i in indices:
        cs = j2k.codestream(get_frame(ds.PixelData, i, number_of_frames=n_frames))
        level = reduction_level(rows, columns, j2k.decomposition_levels(cs) if cs else 0, reduce)
        if cs is None or level == 0:
            return None
        decoded = j2k.decode(cs, level, reduce.threads)
        if decoded is None or decoded[2] != signed or decoded[1] > bits_stored:
            return None
        frames[i] = decoded[0].astype(dtype)
    return frames


# What a malformed encapsulation (pydicom's get_frame) or header value raises on the reduced-decode
# path; anything else there is a bug and propagates (the decoder itself answers None, not raises).
J2K_HEADER_ERRORS = (ValueError, TypeError, struct.error, EOFError)
_fallback_reasons: set[str] = set()


def _note_full_size_fallback(exc: BaseException) -> None:
    """Log, once per kind of reason per process, why the reduced JPEG 2000 decode fell back to full size."""
    text = str(exc).strip()
    reason = f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__
    if reason not in _fallback_reasons and len(_fallback_reasons) < 100:
        _fallback_reasons.add(reason)
        log.warning("reduced JPEG 2000 decode fell back to full size: %s", reason)


def _check_decoded_shape(frame: np.ndarray, ds: Dataset, samples: int) -> None:
    """PipelineError unless a decoded frame is Rows x Columns (x Samples per Pixel) as the header says."""
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    expected = (rows, columns) if samples == 1 else (rows, columns, samples)
    if tuple(frame.shape) != expected:
        raise PipelineError(
            f"decoded pixel data is {' x '.join(map(str, frame.shape))}, the header says {' x '.join(map(str, expected))}"
        )


def modality_values(
    ds: Dataset, max_frames: int, indices: list[int] | None = None, reduce: J2KReduce | None = None
) -> list[tuple[int, np.ndarray]]:
    """Decoded frames after the Modality LUT (grayscale, float) or as RGB (colour, HxWx3 float 0-1).

    indices picks frames (0-based) instead of up to max_frames evenly spaced ones. With reduce, a
    large grayscale JPEG 2000 image is decoded at a reduced resolution level.
    """
    n_frames = number_of_frames(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    samples = int(ds.get("SamplesPerPixel", 1))
    out = []
    chosen = frame_indices(n_frames, max_frames) if indices is None else indices
    try:
        reduced = decode_j2k_reduced(ds, chosen, n_frames, reduce) if reduce else None
    except J2K_HEADER_ERRORS as exc:  # malformed encapsulation or header: pydicom's decoder gives the reason below
        _note_full_size_fallback(exc)
        reduced = None
    decoded = reduced or decode_frames(ds, chosen, n_frames)
    for i, frame in decoded.items():
        if reduced is None:
            _check_decoded_shape(frame, ds, samples)
        if photometric == "PALETTE COLOR":
            rgb = apply_color_lut(frame, ds)
            out.append((i, rgb.astype(np.float32) / (255.0 if rgb.max() <= 255 else 65535.0)))
        elif samples == 3:
            out.append((i, frame.astype(np.float32) / float(2 ** int(ds.get("BitsStored", 8)) - 1)))
        elif samples == 1:
            out.append((i, np.asarray(apply_modality_lut(frame, ds), dtype=np.float64)))
        else:
            raise PipelineError(f"unsupported Samples per Pixel {samples}")
    return out


def _voi_dataset(center: float, width: float, function: str = "LINEAR") -> Dataset:
    """A minimal VOI LUT Module for pydicom's apply_windowing, output 0-65535."""
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored, ds.PixelRepresentation = 16, 0
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = float(center), float(width), function
    return ds


def _window01(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Apply a window with pydicom and scale the result to [0, 1]."""
    if function == "LINEAR":
        width = max(width, 1.0)
    return (apply_windowing(values, _voi_dataset(center, width, function)) / _VOI_FULL_SCALE).astype(np.float32)


def preset_window(ds: Dataset | None, settings: PipelineSettings) -> tuple[float, float] | None:
    """The first [[pipeline.windows]] preset matching the modality (and body part, if it names one)."""
    if ds is None:
        return None
    modality = str(ds.get("Modality", "")).upper()
    body_part = str(ds.get("BodyPartExamined", "")).upper()
    for preset in settings.windows:
        if preset.modality.upper() == modality and (not preset.body_part or preset.body_part.upper() == body_part):
            return preset.center, preset.width
    return None


def dataset_window(ds: Dataset | None) -> tuple[float, float, str] | None:
    """The dataset's first Window Center/Width and its VOI LUT Function, if it has a usable one."""
    if ds is None or "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, width = ds["WindowCenter"], ds["WindowWidth"]
    try:
        c = float(center.value[0] if center.VM > 1 else center.value)
        w = float(width.value[0] if width.VM > 1 else width.value)
    except (TypeError, ValueError):
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    return (c, w, function) if usable_window(c, w) else None


def auto_window(values: np.ndarray) -> tuple[float, float]:
    """A window from the 0.5th and 99.5th percentiles of the values."""
    lo, hi = np.percentile(values, [0.5, 99.5])
    return float((lo + hi) / 2), float(max(hi - lo, 1.0))


def voi01(
    values: np.ndarray,
    ds: Dataset | None,
    settings: PipelineSettings,
    window: tuple[float, float] | None = None,
    adjust_window: WindowAdjust | None = None,
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """VOI of a grayscale frame scaled to [0, 1] and the window used (None for a VOI LUT).

    Precedence: explicit window > config preset > the dataset's Window Center/Width (LINEAR,
    LINEAR_EXACT or SIGMOID) > its VOI LUT Sequence > a percentile window. adjust_window (training's
    window jitter) changes a LINEAR window before it is applied; other VOI functions stay as they are.
    """
    adjust = adjust_window or (lambda c, w: (c, w))
    window = window or preset_window(ds, settings)
    if window is not None:
        window = adjust(*window)
        return _window01(values, *window), window
    own = dataset_window(ds)
    if own is not None:
        if own[2] == "LINEAR":
            own = (*adjust(*own[:2]), "LINEAR")
        return _window01(values, *own), own[:2]
    if ds is not None and "VOILUTSequence" in ds:
        lut_ds = Dataset()
        lut_ds.VOILUTSequence = ds.VOILUTSequence
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        # A VOI LUT indexes stored integers; the modality LUT returns floats even when integral.
        indices = values.astype(np.int64) if np.array_equal(values, np.round(values)) else values
        out = apply_voi_lut(indices, lut_ds, prefer_lut=True)
        return np.clip(out.astype(np.float32) / float(2**bits - 1), 0, 1), None
    auto = adjust(*auto_window(values))
    return _window01(values, *auto), auto


def display_shape(height: int, width: int, max_side: int) -> tuple[int, int]:
    """Height and width of the display image of a HxW frame: the longest side at most max_side (0: HxW), aspect kept."""
    if not max_side or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def display_image(values01: np.ndarray, max_side: int = 0) -> np.ndarray:
    """HxW (grayscale) or HxWx3 values in [0, 1] as a uint8 RGB display image no larger than display_shape.

    A larger image is downsampled with an antialiased (triangle-filtered) bilinear resize, as
    to_tensor resizes: the image's extent is kept, each display pixel a weighted mean of the
    source pixels under it. The three channels are made after that.
    """
    h, w = values01.shape[:2]
    size = display_shape(h, w, max_side)
    if size != (h, w):
        planes = values01[np.newaxis] if values01.ndim == 2 else values01.transpose(2, 0, 1)
        small = resize_planes(planes, size)
        values01 = small[0] if values01.ndim == 2 else small.transpose(1, 2, 0)
    u8 = (values01 * 255).round().astype(np.uint8)
    return u8 if u8.ndim == 3 else np.repeat(u8[..., np.newaxis], 3, axis=-1)


def frame_from_values(
    values: np.ndarray,
    frame_index: int,
    ds: Dataset | None,
    settings: PipelineSettings,
    prep: Preprocessing,
    window: tuple[float, float] | None = None,
    display_max_side: int = 0,
    adjust_window: WindowAdjust | None = None,
) -> Frame:
    """Window (grayscale) or pass through (colour) one frame into a Frame; its display no larger than display_max_side."""
    uid = str(ds.get("SOPInstanceUID", "")) if ds is not None else ""
    if values.ndim == 3:  # colour, already RGB in [0, 1]
        image = np.clip(values, 0, 1).astype(np.float32)
        return Frame(
            image=image,
            display=display_image(image, display_max_side),
            frame_index=frame_index,
            sop_instance_uid=uid,
        )
    monochrome1 = ds is not None and str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    gray, used = voi01(values, ds, settings, window, adjust_window)
    if monochrome1:
        gray = 1.0 - gray
    if prep.channels == "windows":
        chans = [_window01(values, c, w) for c, w in prep.windows]
        image = np.stack([1.0 - ch if monochrome1 else ch for ch in chans], axis=-1)
        image = image.astype(np.float32)
    else:  # one plane seen three times (a read-only view): no copies of a radiograph-sized array
        gray = gray.astype(np.float32, copy=False)
        image = np.broadcast_to(gray[..., np.newaxis], (*gray.shape, 3))
    display = display_image(gray, display_max_side)
    return Frame(image=image, display=display, frame_index=frame_index, sop_instance_uid=uid, window=used)


def read_dataset(path: str | Path, max_inflated_mb: float | None = None) -> Dataset:
    """Read a DICOM file with lazily loaded pixel data; PipelineError if it is not readable DICOM.

    With max_inflated_mb, a Deflated file is first inflated in bounded chunks to learn its size:
    pydicom inflates the whole dataset in memory.
    """
    try:
        with open(path, "rb") as f:  # one open for the check and the parse; deferred values are re-read by name
            if max_inflated_mb is not None:
                try:
                    check_deflated_file(f, int(max_inflated_mb * MB))
                except DeclaredSizeError as exc:
                    raise PipelineError(str(exc)) from exc
                f.seek(0)
            return pydicom.dcmread(f, defer_size="64 KB")
    except PipelineError:
        raise
    except OSError as exc:
        raise PipelineError(f"cannot read file: {exc.strerror or exc}") from exc
    except Exception as exc:  # pydicom and zlib raise many kinds on a corrupt stream
        raise PipelineError(f"not a readable DICOM file: {type(exc).__name__}: {exc}"[:300]) from exc


def check_before_decoding(ds: Dataset, settings: PipelineSettings) -> list[str]:
    """PipelineError unless the declared pixel attributes may be decoded; notes on header values not used."""
    try:
        n_frames = number_of_frames(ds)
        indices = frame_indices(n_frames, settings.max_frames)
        check_pixel_attributes(ds, len(indices), settings.max_decoded_mb)
        check_rescale(ds)
        check_codestreams(ds, indices, n_frames)
    except DeclaredSizeError as exc:
        raise PipelineError(str(exc)) from exc
    except Exception as exc:  # a header value pydicom cannot convert
        raise PipelineError(f"pixel attributes not readable: {type(exc).__name__}: {exc}"[:300]) from exc
    notes = []
    if "WindowCenter" in ds and "WindowWidth" in ds and dataset_window(ds) is None:
        notes.append("Window Center/Width not usable (not finite, not positive or out of range): not used")
    return notes


def read_image_file(path: Path, prep: Preprocessing, display_max_side: int = 0) -> list[Frame]:
    """A PNG or JPEG as one frame: grayscale replicated, colour kept as RGB; its display no larger than display_max_side."""
    # start-up time: PIL loads only when this runs
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("L", "I", "I;16", "I;16B", "F"):
                gray = np.asarray(img, dtype=np.float64)
                lo, hi = (
                    (0.0, 255.0) if img.mode == "L" else (float(gray.min()), float(max(gray.max(), gray.min() + 1)))
                )
                gray01 = np.clip((gray - lo) / (hi - lo), 0, 1).astype(np.float32)
                rgb = np.repeat(gray01[..., np.newaxis], 3, axis=-1)
            else:
                rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise PipelineError(f"not a readable image: {exc}"[:300]) from exc
    return [Frame(image=rgb, display=display_image(rgb, display_max_side), frame_index=0)]


def is_image_file(path: Path) -> bool:
    """True for a PNG/JPEG by suffix or magic number (DICOM files have 'DICM' at 128)."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(8)
    return head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff")


def read_frames(
    source: str | Path | Dataset,
    settings: PipelineSettings,
    prep: Preprocessing,
    frames: list[int] | None = None,
    display_max_side: int = 0,
    adjust_window: WindowAdjust | None = None,
) -> list[Frame]:
    """Frames of a DICOM instance or a PNG/JPEG file, ready for to_tensor; PipelineError on failure.

    frames picks 0-based frames of a DICOM instance (e.g. the one a heatmap needs) instead of
    up to max_frames evenly spaced ones. Each frame's display image has its longest side at most
    display_max_side ([report] sc_max_side for heatmaps; 0: the decoded size); the model image
    is the same whatever it is. adjust_window: see voi01 (training only).
    """
    if not isinstance(source, Dataset):
        path = Path(source)
        if not path.is_file():
            raise PipelineError(f"no such file: {path}")
        if is_image_file(path):
            return read_image_file(path, prep, display_max_side)
        source = read_dataset(path, settings.max_decoded_mb)
    ds = source
    reason = skip_reason(ds, settings)
    if reason:
        raise PipelineError(reason)
    notes = check_before_decoding(ds, settings)
    try:
        out = []
        for i, values in modality_values(ds, settings.max_frames, frames, j2k_reduce(settings, prep)):
            if not all_finite(values):
                raise PipelineError("pixel values are not finite after the Modality LUT")
            frame = frame_from_values(
                values, i, ds, settings, prep, display_max_side=display_max_side, adjust_window=adjust_window
            )
            if not all_finite(frame.image):
                raise PipelineError("pixel values are not finite after the VOI LUT")
            frame.notes = tuple(notes)
            out.append(frame)
        return out
    except PipelineError:
        raise
    except Exception as exc:  # a malformed LUT or window in the header
        raise PipelineError(f"cannot apply the pixel chain: {type(exc).__name__}: {exc}"[:300]) from exc


@dataclass(frozen=True)
class Geometry:
    """Where a HxW source sits in the SxS model input (to map CAM maps back)."""

    height: int
    width: int
    size: int
    resized_h: int
    resized_w: int
    top: int  # offset of the resized image in the input (letterbox >= 0, centre crop <= 0)
    left: int


def geometry(height: int, width: int, prep: Preprocessing) -> Geometry:
    """The resize/pad/crop that to_tensor applies to a HxW image."""
    s = prep.input_size
    scale = s / max(height, width) if prep.resize == "letterbox" else s / min(height, width)
    rh, rw = max(1, round(height * scale)), max(1, round(width * scale))
    return Geometry(height, width, s, rh, rw, (s - rh) // 2, (s - rw) // 2)


def resize_planes(planes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """CxHxW planes resized to C x size (h, w) in float32: bilinear, antialiased when it reduces.

    Pillow's triangle filter on 32-bit float images, each output pixel a weighted mean of the
    source pixels under it, the image's extent kept (pixel centres at (i + 0.5) * scale): the
    resize torch's interpolate(mode="bilinear", align_corners=False, antialias=True) imitates
    (tests/test_pipeline.py compares them), and plain bilinear when it enlarges.
    """
    h, w = size
    out = np.empty((planes.shape[0], h, w), np.float32)
    for c, plane in enumerate(planes):
        img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))  # float32: mode "F"
        out[c] = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    return out


def to_tensor(frame: Frame, prep: Preprocessing) -> np.ndarray:
    """3xSxS float32: resized (letterbox or centre crop) and normalised with the bundle's mean/std.

    The one model input of serving, evaluation, calibration and training (dxnode.training.dataset wraps it
    for torch).
    """
    h, w = frame.image.shape[:2]
    g = geometry(h, w, prep)
    img = frame.image
    # A grayscale frame has three equal channels: resize one (a third of the cost) and repeat it.
    # frame_from_values makes them one plane seen three times (channel stride 0): no need to compare.
    gray = img.shape[2] == 3 and (
        img.strides[2] == 0 or (np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2]))
    )
    planes = img[np.newaxis, ..., 0] if gray else img.transpose(2, 0, 1)
    x = resize_planes(planes, (g.resized_h, g.resized_w))
    out = np.zeros((3, g.size, g.size), np.float32)
    # Paste the resized image at (top, left); negative offsets crop it (centre crop).
    src_t, src_l = max(0, -g.top), max(0, -g.left)
    dst_t, dst_l = max(0, g.top), max(0, g.left)
    hh, ww = min(g.resized_h - src_t, g.size - dst_t), min(g.resized_w - src_l, g.size - dst_l)
    out[:, dst_t : dst_t + hh, dst_l : dst_l + ww] = x[
        :, src_t : src_t + hh, src_l : src_l + ww
    ]  # (1 plane: broadcast)
    out -= np.asarray(prep.mean, np.float32).reshape(3, 1, 1)
    out /= np.asarray(prep.std, np.float32).reshape(3, 1, 1)
    return out


def map_to_source(cam_input: np.ndarray, g: Geometry, size: tuple[int, int] | None = None) -> np.ndarray:
    """A map over the SxS model input mapped back onto the HxW source pixels, or onto size (h, w).

    With size, the result covers the source's extent at h x w pixels (a display image that is
    a scaled copy of the source): the letterbox/crop is undone with the source's own geometry g.
    """
    canvas = np.zeros((1, g.resized_h, g.resized_w), np.float32)
    src_t, src_l = max(0, g.top), max(0, g.left)
    dst_t, dst_l = max(0, -g.top), max(0, -g.left)
    hh, ww = min(g.size - src_t, g.resized_h - dst_t), min(g.size - src_l, g.resized_w - dst_l)
    canvas[:, dst_t : dst_t + hh, dst_l : dst_l + ww] = cam_input[src_t : src_t + hh, src_l : src_l + ww]
    return resize_planes(canvas, size or (g.height, g.width))[0]


def model_inputs(
    path: Path, settings: PipelineSettings, prep: Preprocessing, adjust_window: WindowAdjust | None = None
) -> list[np.ndarray]:
    """The model inputs (3xSxS float32) of a file's frames: read_frames then to_tensor, as the node serves them.

    The one path from a file to tensors for training, evaluation and calibration; PipelineError if unusable.
    """
    return [to_tensor(f, prep) for f in read_frames(path, settings, prep, adjust_window=adjust_window)]
