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

Here: the order of work and the writing. The SR is built in dxnode/outputs/sr.py, the SCs in
dxnode/outputs/sc.py, the UIDs in dxnode/outputs/result_uids.py, attention outlines in dxnode/outputs/attention.py.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom import Dataset

from dxnode.config import Settings
from dxnode.durable import write_durably
from dxnode.outputs.sc import build_sc
from dxnode.outputs.source_header import reference_header
from dxnode.outputs.sr import build_sr
from dxnode.results import StudyResult

log = logging.getLogger("dxnode.outputs.report")


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
