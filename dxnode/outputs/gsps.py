"""Softcopy Presentation States: the attention outlines on the original images.

One Grayscale Softcopy Presentation State per source series with a positive finding: for each
positive finding, its attention outline (the same closed polyline as the SR's TID 1410 group,
dxnode/outputs/attention.py) and a text "Nodule 0.64 (AI, threshold 0.50)" at the outline's
top-left corner, in an "AI" graphic layer. The modality LUT and VOI are the source's own
(highdicom copies them from the referenced images), so a GSPS-capable viewer shows the region on
the original image as the PACS would show it, with no burned-in copy.

A colour source (three samples per pixel: RGB or YBR colour US, endoscopy, photographs) cannot be
referenced by a GSPS: its regions get a Color Softcopy Presentation State instead, with the same
graphic annotations and the source's ICC profile (top level, or its single optical path's), else
sRGB. Both are the `gsps` output kind; a series holding both kinds of image gets one of each.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from io import BytesIO
from typing import Any

import highdicom as hd
from PIL.ImageCms import ImageCmsProfile, PyCMSError
from pydicom import Dataset
from pydicom.multival import MultiValue

from dxnode.config import Settings
from dxnode.outputs.attention import attention_outline
from dxnode.outputs.result_uids import derived_uid, result_key
from dxnode.outputs.seg import Region, by_series, copy_body_part, equipment, positive_regions
from dxnode.results import StudyResult

GSPS_SERIES_NUMBER = 9905
GSPS_SERIES_DESCRIPTION = "AI Attention Outlines"
LAYER = hd.pr.GraphicLayer(layer_name="AI", order=1, description="AI attention regions (not lesion boundaries)")


def region_text(r: Region) -> str:
    """The text shown beside a finding's outline."""
    f = r.finding
    return f"{f.label} {f.probability:.2f} (AI, threshold {f.threshold:.2f})"


def build_gsps(result: StudyResult, sources: dict[str, Dataset], settings: Settings) -> tuple[list[Dataset], list[str]]:
    """One GSPS per source series holding a positive finding's region on a grayscale image, one CSPS
    per series holding one on a colour image; and notes on what was assumed (an ICC profile)."""
    key = result_key(result)
    states: list[Dataset] = []
    notes: list[str] = []
    groups: dict[tuple[str, bool], list[Region]] = {}
    for group in by_series(positive_regions(result, sources)):
        for r in group:
            groups.setdefault((str(r.source.SeriesInstanceUID), is_colour(r.source)), []).append(r)
    for number, ((series, colour), group) in enumerate(groups.items(), start=1):
        images: dict[str, Dataset] = {}
        for r in group:
            images.setdefault(r.heatmap.sop_instance_uid, r.source)
        common: dict[str, Any] = {
            "referenced_images": list(images.values()),
            "series_instance_uid": derived_uid(key, "gsps-series"),
            "series_number": GSPS_SERIES_NUMBER,
            "sop_instance_uid": derived_uid(key, "csps" if colour else "gsps", series),
            "instance_number": number,
            "content_label": "AI_ATTENTION",
            "content_description": f"AI attention outlines, {result.model.name} {result.model.version}"[:64],
            "graphic_layers": [LAYER],
            "graphic_annotations": [_annotation(r, key) for r in group],
            "institution_name": settings.report.institution_name or None,
            **equipment(result, settings),
        }
        if colour:
            profile, note = icc_profile(list(images.values()))
            notes += [f"CSPS of {', '.join(r.finding.label for r in group)}: {note}"] if note else []
            state: Dataset = hd.pr.ColorSoftcopyPresentationState(icc_profile=profile, **common)
        else:
            luts = _shared_luts(list(images.values())) or _legacy_multiframe_luts(list(images.values()))
            state = hd.pr.GrayscaleSoftcopyPresentationState(**common, **luts)
        state.SeriesDescription = GSPS_SERIES_DESCRIPTION
        copy_body_part(state, group[0].source)
        states.append(state)
    return states, notes


def is_colour(ds: Dataset) -> bool:
    """Whether an image has three samples per pixel (RGB, YBR): a GSPS cannot reference it, a CSPS can."""
    return int(ds.get("SamplesPerPixel", 1) or 1) == 3


@cache
def srgb_profile() -> bytes:
    """The sRGB ICC profile (ICC's sRGB v4 preference profile, as highdicom ships it)."""
    return (files("highdicom") / "_icc_profiles" / "sRGB_v4_ICC_preference.icc").read_bytes()


