"""Results as DICOM for the PACS: a TID 1500 Comprehensive SR and Grad-CAM Secondary Captures.

The SR follows the IHE AI Results (AIR) profile's use of TID 1500: a device observer (this
node), the algorithm (TID 4019: model name, version, weights sha256), one measurement group per
label (TID 1501) holding the finding as a qualitative evaluation (present/absent by the bundle's
threshold) and the model probability (UCUM "1"), with the source images, an image library, a
plain-text summary, and an IHE "Processing Algorithm" Contributing Equipment item. Each heatmap
is an RGB Secondary Capture with the overlay, a burned-in caption and a colour scale.

What the SR references: only the images its findings name, i.e. the frame that drove each
label's probability (a handful, however large the study). Those are the TID 1501 source images,
the TID 1600 image library entries and the Current Requested Procedure Evidence Sequence, which
so lists every instance the SR references and nothing else. Listing every analysed instance
instead (the image library or Pertinent Other Evidence) would make the SR's size and build time
grow with the study: highdicom deep-copies each library entry, so a 300-slice CT took seconds.
It would also add nothing a viewer can act on, since no content item points at the other images;
which instances a job analysed, skipped or failed is kept per job in the database instead.
The header of each referenced image is read once; the others are never opened.

UIDs are derived from the result itself (study, model name/version/weights, labels,
probabilities, source instances): re-running a job rebuilds the same UIDs, a changed result
gets new ones. Patient and study attributes come from the source instances, so the PACS files
the objects in the same study.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dxnode import __version__
from dxnode.config import MIN_SC_SIDE, Settings
from dxnode.durable import write_durably
from dxnode.results import Finding, Heatmap, StudyResult
from dxnode.source_header import reference_header

log = logging.getLogger("dxnode.report")


def _tolerate_sparse_image_headers() -> None:
    """Let highdicom describe images whose headers lack what its library descriptors read.

    TID 1603/1604 descriptors are optional (U), but highdicom 0.28 reads Imager Pixel Spacing and
    Patient Orientation (projection) or Pixel Spacing, Image Orientation/Position (Patient) and
    Slice Thickness (cross-sectional) unconditionally, and raises on real radiographs without
    them and on enhanced multi-frame images (those keep them in functional groups). Such images
    get the TID 1602 descriptors only.
    """
    cls = hd.sr.ImageLibraryEntryDescriptors
    checks = {
        "_generate_projection_radiography_descriptors": lambda ds: (
            "ImagerPixelSpacing" in ds and len(ds.get("PatientOrientation") or []) == 2
        ),
        "_generate_cross_sectional_descriptors": lambda ds: (
            len(ds.get("PixelSpacing") or []) == 2
            and len(ds.get("ImageOrientationPatient") or []) == 6
            and len(ds.get("ImagePositionPatient") or []) == 3
            and ds.get("SliceThickness") not in (None, "")
        ),
    }
    for name, complete in checks.items():
        original = getattr(cls, name)
        if getattr(original, "_dxnode", False):
            continue

        def descriptors(
            self: object, dataset: Dataset, _original: Any = original, _complete: Any = complete
        ) -> list[object]:
            return list(_original(self, dataset)) if _complete(dataset) else []

        descriptors._dxnode = True  # type: ignore[attr-defined]  # a marker on the function object: patched once
        setattr(cls, name, descriptors)


_tolerate_sparse_image_headers()
# highdicom logs the UIDs of the datasets it copies from at INFO; patient data stays out of INFO logs.
logging.getLogger("highdicom").setLevel(logging.WARNING)

SCHEME = "99DXNODE"  # private coding scheme for model labels
PROBABILITY = CodedConcept("PROB", SCHEME, "AI model probability")
# Measurement method of a TID 1410 attention region: where the model looked, not a lesion outline.
ATTENTION_METHOD = CodedConcept("GRADCAM50", SCHEME, "Grad-CAM attention region (map >= 50% of peak)")
HEATMAP = CodedConcept("HEATMAP", SCHEME, "Grad-CAM heatmap image")
# Share of the Grad-CAM peak above which a pixel belongs to the attention region.
ATTENTION_LEVEL = 0.5
# Most vertices of an attention outline; longer contours are subsampled.
MAX_OUTLINE_POINTS = 64
# Spacing attributes a heatmap SC must not carry: its pixels are resampled and captioned.
SPACING_ATTRIBUTES = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")
PROCESSING_ALGORITHM = ("Newcode1", "99IHE", "Processing Algorithm")
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
# Paired Body Part Examined values (CID 4031) whose series need a Laterality, empty when unknown.
PAIRED_BODY_PARTS = frozenset(
    {
        "ANKLE",
        "ARM",
        "BREAST",
        "CALCANEUS",
        "CALF",
        "CLAVICLE",
        "EAR",
        "ELBOW",
        "EYE",
        "FEMUR",
        "FIBULA",
        "FINGER",
        "FOOT",
        "FOREARM",
        "HAND",
        "HIP",
        "HUMERUS",
        "KIDNEY",
        "KNEE",
        "LEG",
        "ORBIT",
        "PATELLA",
        "RADIUS",
        "SCAPULA",
        "SHOULDER",
        "THIGH",
        "THUMB",
        "TIBIA",
        "TOE",
        "ULNA",
        "WRIST",
    }
)


@dataclass(frozen=True)
class WrittenOutput:
    """A DICOM object written for the PACS."""

    kind: str  # "sr" or "sc"
    label: str  # finding of an SC, "" for the SR
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: Path
    summary: str
    notes: tuple[str, ...] = ()  # what was changed in copying source attributes (never the values)


def result_key(result: StudyResult) -> str:
    """A digest of everything that makes a result what it is (drives the output UIDs)."""
    m = result.model
    parts = [result.study_instance_uid, m.name, m.version, m.sha256]
    if result.route:  # two [[models]] entries serving one bundle still write different objects
        parts.append(f"route={result.route}")
    parts += [
        f"{f.label}={f.probability:.6f}:{int(f.positive)}:{f.source_sop_instance_uid}:{f.source_frame}"
        for f in sorted(result.findings, key=lambda f: f.label)
    ]
    parts += sorted(o.sop_instance_uid for o in result.instances if o.state == "done")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def derived_uid(*parts: str) -> str:
    """A deterministic UID in the 2.25 (UUID-derived) form from the given strings.

    pydicom's generate_uid(prefix=None) ignores its entropy sources, so the 128-bit integer is
    taken from a sha256 of the parts here (at most 44 characters).
    """
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


def summary_line(result: StudyResult) -> str:
    """One line a radiologist can read in any SR viewer."""
    m = result.model
    who = f"{m.name} {m.version}" + (", UNTRAINED DEMO MODEL - results are meaningless" if m.demo else "")
    positives = [f"{f.label} {f.probability:.2f}" for f in result.positive]
    top = ", ".join(f"{f.label} {f.probability:.2f}" for f in result.findings[:3])
    found = ("positive: " + ", ".join(positives)) if positives else "no finding above threshold"
    return f"AI-generated result ({who}): {found}; top: {top}. Not reviewed by a physician."


def _label_concept(label: str) -> CodedConcept:
    """The private code of a model label: the label itself when it fits a code value, else a digest.

    Code values are at most 16 characters; labels that differ only past that or in punctuation
    must still get different codes.
    """
    code = "".join(c if c.isalnum() else "_" for c in label.upper())
    if not code or code != label.upper() or len(code) > 16:
        code = f"{code[:7]}_{hashlib.sha256(label.encode()).hexdigest()[:8]}".lstrip("_")
    return CodedConcept(code, SCHEME, label[:64])


def _contributing_equipment(settings: Settings, m_name: str, m_version: str, device_uid: str) -> Dataset:
    """IHE AIR Contributing Equipment item, purpose 'Processing Algorithm' (added with pydicom)."""
    item = Dataset()
    item.Manufacturer = settings.report.manufacturer
    item.ManufacturerModelName = f"dxnode / {m_name}"[:64]
    item.SoftwareVersions = [f"dxnode {__version__}", f"{m_name} {m_version}"[:64]]
    item.DeviceUID = device_uid
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = PROCESSING_ALGORITHM
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.ContributionDescription = "AI inference (ResNet-18) and Grad-CAM"
    return item


def _probability(f: Finding, algo: AlgorithmIdentification) -> Measurement:
    """The finding's probability as a TID 300 measurement (UCUM "1", no units)."""
    return Measurement(
        name=PROBABILITY,
        value=round(float(f.probability), 6),
        unit=CodedConcept("1", "UCUM", "no units"),
        algorithm_id=algo,
    )


