"""The TID 1500 Comprehensive SR of a result (IHE AI Results profile).

A device observer (this node), the algorithm (TID 4019: model name, version, weights sha256),
one measurement group per label (TID 1501) holding the finding as a qualitative evaluation
(present/absent by the bundle's threshold), the model probability and that threshold (UCUM "1"),
the TID 1410 attention regions of positive findings, the source images, an image library, a
plain-text summary, and an IHE "Processing Algorithm" Contributing Equipment item. What it
references is explained in dxnode/outputs/report.py.

Findings are coded as the bundle's manifest says (SNOMED CT, RadLex: dxnode.inference.codes),
with a private 99DXNODE code only for a label it leaves uncoded. Procedure Reported is the
study's own procedure code when the source carries one, else the generic imaging procedure of its
modality. The device UID is derived from the model's name, version and weights.
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
import numpy as np
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
from dxnode.config import Settings
from dxnode.inference.codes import PRIVATE_SCHEME, label_code
from dxnode.outputs.attention import ATTENTION_LEVEL, attention_outline
from dxnode.outputs.result_uids import derived_uid, result_key
from dxnode.results import Finding, ModelIdentity, StudyResult
from dxnode.states import Task

SCHEME = PRIVATE_SCHEME  # private coding scheme, for model labels with no standard code
PROBABILITY = CodedConcept("C0033204", "UMLS", "Probability")
THRESHOLD = CodedConcept("122411", "DCM", "Threshold Value")  # the bundle's decision threshold of the label
UNITLESS = CodedConcept("1", "UCUM", "no units")
# Measurement method of a TID 1410 attention region (where the model looked, not a lesion outline), and
# the concept of the IMAGE items pointing at the heatmaps.
GRAD_CAM = CodedConcept("130403", "DCM", "Gradient-weighted class activation")
ATTENTION_METHOD = GRAD_CAM
HEATMAP = GRAD_CAM
# Procedure Reported when the source names none: the generic imaging procedure of its modality from CID 100
# (Quantitative Diagnostic Imaging Procedures); "Imaging procedure" for a modality CID 100 has none for.
IMAGING_PROCEDURE = ("363679005", "SCT", "Imaging procedure")
_XR = ("43468-8", "LN", "XR unspecified body region")
PROCEDURE_OF_MODALITY = {
    "CT": ("25045-6", "LN", "CT unspecified body region"),
    "MR": ("25056-3", "LN", "MRI unspecified body region"),
    "NM": ("49118-3", "LN", "NM unspecified body region"),
    "PT": ("44136-0", "LN", "PET unspecified body region"),
    "XA": ("77343006", "SCT", "Angiography"),
    **dict.fromkeys(("CR", "DX", "RG", "RF", "IO", "PX"), _XR),
}
PROCESSING_ALGORITHM = ("Newcode1", "99IHE", "Processing Algorithm")
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation


# Modalities for which highdicom 0.28 adds the TID 1604 (cross-sectional) or TID 1603 (projection)
# image library descriptors (ImageLibraryEntryDescriptors._is_cross_sectional / _is_projection_radiography).
_CROSS_SECTIONAL = frozenset({"CT", "MR", "PT"})
_PROJECTION = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})


def _has_modality_descriptors(ds: Dataset) -> bool:
    """Whether the header holds every attribute highdicom reads for its modality's TID 1603/1604 descriptors."""
    modality = str(ds.get("Modality", ""))
    if modality in _CROSS_SECTIONAL:
        return (
            len(ds.get("PixelSpacing") or []) == 2
            and len(ds.get("ImageOrientationPatient") or []) == 6
            and len(ds.get("ImagePositionPatient") or []) == 3
            and ds.get("SliceThickness") not in (None, "")
        )
    if modality in _PROJECTION:
        return "ImagerPixelSpacing" in ds and len(ds.get("PatientOrientation") or []) == 2
    return True


def library_view(ds: Dataset) -> Dataset:
    """The header as handed to highdicom's image library: TID 1602 descriptors only when 1603/1604 cannot be had.

    TID 1603/1604 descriptors are optional (U), but highdicom reads Imager Pixel Spacing and
    Patient Orientation (projection) or Pixel Spacing, Image Orientation/Position (Patient) and
    Slice Thickness (cross-sectional) unconditionally once Modality names such a modality, and
    raises on real radiographs without them and on enhanced multi-frame images (those keep them
    in functional groups). For such a header highdicom gets a copy whose Modality is "OT", which
    only decides that branch: the library entry's modality code comes from the SOP Class.
    Not yet reported upstream (the SpacingBetweenSlices case was fixed the same way in
    https://github.com/ImagingDataCommons/highdicom/pull/315); to report at
    https://github.com/ImagingDataCommons/highdicom/issues, then drop this view.
    """
    if _has_modality_descriptors(ds):
        return ds
    view = Dataset({tag: elem for tag, elem in ds.items()})  # a new element dict over the same elements
    view.add_new(0x00080060, "CS", "OT")  # a new Modality element: setting .Modality would change ds's
    return view


