"""DICOM Segmentation of the attention regions (IHE AIR's region primitive).

One Segmentation per study, model and source series (highdicom, like the SEG IOD's frame
references, takes source images of one series, or one multi-frame image): one segment per
positive finding with a heatmap, its region traced as for the SR's TID 1410 outline (the
Grad-CAM's connected part >= half its peak, dxnode/outputs/attention.py), resampled to the
source's Rows x Columns. Frames exist only where a region does, each referencing its source
image (and frame), with the source's geometry and Frame of Reference. Only the source images
holding a region are handed to highdicom (their headers): the cost grows with the frames that
hold a region, not with the series. With [report] seg_type = "fractional" the frames carry the
map itself (0..1 in 255 steps) instead of the region.

A multi-frame source (enhanced CT/MR, US or XA cine) gets a Segmentation of its own, with a frame
for each source frame that holds a region (the frame whose Grad-CAM drove the finding), placed
at that frame's plane position; a multi-frame source without per-frame geometry is placed in a
geometry of the map's own (dxnode/outputs/geometry.py). A single-frame image without a Frame of
Reference (most CR/DX) gets a Segmentation of its own without one: the SEG IOD allows that, and
its frame is the image's plane.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dxnode import __version__
from dxnode.config import Settings
from dxnode.outputs.attention import attention_region, to_source_grid
from dxnode.outputs.geometry import frames_of, has_geometry, placed, renumber_frames
from dxnode.outputs.result_uids import derived_uid, result_key
from dxnode.outputs.sc import UNPAIRED_BODY_PARTS, patient_orientation
from dxnode.outputs.sr import _label_concept
from dxnode.results import Finding, Heatmap, ModelIdentity, StudyResult

log = logging.getLogger("dxnode.outputs.seg")

SEG_SERIES_NUMBER = 9903
SEG_SERIES_DESCRIPTION = "AI Attention Regions"
# The segment's category: where the model looked for that finding (its type is the finding's code).
CATEGORY = codes.SCT.MorphologicallyAbnormalStructure


@dataclass(frozen=True)
class Region:
    """A positive finding's heatmap on its source image (the reference header)."""

    finding: Finding
    heatmap: Heatmap
    source: Dataset

    @property
    def frame_number(self) -> int | None:
        """1-based frame of a multi-frame source, None for a single-frame one."""
        return self.heatmap.frame + 1 if is_multiframe(self.source) else None


def is_multiframe(ds: Dataset) -> bool:
    """Whether the header declares more than one frame."""
    return frames_of(ds) > 1


def copy_body_part(ds: Dataset, source: Dataset) -> None:
    """Body Part Examined and Laterality from the source; an empty Laterality (unknown) where General Series needs one."""
    for keyword in ("BodyPartExamined", "Laterality"):
        if source.get(keyword) and keyword not in ds:
            setattr(ds, keyword, source[keyword].value)
    if "Laterality" not in ds and str(ds.get("BodyPartExamined", "")).upper() not in UNPAIRED_BODY_PARTS:
        ds.Laterality = ""  # Type 2C for a paired (or unknown) body part: empty = unknown


def label_code(label: str, model: ModelIdentity) -> hd.sr.CodedConcept:
    """The finding's code, the same the SR's groups use."""
    return _label_concept(label, model)


def positive_regions(result: StudyResult, sources: dict[str, Dataset]) -> list[Region]:
    """Each positive finding with a non-empty heatmap on one of the given sources, most probable first."""
    heatmaps = {h.label: h for h in result.heatmaps}
    regions = []
    for f in result.positive:
        h = heatmaps.get(f.label)
        if h is not None and h.sop_instance_uid in sources and float(np.max(h.cam, initial=0.0)) > 0:
            regions.append(Region(f, h, sources[h.sop_instance_uid]))
    return regions


def by_series(regions: list[Region]) -> list[list[Region]]:
    """Regions grouped by their source series, in first-seen order."""
    groups: dict[str, list[Region]] = {}
    for r in regions:
        groups.setdefault(str(r.source.SeriesInstanceUID), []).append(r)
    return list(groups.values())


