"""Where the frames of a SEG or Parametric Map lie: in the source's geometry, or in a geometry of their own.

highdicom places derived frames by the source's Frame of Reference and plane geometry (Image
Position / Orientation (Patient) and Pixel Spacing, or the functional groups of a multi-frame
image). The Parametric Map IOD requires a Frame of Reference, and highdicom takes the frames of a
multi-frame source only with per-frame plane positions; most CR/DX, and US, XA, RF or NM cine,
have neither. For such a source, `own_geometry` gives highdicom a copy of its header placed in a
frame of reference of the map's own:

- Frame of Reference UID derived from the source instance's UID (the same on every re-run, and
  one per image: two radiographs of one series do not share a space), Position Reference
  Indicator empty;
- identity orientation (rows along +x, columns along +y), frame k (1-based) at (0, 0, k - 1) mm,
  so that the frames of a cine stay distinct planes;
- Pixel Spacing the source's Pixel Spacing, else its Imager Pixel Spacing, else 1 mm (with a note);
  Slice Thickness the source's, else 1 mm (the step between the frames; the SEG IOD needs one).

That frame of reference is the map's own, not the patient's: it only makes the map a plane of its
source image's size and spacing. What ties the map to its image is the reference to the source
instance (and frame) in each frame's Derivation Image Sequence.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import highdicom as hd
from highdicom.spatial import get_image_coordinate_system
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from dxnode.outputs.result_uids import derived_uid

IDENTITY = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
FALLBACK_SPACING = [1.0, 1.0]  # mm, when the source names no spacing at all
PER_FRAME = 0x52009230  # Per-Frame Functional Groups Sequence


def frames_of(ds: Dataset) -> int:
    """The number of frames the header declares (1 without Number of Frames)."""
    return int(ds.get("NumberOfFrames", 1) or 1)


def has_geometry(ds: Dataset) -> bool:
    """Whether highdicom can place derived frames in the source's own Frame of Reference.

    That needs the Frame of Reference UID and a plane position (top-level for a single-frame image,
    in the functional groups of a multi-frame one).
    """
    if "FrameOfReferenceUID" not in ds:
        return False
    if frames_of(ds) > 1 and len(ds.get("PerFrameFunctionalGroupsSequence") or []) != frames_of(ds):
        return False  # a legacy multi-frame header (one top-level position cannot place every frame), or a broken one
    return get_image_coordinate_system(ds) == hd.CoordinateSystemNames.PATIENT


def own_frame_of_reference_uid(source: Dataset) -> str:
    """The Frame of Reference UID of a map placed in its own geometry: one per source image, stable across re-runs."""
    return derived_uid("dxnode own frame of reference", str(source.SOPInstanceUID))


def source_spacing(source: Dataset) -> tuple[list[float], str | None]:
    """(row, column) spacing in mm for an own geometry, and a note when the source names none."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = source.get(keyword)
        try:
            spacing = [float(v) for v in value] if value is not None else []
        except (TypeError, ValueError):
            spacing = []
        if len(spacing) == 2 and all(v > 0 for v in spacing):
            return spacing, None
    return list(FALLBACK_SPACING), "its source names no pixel spacing: 1 mm per pixel assumed"


def _positive(value: object) -> float | None:
    """A positive number, or None."""
    try:
        number = float(str(value)) if value not in (None, "") else 0.0
    except ValueError:
        return None
    return number if 0 < number < math.inf else None


def own_geometry(source: Dataset, frames: list[int] | None = None) -> tuple[Dataset, str | None]:
    """A copy of the source header placed in a frame of reference of the map's own (module docstring),
    holding only the given frames (1-based, in that order; `only_frames`) or every frame, and a note
    when the spacing had to be assumed. The source header itself is left as it is."""
    spacing, note = source_spacing(source)
    thickness = _positive(source.get("SliceThickness")) or 1.0
    numbers = frames or list(range(1, frames_of(source) + 1))
    shared = Dataset()
    shared.PlaneOrientationSequence = hd.PlaneOrientationSequence("PATIENT", IDENTITY)
    shared.PixelMeasuresSequence = hd.PixelMeasuresSequence(spacing, slice_thickness=thickness)
    per_frame = []
    for f in numbers:
        item = Dataset()
        item.PlanePositionSequence = hd.PlanePositionSequence("PATIENT", [0.0, 0.0, float(f - 1)])
        per_frame.append(item)
    values: dict[str, object] = {
        "FrameOfReferenceUID": own_frame_of_reference_uid(source),
        "PositionReferenceIndicator": "",
        "ImagePositionPatient": [0.0, 0.0, 0.0],
        "ImageOrientationPatient": IDENTITY,
        "PixelSpacing": spacing,
        "SliceThickness": thickness,
        # highdicom reads an image of a multi-frame IOD (US, XA, enhanced MR) through its functional groups
        "NumberOfFrames": len(numbers),
        "SharedFunctionalGroupsSequence": Sequence([shared]),
        "PerFrameFunctionalGroupsSequence": Sequence(per_frame),
    }
    ds = without_frames(source)  # a new mapping of the same elements: replacing one here leaves the source's
    for keyword, value in values.items():
        if keyword in ds:
            delattr(ds, keyword)
        setattr(ds, keyword, value)
    return ds, note


def placed(source: Dataset, frames: list[int] | None = None) -> tuple[Dataset, str | None]:
    """The header highdicom should place a map of the source by: the source's own where it has a
    geometry, else a copy in the map's own (with a note when the spacing is assumed); for a
    multi-frame source, holding only the given frames (1-based; `only_frames`)."""
    if not has_geometry(source):
        return own_geometry(source, frames)
    return (only_frames(source, frames) if frames else source), None


def only_frames(header: Dataset, frames: list[int]) -> Dataset:
    """A copy of a multi-frame header that holds only the given frames (1-based), in that order.

    highdicom reads every frame's position of its source to match the derived planes to frames
    (about 0.3 ms a frame and object: a third of a second per object on a 1,000-frame CT); handed
    only the frames that hold a region, it costs what the regions cost. Its references then
    number the frames of this copy: `renumber_frames` maps them back to the source's.
    """
    ds = without_frames(header)
    del ds.NumberOfFrames
    ds.NumberOfFrames = len(frames)
    ds.PerFrameFunctionalGroupsSequence = Sequence([header.PerFrameFunctionalGroupsSequence[f - 1] for f in frames])
    return ds


def without_frames(header: Dataset) -> Dataset:
    """A new mapping of a header's elements less its per-frame functional groups (added back by the caller):
    copying that element would read every frame's item (pydicom walks a sequence it is given)."""
    ds = Dataset()
    ds.update({tag: elem for tag, elem in header.items() if tag != PER_FRAME})
    return ds


def renumber_frames(ds: Dataset, sop_instance_uid: str, frames: list[int]) -> None:
    """Map the frame numbers that reference a copy made by `only_frames` back to the source's frames."""
    for item in {id(i): i for i in _frame_references(ds, sop_instance_uid)}.values():  # highdicom shares items
        numbers = item.ReferencedFrameNumber
        mapped = [frames[int(n) - 1] for n in (numbers if isinstance(numbers, MultiValue | list) else [numbers])]
        item.ReferencedFrameNumber = mapped if len(mapped) > 1 else mapped[0]


def _frame_references(ds: Dataset, sop_instance_uid: str) -> Iterator[Dataset]:
    """The items, at any depth, that reference frames of the given instance."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                if item.get("ReferencedSOPInstanceUID") == sop_instance_uid and "ReferencedFrameNumber" in item:
                    yield item
                yield from _frame_references(item, sop_instance_uid)
