"""Grad-CAM Secondary Captures: the overlay as an RGB image with a burned-in caption and a colour scale."""

from __future__ import annotations

import copy
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom import Dataset

from dxnode.config import MIN_SC_SIDE, Settings
from dxnode.outputs.result_uids import derived_uid, result_key
from dxnode.pixels.colormap import OVERLAY_FLOOR, OVERLAY_MAX_ALPHA, jet, overlay_opacity
from dxnode.results import Finding, Heatmap, StudyResult

# Patient module attributes saying the source is de-identified, and how: the SC says it too.
DEIDENTIFICATION = ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence")
SCALE_GREY = 128.0  # the untinted part of the caption's colour scale
# Spacing attributes a heatmap SC must not carry: its pixels are resampled and captioned.
SPACING_ATTRIBUTES = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")
# Body Part Examined values (CID 4031) of unpaired regions: their series need no Laterality. Any other
# value, a paired one (KNEE, EXTREMITY, ...) or one dciodvfy does not know, gets an empty one (unknown).
UNPAIRED_BODY_PARTS = frozenset(
    {
        "ABDOMEN",
        "ABDOMENPELVIS",
        "AORTA",
        "BLADDER",
        "BRAIN",
        "CHEST",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "COCCYX",
        "COLON",
        "CSPINE",
        "ESOPHAGUS",
        "HEAD",
        "HEADNECK",
        "HEART",
        "LIVER",
        "LSPINE",
        "NECK",
        "PANCREAS",
        "PELVIS",
        "PROSTATE",
        "SACRUM",
        "SKULL",
        "SPINE",
        "SSPINE",
        "STERNUM",
        "STOMACH",
        "THORAX",
        "TRACHEA",
        "TSPINE",
        "UTERUS",
        "WHOLEBODY",
    }
)


def caption_lines(h: Heatmap, f: Finding, result: StudyResult) -> list[str]:
    """The burned-in caption of a heatmap SC."""
    m = result.model
    lines = [
        f"AI GENERATED - {f.label}: probability {f.probability:.3f} ({'POSITIVE' if f.positive else 'negative'}, threshold {f.threshold:.2f})",
        f"Grad-CAM heatmap (untinted below {OVERLAY_FLOOR:.0%} of its peak), model {m.name} {m.version}",
    ]
    if m.demo:
        lines.append("UNTRAINED DEMO MODEL - NOT A DIAGNOSIS")
    return lines