def summary_line(result: StudyResult) -> str:
    """One line a radiologist can read in any SR viewer."""
    m = result.model
    who = f"{m.name} {m.version}" + (", UNTRAINED DEMO MODEL - results are meaningless" if m.demo else "")
    positives = [f"{f.label} {f.probability:.2f}" for f in result.positive]
    top = ", ".join(f"{f.label} {f.probability:.2f}" for f in result.findings[:3])
    found = ("positive: " + ", ".join(positives)) if positives else "no finding above threshold"
    return f"AI-generated result ({who}): {found}; top: {top}. Not reviewed by a physician."


def _label_concept(label: str, model: ModelIdentity) -> CodedConcept:
    """The code of a model label: the bundle's standard one, else a private 99DXNODE code (dxnode.inference.codes)."""
    return CodedConcept(*label_code(label, model.codes))


def procedure_reported(ds: Dataset) -> CodedConcept:
    """The study's procedure (Procedure Code Sequence, else Requested Procedure Code Sequence) of a source
    header, else the generic imaging procedure of its modality."""
    for keyword in ("ProcedureCodeSequence", "RequestedProcedureCodeSequence"):
        for item in ds.get(keyword) or []:
            value, scheme, meaning = (str(item.get(k, "") or "").strip() for k in _CODE_KEYWORDS)
            if value and scheme and meaning:
                try:
                    return CodedConcept(value, scheme, meaning)
                except (TypeError, ValueError):  # a malformed code in the source: the generic one instead
                    continue
    return CodedConcept(*PROCEDURE_OF_MODALITY.get(str(ds.get("Modality", "") or ""), IMAGING_PROCEDURE))


_CODE_KEYWORDS = ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")


def device_uid(model: ModelIdentity) -> str:
    """The AI device's UID (Contributing Equipment, device observer): new whenever the model's name, version
    or weights change (IHE AIR 6.5.3.1), the same for the same model."""
    return derived_uid("dxnode-device", model.name, model.version, model.sha256)


def _contributing_equipment(settings: Settings, m_name: str, m_version: str, device: str) -> Dataset:
    """IHE AIR Contributing Equipment item, purpose 'Processing Algorithm' (added with pydicom)."""
    item = Dataset()
    item.Manufacturer = settings.report.manufacturer
    item.ManufacturerModelName = f"dxnode / {m_name}"[:64]
    item.SoftwareVersions = [f"dxnode {__version__}", f"{m_name} {m_version}"[:64]]
    item.DeviceUID = device
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = PROCESSING_ALGORITHM
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.ContributionDescription = "AI inference (ResNet-18) and Grad-CAM"
    return item


def _probability(f: Finding, algo: AlgorithmIdentification) -> Measurement:
    """The finding's probability as a TID 300 measurement (UCUM "1", no units)."""
    return Measurement(name=PROBABILITY, value=round(float(f.probability), 6), unit=UNITLESS, algorithm_id=algo)


def _threshold(f: Finding, algo: AlgorithmIdentification) -> Measurement:
    """The decision threshold that made the finding present or absent, as a TID 300 measurement."""
    return Measurement(name=THRESHOLD, value=round(float(f.threshold), 6), unit=UNITLESS, algorithm_id=algo)


