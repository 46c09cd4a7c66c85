"""Parametric Maps of the Grad-CAM (IHE AIR's heat-map primitive), one per positive finding.

The map (0..1 of its peak) on the source image's grid, stored as 16-bit integers with a Real
World Value Mapping back to 0..1 (unit UCUM "1") labelled as AI attention: where the model
looked, not a probability of disease. A VOI LUT (the full 0..1 range) lets a viewer show it
without special handling. It references its source image (and frame). Frame of Reference and
geometry are the source's where it has them; a source without (most CR/DX: no Frame of Reference,
which the IOD requires; a cine without per-frame positions) gets a geometry of the map's own,
dxnode/outputs/geometry.py. On a multi-frame source the map is the one frame that drove the
finding, placed at that frame's position and referencing it by Referenced Frame Number.
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from pydicom import Dataset

from dxnode.config import Settings
from dxnode.outputs.attention import to_source_grid
from dxnode.outputs.geometry import placed, renumber_frames
from dxnode.outputs.result_uids import derived_uid, result_key
from dxnode.outputs.seg import Region, copy_body_part, equipment, positive_regions
from dxnode.results import StudyResult

log = logging.getLogger("dxnode.outputs.pmap")

PMAP_SERIES_NUMBER = 9904
PMAP_SERIES_DESCRIPTION = "AI Attention Maps"
STORED_MAX = 65535  # the stored value of attention 1.0
ATTENTION_QUANTITY = hd.sr.CodedConcept("GRADCAM", "99DXNODE", "AI attention (Grad-CAM), not a probability")


def build_pmaps(
    result: StudyResult, sources: dict[str, Dataset], settings: Settings
) -> tuple[list[tuple[Dataset, str]], list[str]]:
    """(Parametric Map, finding label) per positive finding with a heatmap, and notes on the maps
    left out or whose geometry assumed a pixel spacing."""
    maps, notes = [], []
    for i, r in enumerate(positive_regions(result, sources)):
        frames = [r.frame_number] if r.frame_number else None
        header, note = placed(r.source, frames)  # a multi-frame source's header holding only that frame
        try:
            pm = _parametric_map(result, r, header, settings, i + 1)
        except ValueError as exc:  # a source geometry highdicom cannot place the frame in (e.g. per-frame orientations)
            notes.append(f"no Parametric Map for {r.finding.label}: {str(exc).splitlines()[0]}")
            continue
        if frames:  # highdicom numbered the frames of the header it got
            renumber_frames(pm, str(r.source.SOPInstanceUID), frames)
        maps.append((pm, r.finding.label))
        if note:
            notes.append(f"Parametric Map of {r.finding.label}: {note}")
    for note in notes:
        log.warning("%s", note)
    return maps, notes


def _parametric_map(result: StudyResult, r: Region, header: Dataset, settings: Settings, number: int) -> Dataset:
    """The Grad-CAM of one finding as a Parametric Map on its source image (frame), placed by header."""
    m = result.model
    rows, columns = int(r.source.Rows), int(r.source.Columns)
    cam = np.clip(np.asarray(r.heatmap.cam, dtype=np.float32), 0, 1)
    stored = np.round(to_source_grid(cam, rows, columns) * STORED_MAX).astype(np.uint16)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="AI_ATTENTION",
        lut_explanation=f"AI attention 0-1 for {r.finding.label}; not a probability"[:64],
        unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
        value_range=(0, STORED_MAX),
        slope=1 / STORED_MAX,
        intercept=0,
        quantity_definition=ATTENTION_QUANTITY,
    )
    key = result_key(result)
    pm = hd.pm.ParametricMap(
        source_images=[header],
        pixel_array=stored,
        series_instance_uid=derived_uid(key, "pmap-series"),
        series_number=PMAP_SERIES_NUMBER,
        sop_instance_uid=derived_uid(key, "pmap", r.finding.label),
        instance_number=number,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(
                window_center=STORED_MAX / 2, window_width=STORED_MAX + 1, window_explanation="AI attention 0-1"
            )
        ],
        content_label="AI_ATTENTION",
        content_description=f"Grad-CAM of {m.name} {m.version} for {r.finding.label}: AI attention"[:64],
        **equipment(result, settings),  # type: ignore[arg-type]
    )
    pm.SeriesDescription = PMAP_SERIES_DESCRIPTION
    copy_body_part(pm, r.source)
    return pm