def equipment(result: StudyResult, settings: Settings) -> dict[str, str | list[str]]:
    """The General Equipment arguments highdicom's image and presentation-state classes take."""
    m = result.model
    return {
        "manufacturer": settings.report.manufacturer,
        "manufacturer_model_name": f"dxnode / {m.name}"[:64],
        "software_versions": [f"dxnode {__version__}", f"{m.name} {m.version}"[:64]],
        "device_serial_number": settings.node.ae_title,
    }


def algorithm(result: StudyResult) -> hd.AlgorithmIdentificationSequence:
    """The model as a SEG/Parametric Map Algorithm Identification (family: artificial intelligence)."""
    m = result.model
    return hd.AlgorithmIdentificationSequence(
        name=m.name[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=m.version[:64],
        source="dxnode",
        parameters={"weights sha256": m.sha256, "region": "Grad-CAM >= 50% of peak, connected to it"},
    )


def segment_uid(result: StudyResult, label: str) -> str:
    """The Tracking UID of a finding's segment (the SR's TID 1411 group carries it too)."""
    return derived_uid(result_key(result), "seg-segment", label)


def source_groups(regions: list[Region]) -> list[list[Region]]:
    """Regions grouped as a Segmentation takes its source images: by series for single-frame images
    in a patient frame of reference, by instance for a multi-frame image or one without geometry."""
    groups: dict[str, list[Region]] = {}
    for r in regions:
        key = r.source.SeriesInstanceUID if _whole_series(r.source) else r.source.SOPInstanceUID
        groups.setdefault(str(key), []).append(r)
    return list(groups.values())


def _whole_series(source: Dataset) -> bool:
    """Whether a source's regions share a Segmentation with the rest of its series (single-frame, placed in a patient frame)."""
    return not is_multiframe(source) and has_geometry(source)


def build_segs(result: StudyResult, sources: dict[str, Dataset], settings: Settings) -> tuple[list[Dataset], list[str]]:
    """The Segmentations of a result (one per source series with a region, one per multi-frame image
    or image without a Frame of Reference), and notes on what was left out or assumed."""
    segs: list[Dataset] = []
    notes: list[str] = []
    for group in source_groups(positive_regions(result, sources)):
        labels = ", ".join(r.finding.label for r in group)
        sizes = {(int(r.source.Rows), int(r.source.Columns)) for r in group}
        if len(sizes) > 1:
            notes.append(f"no SEG for {labels}: the images of their series differ in size")
            continue
        try:
            seg, note = _segmentation(result, group, settings, len(segs) + 1)
        except ValueError as exc:  # a source geometry highdicom cannot place frames in (e.g. per-frame orientations)
            notes.append(f"no SEG for {labels}: {str(exc).splitlines()[0]}")
            continue
        segs.append(seg)
        if note:
            notes.append(f"SEG of {labels}: {note}")
    for note in notes:
        log.warning("%s", note)
    return segs, notes


def _plane(r: Region, fractional: bool, rows: int, columns: int) -> np.ndarray:
    """A region's frame on its source's grid: the map (fractional) or the attention region."""
    cam = np.clip(np.asarray(r.heatmap.cam, dtype=np.float32), 0, 1)
    return to_source_grid(cam if fractional else attention_region(cam), rows, columns)


def _pixel_array(planes: list[tuple[int, np.ndarray]], images: int, fractional: bool) -> np.ndarray:
    """highdicom's pixel array: a label map (image x rows x columns, value = segment number) when the
    binary regions of each image do not overlap, else stacked segments (image x rows x columns x segment).

    The label map keeps the cost at one plane per image that holds a region, whatever the number of
    segments (stacked, 12 findings on 12 slices of 512 x 512 take 144 planes, 38 MB).
    """
    rows, columns = planes[0][1].shape
    if not fractional:
        labels = np.zeros((images, rows, columns), dtype=np.uint8 if len(planes) < 256 else np.uint16)
        for s, (i, plane) in enumerate(planes):
            if labels[i][plane].any():  # overlaps an earlier segment on this image
                break
            labels[i][plane] = s + 1
        else:
            return labels
    stacked = np.zeros((images, rows, columns, len(planes)), dtype=np.float32 if fractional else np.uint8)
    for s, (i, plane) in enumerate(planes):
        stacked[i, :, :, s] = plane
    return stacked


@dataclass(frozen=True)
class _Layout:
    """How a group's regions map onto highdicom's planes."""

    images: list[Dataset]  # the source images highdicom gets (one, for a multi-frame source)
    plane_of: list[int]  # the plane of each region of the group
    planes: int
    frames: list[int]  # the source frames (1-based) of the planes, for a multi-frame source
    note: str | None  # a pixel spacing assumed by an own geometry


def _layout(group: list[Region]) -> _Layout:
    """A plane per image holding a region, or per frame holding one of a multi-frame image (placed
    where that frame lies: the source's geometry, or the map's own, dxnode/outputs/geometry.py)."""
    if is_multiframe(group[0].source):
        frames = sorted({int(r.frame_number or 1) for r in group})
        header, note = placed(group[0].source, frames)  # holds only those frames, in that order
        index = {f: i for i, f in enumerate(frames)}
        return _Layout([header], [index[int(r.frame_number or 1)] for r in group], len(frames), frames, note)
    images: dict[str, Dataset] = {}
    for r in group:
        images.setdefault(r.heatmap.sop_instance_uid, r.source)
    uids = {uid: i for i, uid in enumerate(images)}
    return _Layout(list(images.values()), [uids[r.heatmap.sop_instance_uid] for r in group], len(images), [], None)


def _segmentation(
    result: StudyResult, group: list[Region], settings: Settings, number: int
) -> tuple[Dataset, str | None]:
    """One Segmentation over the images (or the frames of one multi-frame image) that hold a region,
    and a note when its geometry had to assume a pixel spacing."""
    fractional = settings.report.seg_type == "fractional"
    layout = _layout(group)
    rows, columns = int(group[0].source.Rows), int(group[0].source.Columns)
    planes = [(i, _plane(r, fractional, rows, columns)) for i, r in zip(layout.plane_of, group, strict=True)]
    algo = algorithm(result)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=s + 1,
            segment_label=f"AI attention {r.finding.label}"[:64],
            segmented_property_category=CATEGORY,
            segmented_property_type=label_code(r.finding.label, result.model),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_uid=segment_uid(result, r.finding.label),
            tracking_id=f"AI attention, not a lesion boundary: {r.finding.label}"[:64],
        )
        for s, r in enumerate(group)
    ]
    key = result_key(result)
    series = str(group[0].source.SeriesInstanceUID)
    instance = [] if _whole_series(group[0].source) else [str(group[0].source.SOPInstanceUID)]
    seg = hd.seg.Segmentation(
        source_images=layout.images,
        pixel_array=_pixel_array(planes, layout.planes, fractional),
        segmentation_type="FRACTIONAL" if fractional else "BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(key, "seg-series", settings.report.seg_type),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=derived_uid(key, "seg", settings.report.seg_type, series, *instance),
        instance_number=number,
        fractional_type="PROBABILITY",
        content_label="AI_ATTENTION",
        content_description=(
            f"Grad-CAM {'map' if fractional else 'regions'} of {result.model.name} {result.model.version}: "
            "AI attention, not a lesion boundary"
        )[:64],
        omit_empty_frames=True,
        **equipment(result, settings),  # type: ignore[arg-type]
    )
    if layout.frames:  # highdicom numbered the frames of the header it got
        renumber_frames(seg, str(group[0].source.SOPInstanceUID), layout.frames)
    seg.SeriesDescription = SEG_SERIES_DESCRIPTION  # no Laterality: dciodvfy wants none on a SEG
    if "FrameOfReferenceUID" not in seg:  # no patient coordinates (a radiograph): General Image's Type 2C orientation
        orientation = patient_orientation(group[0].source)
        seg.PatientOrientation = list(orientation) if orientation else []
    return seg, layout.note