def _group(
    f: Finding, sources: dict[str, Dataset], algo: AlgorithmIdentification, key: str, model: ModelIdentity
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of one label: present/absent, probability and threshold, with its source image."""
    concept = _label_concept(f.label, model)
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
        measurements=[_probability(f, algo), _threshold(f, algo)],
        source_images=images or None,
    )


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
            groups.append(_attention_group(f, src, h.frame, shape, points, algo, key, result.model))
    return groups


def _attention_group(
    f: Finding,
    src: Dataset,
    frame: int,
    shape: str,
    points: np.ndarray,
    algo: AlgorithmIdentification,
    key: str,
    model: ModelIdentity,
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
        finding_type=_label_concept(f.label, model),
        method=ATTENTION_METHOD,
        algorithm_id=algo,
        measurements=[_probability(f, algo)],
    )
    for item in group[0].ContentSequence:  # TID 1419 row 5: highdicom 0.28 writes CONTAINS
        if item.ConceptNameCodeSequence[0].CodeValue == "370129005":
            item.RelationshipType = "HAS CONCEPT MOD"
    return group


def segment_groups(
    result: StudyResult, sources: dict[str, Dataset], segs: list[Dataset], algo: AlgorithmIdentification
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """A TID 1411 group per segment of the SEGs the SR comes with: the finding's attention region as a segment."""
    by_code = {_label_concept(f.label, result.model).value: f for f in result.positive}
    heatmaps = {h.label: h for h in result.heatmaps}
    groups = []
    for seg in segs:
        for segment in seg.SegmentSequence:
            f = by_code.get(segment.SegmentedPropertyTypeCodeSequence[0].CodeValue)
            if f is None or f.label not in heatmaps:
                continue
            src = sources[heatmaps[f.label].sop_instance_uid]  # the image (and frame) the segment's frame lies on
            frame = [heatmaps[f.label].frame + 1] if int(src.get("NumberOfFrames", 1) or 1) > 1 else None
            image = hd.sr.SourceImageForSegmentation(str(src.SOPClassUID), str(src.SOPInstanceUID), frame)
            referenced = hd.sr.ReferencedSegment(
                sop_class_uid=str(seg.SOPClassUID),
                sop_instance_uid=str(seg.SOPInstanceUID),
                segment_number=int(segment.SegmentNumber),
                source_images=[image],
            )
            group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=segment.TrackingUID, identifier=segment.TrackingID),
                referenced_segment=referenced,
                finding_type=_label_concept(f.label, result.model),
                method=ATTENTION_METHOD,
                algorithm_id=algo,
                measurements=[_probability(f, algo), _threshold(f, algo)],
            )
            for item in group[0].ContentSequence:  # TID 1419 row 5, as in _attention_group
                if item.ConceptNameCodeSequence[0].CodeValue == "370129005":
                    item.RelationshipType = "HAS CONCEPT MOD"
            groups.append(group)
    return groups


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
    result: StudyResult,
    sources: dict[str, Dataset],
    settings: Settings,
    heatmaps: list[Dataset] | None = None,
    companions: list[Dataset] | None = None,
) -> tuple[Dataset, str]:
    """The Comprehensive SR dataset of a result and its summary line.

    It references the given heatmap SCs and companions (SEG, Parametric Map, GSPS, KOS written
    with it) as evidence; each SEG segment gets a TID 1411 group."""
    companions = list(companions or [])
    m = result.model
    key = result_key(result)
    device = device_uid(m)
    algo = AlgorithmIdentification(name=m.name[:64], version=m.version[:64], parameters=[f"weights sha256 {m.sha256}"])
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device,
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
    groups += segment_groups(result, sources, [c for c in companions if c.SOPClassUID == SEG_SOP_CLASS], algo)
    groups += [_group(f, sources, algo, key, m) for f in result.findings]
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=procedure_reported(evidence[0]),
        imaging_measurements=groups,
        referenced_images=[library_view(ds) for ds in evidence],
    )
    summary = summary_line(result)
    lines = [
        summary,
        "This content was generated by an AI model"
        + (" that is an UNTRAINED DEMO: its findings are meaningless." if m.demo else "."),
        "Each finding is present when its probability is at or above its threshold"
        + (" and it is the most probable label" if m.task == Task.MULTICLASS else "")
        + " (both numbers are in its group).",
    ]
    if any(isinstance(g, PlanarROIMeasurementsAndQualitativeEvaluations) for g in groups):
        lines.append(
            f"Attention regions enclose where the Grad-CAM map is at least {ATTENTION_LEVEL:.0%} of its peak:"
            " where the model looked, not a lesion boundary."
        )
    comments = _comments_container(lines)
    comments.ContentSequence.extend(heatmap_image_items(list(heatmaps or [])))
    report[0].ContentSequence.append(comments)
    sr = ComprehensiveSR(
        evidence=evidence + list(heatmaps or []) + companions,
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
    # highdicom types this as list[ContributingEquipment], whose class accepts only the purpose codes it lists
    # and so refuses IHE's "Processing Algorithm" (99IHE Newcode1): the item is a plain pydicom Dataset.
    sr.ContributingEquipmentSequence = [_contributing_equipment(settings, m.name, m.version, device)]  # type: ignore[list-item]
    if any(label_code(f.label, m.codes)[1] == PRIVATE_SCHEME for f in result.findings):
        sr.CodingSchemeIdentificationSequence = [_private_scheme(settings)]
    return sr, summary


def _private_scheme(settings: Settings) -> Dataset:
    """The Coding Scheme Identification item describing 99DXNODE, which labels without a standard code use."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "dxnode model labels without a standard code"
    item.CodingSchemeResponsibleOrganization = settings.report.manufacturer[:64]
    return item
