"""Grayscale Softcopy Presentation States: the attention outlines on the original images.

One GSPS per source series with a positive finding: for each positive finding, its attention
outline (the same closed polyline as the SR's TID 1410 group, dxnode/outputs/attention.py) and a
text "Nodule 0.64 (AI, threshold 0.50)" at the outline's top-left corner, in an "AI" graphic
layer. The modality LUT and VOI are the source's own (highdicom copies them from the referenced
images), so a GSPS-capable viewer shows the region on the original image as the PACS would show
it, with no burned-in copy.
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
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


def build_gsps(result: StudyResult, sources: dict[str, Dataset], settings: Settings) -> list[Dataset]:
    """One GSPS per source series holding a positive finding's region."""
    key = result_key(result)
    states: list[Dataset] = []
    for number, group in enumerate(by_series(positive_regions(result, sources)), start=1):
        images: dict[str, Dataset] = {}
        for r in group:
            images.setdefault(r.heatmap.sop_instance_uid, r.source)
        series = str(group[0].source.SeriesInstanceUID)
        gsps = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=list(images.values()),
            **_legacy_multiframe_luts(list(images.values())),  # type: ignore[arg-type]
            series_instance_uid=derived_uid(key, "gsps-series"),
            series_number=GSPS_SERIES_NUMBER,
            sop_instance_uid=derived_uid(key, "gsps", series),
            instance_number=number,
            content_label="AI_ATTENTION",
            content_description=f"AI attention outlines, {result.model.name} {result.model.version}"[:64],
            graphic_layers=[LAYER],
            graphic_annotations=[_annotation(r, key) for r in group],
            institution_name=settings.report.institution_name or None,
            **equipment(result, settings),  # type: ignore[arg-type]
        )
        gsps.SeriesDescription = GSPS_SERIES_DESCRIPTION
        copy_body_part(gsps, group[0].source)
        states.append(gsps)
    return states


def _legacy_multiframe_luts(images: list[Dataset]) -> dict[str, object]:
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