def _group(
    f: Finding, sources: dict[str, Dataset], algo: AlgorithmIdentification, key: str
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of one label: present/absent and probability, with its source image."""
    concept = _label_concept(f.label)
    images = []
    if f.source_sop_instance_uid and f.source_sop_instance_uid in sources:
        src = sources[f.source_sop_instance_uid]
        frames = [f.source_frame + 1] if int(src.get("NumberOfFrames", 1) or 1) > 1 else None
        images.append(
            SourceImageForMeasurementGroup(
                str(src.SOPClassUID), str(src.SOPInstanceUID), referenced_frame_numbers=frames
            )
        )
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=derived_uid(key, "group", f.label), identifier=f.label[:64]),
        finding_type=concept,
        algorithm_id=algo,
        qualitative_evaluations=[QualitativeEvaluation(concept, codes.SCT.Present if f.positive else codes.SCT.Absent)],
        measurements=[_probability(f, algo)],
        source_images=images or None,
    )


def connected_region(mask: np.ndarray, seed: tuple[Any, ...]) -> np.ndarray:
    """The part of a 2-D boolean mask 4-connected to seed (which is in it), as a boolean mask.

    Runs of each row are joined to the overlapping runs of the rows above and below: a Python
    loop over runs, not pixels (what scipy.ndimage.label's default structure connects).
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    starts = [np.flatnonzero(edges[r] == 1) for r in range(h)]  # run r: columns [start, end)
    ends = [np.flatnonzero(edges[r] == -1) for r in range(h)]
    out = np.zeros_like(mask, dtype=bool)
    r0, c0 = int(seed[0]), int(seed[1])
    first = int(np.searchsorted(ends[r0], c0, side="right"))
    todo, seen = [(r0, first)], {(r0, first)}
    while todo:
        r, i = todo.pop()
        s, e = int(starts[r][i]), int(ends[r][i])
        out[r, s:e] = True
        for nr in (r - 1, r + 1):
            if 0 <= nr < h:  # runs of row nr overlapping columns [s, e)
                for j in range(int(np.searchsorted(ends[nr], s, side="right")), int(np.searchsorted(starts[nr], e))):
                    if (nr, j) not in seen:
                        seen.add((nr, j))
                        todo.append((nr, j))
    return out


def attention_outline(cam: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Closed outline (column, row pairs, source pixel coordinates) of the map's region >= half its peak.

    The region is the connected part above ATTENTION_LEVEL that holds the peak; the map (the
    heatmap's, at display size: the source's or a downsampled copy of its extent) is scaled from
    its own size to Rows x Columns, edge to edge, with DICOM's convention that the image spans
    (0, 0) to (Columns, Rows) and pixel centres are at +0.5; the result is clipped to that span.
    """
    from contourpy import contour_generator

    cam = np.asarray(cam, dtype=np.float32)
    peak = float(cam.max()) if cam.size else 0.0
    sx, sy = columns / cam.shape[1], rows / cam.shape[0]
    if peak <= 0:
        return np.array([[0, 0], [columns, 0], [columns, rows], [0, rows], [0, 0]], dtype=np.float32)
    mask = connected_region(cam >= ATTENTION_LEVEL * peak, np.unravel_index(int(np.argmax(cam)), cam.shape))
    padded = np.pad(mask.astype(np.float32), 1)  # a zero border makes every contour closed
    lines: list[np.ndarray] = list(contour_generator(z=padded).lines(0.5))  # type: ignore[arg-type]
    line: np.ndarray = max(lines, key=len) if lines else np.empty((0, 2))
    if len(line) < 4:  # a point or a line: the bounding box of the region instead
        r, c = np.nonzero(mask)
        x0, x1, y0, y1 = c.min() - 0.5, c.max() + 0.5, r.min() - 0.5, r.max() + 0.5
        line = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]) + 1
    if len(line) > MAX_OUTLINE_POINTS:
        line = line[np.linspace(0, len(line) - 1, MAX_OUTLINE_POINTS).round().astype(int)]
    xy = (np.asarray(line, dtype=np.float64) - 1 + 0.5) * [sx, sy]  # back from the padding, to pixel edges
    xy = np.clip(xy, 0, [columns, rows])
    if not np.array_equal(xy[0], xy[-1]):
        xy = np.vstack([xy, xy[:1]])
    return xy.round(2).astype(np.float32)


def attention_groups(
    result: StudyResult, sources: dict[str, Dataset], algo: AlgorithmIdentification, key: str
) -> list[PlanarROIMeasurementsAndQualitativeEvaluations]:
    """Two TID 1410 groups per positive finding with a heatmap: outline and bounding box of its Grad-CAM attention region."""
    heatmaps = {h.label: h for h in result.heatmaps}
    groups = []
    for f in result.positive:
        h = heatmaps.get(f.label)
        if h is None or h.sop_instance_uid not in sources:
            continue
        src = sources[h.sop_instance_uid]
        outline = attention_outline(h.cam, int(src.Rows), int(src.Columns))
        (x0, y0), (x1, y1) = outline.min(axis=0), outline.max(axis=0)
        box = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)
        # Both shapes, for viewers that draw only one kind (and Pixelmed's validator misreads a report
        # holding exactly one TID 1410 group).
        for shape, points in (("outline", outline), ("box", box)):
            groups.append(_attention_group(f, src, h.frame, shape, points, algo, key))
    return groups


def _attention_group(
    f: Finding,
    src: Dataset,
    frame: int,
    shape: str,
    points: np.ndarray,
    algo: AlgorithmIdentification,
    key: str,
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """One TID 1410 group: a closed polyline on the source image (and frame), the probability as its measurement."""
    frames = [frame + 1] if int(src.get("NumberOfFrames", 1) or 1) > 1 else None
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=points,
        source_image=hd.sr.SourceImageForRegion(
            str(src.SOPClassUID), str(src.SOPInstanceUID), referenced_frame_numbers=frames
        ),
    )
    group = PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derived_uid(key, "attention", shape, f.label),
            identifier=f"AI attention {shape}, not a lesion boundary: {f.label}"[:64],
        ),
        referenced_region=region,
        finding_type=_label_concept(f.label),
        method=ATTENTION_METHOD,
        algorithm_id=algo,
        measurements=[_probability(f, algo)],
    )
    for item in group[0].ContentSequence:  # TID 1419 row 5: highdicom 0.28 writes CONTAINS
        if item.ConceptNameCodeSequence[0].CodeValue == "370129005":
            item.RelationshipType = "HAS CONCEPT MOD"
    return group


def heatmap_image_items(heatmaps: list[Dataset]) -> list[hd.sr.ImageContentItem]:
    """IMAGE content items pointing at the heatmap SCs the SR comes with (as AI Results samples do)."""
    return [
        hd.sr.ImageContentItem(
            name=HEATMAP,
            referenced_sop_class_uid=str(sc.SOPClassUID),
            referenced_sop_instance_uid=str(sc.SOPInstanceUID),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        for sc in heatmaps
    ]


def _comments_container(lines: list[str]) -> hd.sr.ContainerContentItem:
    """TID 1500 'Qualitative Evaluations' container with plain-text lines."""
    container = hd.sr.ContainerContentItem(
        name=CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=CodedConcept("121106", "DCM", "Comment"),
                value=line[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for line in lines
        ]
    )
    return container


def build_sr(
    result: StudyResult, sources: dict[str, Dataset], settings: Settings, heatmaps: list[Dataset] | None = None
) -> tuple[Dataset, str]:
    """The Comprehensive SR dataset of a result and its summary line; it references the given heatmap SCs."""
    m = result.model
    key = result_key(result)
    device_uid = derived_uid("dxnode-device", settings.node.ae_title)
    algo = AlgorithmIdentification(name=m.name[:64], version=m.version[:64], parameters=[f"weights sha256 {m.sha256}"])
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid,
            name=settings.node.ae_title,
            manufacturer_name=settings.report.manufacturer,
            model_name=f"dxnode {__version__}",
        ),
    )
    # Only the images the findings name (see the module docstring); the first source when none does.
    named = sorted({f.source_sop_instance_uid for f in result.findings if f.source_sop_instance_uid in sources})
    evidence = [sources[uid] for uid in named] or [sources[uid] for uid in sorted(sources)[:1]]
    # TID 1500 lists planar ROI groups (TID 1410) before the whole-image ones (TID 1501); Pixelmed's validator wants that order.
    groups: list[Any] = attention_groups(result, sources, algo, key) if settings.report.attention_roi else []
    groups += [_group(f, sources, algo, key) for f in result.findings]
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=CodedConcept("363679005", "SCT", "Imaging procedure"),
        imaging_measurements=groups,
        referenced_images=evidence,
    )
    summary = summary_line(result)
    lines = [
        summary,
        "This content was generated by an AI model"
        + (" that is an UNTRAINED DEMO: its findings are meaningless." if m.demo else "."),
    ]
    comments = _comments_container(lines)
    comments.ContentSequence.extend(heatmap_image_items(list(heatmaps or [])))
    report[0].ContentSequence.append(comments)
    sr = ComprehensiveSR(
        evidence=evidence + list(heatmaps or []),
        content=report[0],
        series_instance_uid=derived_uid(key, "sr-series"),
        series_number=settings.report.sr_series_number,
        sop_instance_uid=derived_uid(key, "sr"),
        instance_number=1,
        manufacturer=settings.report.manufacturer,
        institution_name=settings.report.institution_name or None,
        is_complete=True,
        contributing_equipment=None,
    )
    sr.SeriesDescription = settings.report.sr_series_description[:64]
    # highdicom types this as list[ContributingEquipment], whose class refuses IHE's "Processing
    # Algorithm" purpose code (DESIGN.md), so the item is a plain pydicom Dataset.
    sr.ContributingEquipmentSequence = [_contributing_equipment(settings, m.name, m.version, device_uid)]  # type: ignore[list-item]
    return sr, summary


def caption_lines(h: Heatmap, f: Finding, result: StudyResult) -> list[str]:
    """The burned-in caption of a heatmap SC."""
    m = result.model
    lines = [
        f"AI GENERATED - {f.label}: probability {f.probability:.3f} ({'POSITIVE' if f.positive else 'negative'}, threshold {f.threshold:.2f})",
        f"Grad-CAM heatmap, model {m.name} {m.version}",
    ]
    if m.demo:
        lines.append("UNTRAINED DEMO MODEL - NOT A DIAGNOSIS")
    return lines


def _caption_font(width: int) -> tuple[Any, int]:
    """The caption font for a canvas this wide, and its size in pixels."""
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


def render_caption(overlay: np.ndarray, lines: list[str], max_side: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """The overlay with a caption panel and a low-high colour scale below it, and the overlay's size in it.

    The canvas is at least MIN_SC_SIDE px wide (a narrower overlay is enlarged to that width).
    With max_side (>= MIN_SC_SIDE), neither side of the canvas exceeds it: the overlay is scaled
    down, aspect kept, to leave room for the panel (centred if that makes it narrower than the
    canvas). Returns (RGB canvas, (height, width) of the overlay in it).
    """
    from PIL import Image, ImageDraw

    from dxnode.colormap import jet

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
    ramp = (jet(np.linspace(0, 1, bar_w)) * 255).astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(ramp[np.newaxis], bar_h, axis=0)), (label_w, y + (line_h - bar_h) // 2))
    draw.text((size // 2, y), "low", fill=(255, 255, 255), font=font)
    draw.text((label_w + bar_w + size // 2, y), "high", fill=(255, 255, 255), font=font)
    return np.asarray(canvas), (img.height, img.width)


def image_orientation(source: Dataset, frame: int = 0) -> list[float] | None:
    """Image Orientation (Patient) of a frame: top level, else the enhanced per-frame or shared functional group."""
    if len(source.get("ImageOrientationPatient") or []) == 6:
        return [float(x) for x in source.ImageOrientationPatient]
    groups = list(source.get("PerFrameFunctionalGroupsSequence") or [])[frame : frame + 1] + list(
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
    for keyword in ("BodyPartExamined", "Laterality", "ImageLaterality"):
        if source.get(keyword) and keyword not in sc:  # an empty one means unknown, handled below
            setattr(sc, keyword, source[keyword].value)
    if (
        "Laterality" not in sc
        and "ImageLaterality" not in sc
        and str(sc.get("BodyPartExamined", "")).upper() in PAIRED_BODY_PARTS | {""}
    ):
        sc.Laterality = ""  # type 2C in General Series for a paired (or unknown) body part: empty = unknown
    return sc, lines[0]


def write_outputs(
    result: StudyResult,
    sources: dict[str, Path],
    settings: Settings,
    out_dir: Path,
    timings: dict[str, float] | None = None,
) -> list[WrittenOutput]:
    """Write the SR and one SC per heatmap under out_dir/<study>/, atomically; return what was written.

    sources maps the analysed instances to their files; only those the findings and heatmaps
    reference are read. Every object is built before any is written: a result that cannot be
    encoded leaves no file. timings gets the seconds of the sr, sc and write steps added.
    """
    by_label = {f.label: f for f in result.findings}
    for h in result.heatmaps:
        if h.label not in by_label:
            raise ValueError(f"heatmap for {h.label!r}, which is not a finding of the result")
        if h.sop_instance_uid not in sources:
            raise ValueError(
                f"heatmap for {h.label!r} is on instance {h.sop_instance_uid}, which is not among the sources"
            )
    stopwatch = _Stopwatch(timings)
    referenced = {f.source_sop_instance_uid for f in result.findings if f.source_sop_instance_uid in sources}
    referenced |= {h.sop_instance_uid for h in result.heatmaps}
    with stopwatch("sr"):
        headers: dict[str, Dataset] = {}
        notes: dict[str, list[str]] = {}
        for uid in sorted(referenced):
            headers[uid], notes[uid] = reference_header(pydicom.dcmread(sources[uid], stop_before_pixels=True))
            for note in notes[uid]:  # UIDs only at DEBUG, like other patient data; the job log keeps the notes
                log.warning("source header copied into SR/SC with a change: %s", note)
                log.debug("that change was on study %s, instance %s", result.study_instance_uid, uid)
    scs = []  # before the SR, which references them
    with stopwatch("sc"):
        for i, h in enumerate(result.heatmaps):
            sc, caption = build_sc(h, by_label[h.label], result, headers[h.sop_instance_uid], settings, i)
            scs.append((sc, "sc", h.label, caption, tuple(notes[h.sop_instance_uid])))
    with stopwatch("sr"):
        sr, summary = build_sr(result, headers, settings, [sc for sc, *_ in scs])
    sr_notes = tuple(notes[min(headers)]) if headers else ()  # highdicom copies from the first evidence
    built = [(sr, "sr", "", summary, sr_notes), *scs]
    folder = Path(out_dir) / result.study_instance_uid
    with stopwatch("write"):
        return [_save(ds, folder, kind, label, text, n) for ds, kind, label, text, n in built]


class _Stopwatch:
    """Adds the seconds spent in named blocks to a timings dict (if one is given)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.timings is not None:
                self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


def _save(ds: Dataset, folder: Path, kind: str, label: str, summary: str, notes: tuple[str, ...]) -> WrittenOutput:
    """Encode and write one object durably."""
    from io import BytesIO

    ds.ContentDate = ds.get("ContentDate") or dt.datetime.now(dt.UTC).strftime("%Y%m%d")
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    write_durably(path, buf.getvalue())
    return WrittenOutput(
        kind,
        label,
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
        str(ds.SeriesInstanceUID),
        path.resolve(),
        summary,
        notes,
    )