def icc_profile(images: list[Dataset]) -> tuple[bytes, str | None]:
    """The ICC profile of a CSPS: the images' own when they share one a presentation state may
    carry (device class input or colour space, RGB, PCS Lab or XYZ), else sRGB, with a note when
    the images' own could not be used."""
    found = set()
    for ds in images:
        paths = ds.get("OpticalPathSequence") or []
        profile = ds.get("ICCProfile") or (paths[0].get("ICCProfile") if len(paths) == 1 else None)
        found.add(bytes(profile) if profile else b"")
    if found == {b""}:
        return srgb_profile(), None
    if len(found) > 1:
        return srgb_profile(), "the images name different ICC profiles (or some none): sRGB used"
    (profile,) = found
    try:
        header = ImageCmsProfile(BytesIO(profile)).profile
        usable = (header.device_class.strip(), header.xcolor_space.strip(), header.connection_space.strip())
    except (OSError, PyCMSError):
        return srgb_profile(), "the source's ICC profile cannot be read: sRGB used"
    if usable[0] not in ("scnr", "spac") or usable[1] != "RGB" or usable[2] not in ("Lab", "XYZ"):
        return srgb_profile(), f"the source's ICC profile ({'/'.join(usable)}) is not one a CSPS may carry: sRGB used"
    return profile, None


def _shared_luts(images: list[Dataset]) -> dict[str, Any]:
    """The modality LUT and VOI of one enhanced multi-frame image whose shared functional groups
    hold both, as arguments: highdicom would otherwise read every frame's functional groups (to
    check that none has its own), which costs what the frames cost, not the regions."""
    if len(images) != 1 or len(images[0].get("SharedFunctionalGroupsSequence") or []) != 1:
        return {}
    shared = images[0].SharedFunctionalGroupsSequence[0]
    if not shared.get("PixelValueTransformationSequence") or not shared.get("FrameVOILUTSequence"):
        return {}  # per-frame values: highdicom reads each frame's, as it must
    pixel, voi = shared.PixelValueTransformationSequence[0], shared.FrameVOILUTSequence[0]
    luts: dict[str, Any] = {
        "voi_lut_transformations": [
            hd.pr.SoftcopyVOILUTTransformation(
                window_center=voi.WindowCenter,
                window_width=voi.WindowWidth,
                window_explanation=voi.get("WindowCenterWidthExplanation"),
                voi_lut_function=voi.get("VOILUTFunction"),
            )
        ]
    }
    if "RescaleIntercept" in pixel:
        luts["modality_lut_transformation"] = hd.ModalityLUTTransformation(
            rescale_intercept=pixel.RescaleIntercept,
            rescale_slope=pixel.RescaleSlope,
            rescale_type=pixel.get("RescaleType") or "US",
        )
    return luts


def _legacy_multiframe_luts(images: list[Dataset]) -> dict[str, Any]:
    """The source's modality LUT and VOI as arguments, for images highdicom cannot read them from.

    highdicom 0.28 reads them from the functional groups of any image of a multi-frame IOD, which
    a legacy multi-frame image (US, XA, NM, RF, older MR) does not have: it raises. For those the
    top-level Rescale and Window attributes are passed instead: identity rescale when there is
    none, and the stored range as the window when the source names none.
    """
    if not any("NumberOfFrames" in ds and "SharedFunctionalGroupsSequence" not in ds for ds in images):
        return {}
    first = images[0]
    rescale = hd.ModalityLUTTransformation(
        rescale_intercept=float(first.get("RescaleIntercept", 0) or 0),
        rescale_slope=float(first.get("RescaleSlope", 1) or 1),
        rescale_type=str(first.get("RescaleType") or ("HU" if first.get("Modality") == "CT" else "US")),
    )
    windows = []
    for ds in images:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            bits, signed = int(ds.get("BitsStored", 8) or 8), int(ds.get("PixelRepresentation", 0) or 0)
            center, width = (0.0 if signed else 2.0 ** (bits - 1)), 2.0**bits
        windows.append(
            hd.pr.SoftcopyVOILUTTransformation(
                window_center=_first(center),
                window_width=_first(width),
                referenced_images=hd.ReferencedImageSequence(referenced_images=[ds]) if len(images) > 1 else None,
            )
        )
    return {"modality_lut_transformation": rescale, "voi_lut_transformations": windows}


def _first(value: Any) -> float:
    """The first value of a possibly multi-valued DS."""
    return float(value[0]) if isinstance(value, MultiValue | list | tuple) else float(value)


def _annotation(r: Region, key: str) -> hd.pr.GraphicAnnotation:
    """The outline and text of one finding on its image (and frame)."""
    outline = attention_outline(r.heatmap.cam, int(r.source.Rows), int(r.source.Columns))
    x0, y0 = (float(v) for v in outline.min(axis=0))
    uid = derived_uid(key, "gsps-outline", r.finding.label)
    return hd.pr.GraphicAnnotation(
        referenced_images=[r.source],
        graphic_layer=LAYER,
        referenced_frame_number=r.frame_number,
        graphic_objects=[
            hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                graphic_data=outline,
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                tracking_id=f"AI attention {r.finding.label}"[:64],
                tracking_uid=uid,
            )
        ],
        text_objects=[
            hd.pr.TextObject(
                text_value=region_text(r),
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                anchor_point=(x0, y0),
                anchor_point_visible=False,
                text_justification=hd.pr.TextJustificationValues.LEFT,
            )
        ],
    )