def _caption_font(width: int) -> tuple[Any, int]:
    """The caption font for a canvas this wide, and its size in pixels."""
    # start-up time: PIL loads only when this runs
    from PIL import ImageFont

    size = max(12, width // 55)
    try:
        return ImageFont.load_default(size=size), size
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default(), 11


def _panel_height(size: int, n_lines: int) -> int:
    """Height of the caption panel: the lines, then the colour scale."""
    line_h = int(size * 1.35)
    return line_h * n_lines + max(10, size // 2) + 3 * line_h // 2


def colour_scale(width: int) -> np.ndarray:
    """The caption's low-high scale, 1 x width x 3 uint8: the map's colours faded in as the overlay fades them
    (grey, i.e. untinted, below the floor; full colour at the peak)."""
    values = np.linspace(0, 1, width)
    weight = (overlay_opacity(values) / OVERLAY_MAX_ALPHA)[:, np.newaxis]
    rgb = jet(values) * 255 * weight + SCALE_GREY * (1 - weight)
    return np.rint(rgb).astype(np.uint8)[np.newaxis]


def render_caption(overlay: np.ndarray, lines: list[str], max_side: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """The overlay with a caption panel and a low-high colour scale below it, and the overlay's size in it.

    The canvas is at least MIN_SC_SIDE px wide (a narrower overlay is enlarged to that width).
    With max_side (>= MIN_SC_SIDE), neither side of the canvas exceeds it: the overlay is scaled
    down, aspect kept, to leave room for the panel (centred if that makes it narrower than the
    canvas). Returns (RGB canvas, (height, width) of the overlay in it).
    """
    # start-up time: PIL loads only when this runs
    from PIL import Image, ImageDraw

    img = Image.fromarray(overlay)
    scale = max(1.0, MIN_SC_SIDE / img.width)
    if max_side:  # the panel for the widest canvas possible is the tallest: the result fits
        _, size = _caption_font(max(MIN_SC_SIDE, round(img.width * scale)))
        scale = min(scale, max_side / img.width, (max_side - _panel_height(size, len(lines))) / img.height)
    width, height = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    if (width, height) != img.size:
        img = img.resize((width, height), Image.Resampling.BILINEAR)  # antialiased when it reduces
    font, size = _caption_font(max(MIN_SC_SIDE, img.width))
    line_h, bar_h = int(size * 1.35), max(10, size // 2)
    panel_h = _panel_height(size, len(lines))
    canvas = Image.new("RGB", (max(MIN_SC_SIDE, img.width), img.height + panel_h), (0, 0, 0))
    canvas.paste(img, ((canvas.width - img.width) // 2, 0))
    draw = ImageDraw.Draw(canvas)
    y = img.height + line_h // 2
    for line in lines:
        draw.text((size // 2, y), line, fill=(255, 255, 255), font=font)
        y += line_h
    label_w = int(draw.textlength("high", font=font)) + size
    bar_w = max(64, min(canvas.width // 3, canvas.width - 2 * label_w - size))
    ramp = colour_scale(bar_w)
    canvas.paste(Image.fromarray(np.repeat(ramp, bar_h, axis=0)), (label_w, y + (line_h - bar_h) // 2))
    draw.text((size // 2, y), "low", fill=(255, 255, 255), font=font)
    draw.text((label_w + bar_w + size // 2, y), "high", fill=(255, 255, 255), font=font)
    return np.asarray(canvas), (img.height, img.width)


def image_orientation(source: Dataset, frame: int = 0) -> list[float] | None:
    """Image Orientation (Patient) of a frame: top level, else the enhanced per-frame or shared functional group."""
    if len(source.get("ImageOrientationPatient") or []) == 6:
        return [float(x) for x in source.ImageOrientationPatient]
    # a slice, not a list of the whole sequence: a reference header makes its per-frame items valid as they are read
    groups = list((source.get("PerFrameFunctionalGroupsSequence") or [])[frame : frame + 1]) + list(
        source.get("SharedFunctionalGroupsSequence") or []
    )
    for group in groups:
        for plane in group.get("PlaneOrientationSequence") or []:
            if len(plane.get("ImageOrientationPatient") or []) == 6:
                return [float(x) for x in plane.ImageOrientationPatient]
    return None


def patient_orientation(source: Dataset, frame: int = 0) -> tuple[str, str] | None:
    """Patient Orientation of the source: its own, else derived from Image Orientation (Patient)."""
    po = source.get("PatientOrientation")
    if po is not None and len(po) == 2 and all(po):
        return str(po[0]), str(po[1])
    iop = image_orientation(source, frame)
    if iop is None:
        return None
    letters = (("R", "L"), ("A", "P"), ("F", "H"))

    def main_letter(v: list[float]) -> str:
        axis = int(np.argmax(np.abs(v)))
        return letters[axis][v[axis] > 0]

    return main_letter(iop[:3]), main_letter(iop[3:])


def build_sc(
    h: Heatmap, f: Finding, result: StudyResult, source: Dataset, settings: Settings, index: int
) -> tuple[Dataset, str]:
    """The Secondary Capture of one heatmap and its caption.

    Its Rows and Columns are at most [report] sc_max_side (0: the heatmap at the size it was
    drawn, the source's or a reduced JPEG 2000 level's), caption included; Derivation Description
    says when the image is not at the source's size. It carries no spacing attribute (Pixel
    Spacing, Imager Pixel Spacing, Nominal Scanned Pixel Spacing): the pixels are a resampled
    copy of the source with a caption panel below, so none would be true of them; measurements
    belong on the source image, which Source Image Sequence references.
    """
    key = result_key(result)
    lines = caption_lines(h, f, result)
    pixels, (height, width) = render_caption(h.overlay, lines, settings.report.sc_max_side)
    orientation = patient_orientation(source, h.frame)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=derived_uid(key, "sc-series"),
        series_number=settings.report.sc_series_number,
        sop_instance_uid=derived_uid(key, "sc", h.label),
        instance_number=index + 1,
        manufacturer=settings.report.manufacturer,
        # highdicom insists on an orientation in the patient coordinate system; when the source has
        # none (ultrasound, many secondary captures) it is emptied below: Type 2, "unknown".
        patient_orientation=orientation or ("L", "F"),
        laterality=source.get("Laterality") or None,
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    if orientation is None:
        sc.PatientOrientation = []  # Type 2: empty = unknown
    sc.SeriesDescription = settings.report.sc_series_description[:64]
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = " / ".join(lines)[:10240]
    derivation = f"Grad-CAM of {result.model.name} {result.model.version} for {f.label}"
    rows, columns = int(source.get("Rows", 0) or 0), int(source.get("Columns", 0) or 0)
    if rows and columns and (height, width) != (rows, columns):
        how = "reduced" if height * width < rows * columns else "enlarged"
        derivation += f"; image {how} from the source's {rows}x{columns} to {height}x{width} (rows x columns)"
    sc.DerivationDescription = derivation[:1024]
    for keyword in SPACING_ATTRIBUTES:  # none is true of these pixels (see above)
        if keyword in sc:
            del sc[keyword]
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    if int(source.get("NumberOfFrames", 1) or 1) > 1:
        ref.ReferencedFrameNumber = h.frame + 1
    sc.SourceImageSequence = [ref]
    for keyword in DEIDENTIFICATION:  # highdicom copies only some Patient module attributes into an SC
        if keyword in source and keyword not in sc:
            sc[keyword] = copy.deepcopy(source[keyword])
    for keyword in ("BodyPartExamined", "Laterality", "ImageLaterality"):
        if source.get(keyword) and keyword not in sc:  # an empty one means unknown, handled below
            setattr(sc, keyword, source[keyword].value)
    if (
        "Laterality" not in sc
        and "ImageLaterality" not in sc
        and str(sc.get("BodyPartExamined", "")).upper() not in UNPAIRED_BODY_PARTS
    ):
        sc.Laterality = ""  # type 2C in General Series for a paired (or unknown) body part: empty = unknown
    return sc, lines[0]
