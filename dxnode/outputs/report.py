"""Results as DICOM for the PACS: a TID 1500 Comprehensive SR, Grad-CAM Secondary Captures, and
the Segmentation, Parametric Map, GSPS and KOS objects (the kinds some destination's `outputs`
names: dxnode/outputs/seg.py, pmap.py, gsps.py, kos.py; the SR references each one written).

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

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom import Dataset

from dxnode.config import Settings
from dxnode.durable import write_durably
from dxnode.outputs.gsps import build_gsps
from dxnode.outputs.kos import build_kos
from dxnode.outputs.pmap import build_pmaps
from dxnode.outputs.sc import build_sc
from dxnode.outputs.seg import build_segs
from dxnode.outputs.source_header import reference_header
from dxnode.outputs.sr import build_sr
from dxnode.results import StudyResult
from dxnode.states import OutputKind

log = logging.getLogger("dxnode.outputs.report")

DEFAULT_KINDS = frozenset({OutputKind.SR, OutputKind.SC})


@dataclass(frozen=True)
class WrittenOutput:
    """A DICOM object written for the PACS."""

    kind: str  # an OutputKind value: "sr", "sc", "seg", "pmap", "gsps" or "kos"
    label: str  # finding of an SC or Parametric Map, "" for the others
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: Path
    summary: str
    notes: tuple[str, ...] = ()  # what was changed in copying source attributes (never the values)


def wanted_kinds(settings: Settings) -> frozenset[OutputKind]:
    """The kinds some destination wants (every destination's `outputs`); sr and sc when none is configured."""
    if not settings.destinations:
        return DEFAULT_KINDS
    return frozenset(k for d in settings.destinations for k in d.outputs)


def write_outputs(
    result: StudyResult,
    sources: dict[str, Path],
    settings: Settings,
    out_dir: Path,
    timings: dict[str, float] | None = None,
    kinds: Collection[OutputKind] | None = None,
    strict: bool = False,
) -> list[WrittenOutput]:
    """Write the result objects of the given kinds (else those some destination wants) under out_dir/<study>/.

    sources maps the analysed instances to their files; only those the findings and heatmaps
    reference are read. Every object is built before any is written: a result that cannot be
    encoded leaves no file. The SR, built last, references every other object written with it.
    timings gets the seconds of each kind's step and of the write step added. An object whose build
    raises is left out with a note, unless strict: then any such failure raises (the job first looks
    for the instance to blame, jobs/isolate.py, before it settles for the notes).
    """
    wanted = frozenset(kinds) if kinds is not None else wanted_kinds(settings)
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
        frames: dict[str, set[int]] = {uid: set() for uid in referenced}  # the per-frame items the writers read
        for f in result.findings:
            if f.source_sop_instance_uid in frames:
                frames[f.source_sop_instance_uid].add(f.source_frame)
        for h in result.heatmaps:
            frames[h.sop_instance_uid].add(h.frame)
        for uid in sorted(referenced):
            source = pydicom.dcmread(sources[uid], stop_before_pixels=True)
            headers[uid], notes[uid] = reference_header(source, frames[uid])
            for note in notes[uid]:  # UIDs only at DEBUG, like other patient data; the job log keeps the notes
                log.warning("source header copied into the result objects with a change: %s", note)
                log.debug("that change was on study %s, instance %s", result.study_instance_uid, uid)
    first_notes = tuple(notes[min(headers)]) if headers else ()  # highdicom copies from the first source
    built: list[_Built] = []  # before the SR, which references them
    skipped: list[str] = []  # what a kind left out (a geometry highdicom refuses) or assumed (a pixel spacing)
    failed: list[str] = []  # the objects whose build raised: left out, the others still written
    if OutputKind.SC in wanted:
        with stopwatch("sc"):
            for i, h in enumerate(result.heatmaps):
                with _or_noted(f"SC for {h.label}", failed):
                    sc, caption = build_sc(h, by_label[h.label], result, headers[h.sop_instance_uid], settings, i)
                    built.append(_Built(sc, OutputKind.SC, h.label, caption, tuple(notes[h.sop_instance_uid])))
    built += _companions(result, headers, settings, wanted, stopwatch, first_notes, skipped, failed)
    if OutputKind.SR in wanted:
        with stopwatch("sr"), _or_noted("SR", failed):
            scs = [b.ds for b in built if b.kind == OutputKind.SC]
            others = [b.ds for b in built if b.kind != OutputKind.SC]
            sr, summary = build_sr(result, headers, settings, scs, others)
            built.insert(0, _Built(sr, OutputKind.SR, "", summary, first_notes))
    if failed and not built:
        raise ValueError("no result object could be built: " + "; ".join(failed))
    if failed and strict:
        raise ValueError("; ".join(failed))
    skipped += failed
    if skipped and built:  # the job log shows each output's notes
        built[0] = dataclasses.replace(built[0], notes=built[0].notes + tuple(skipped))
    folder = Path(out_dir) / result.study_instance_uid
    with stopwatch("write"):
        return [_save(b.ds, folder, b.kind, b.label, b.summary, b.notes) for b in built]


@dataclass(frozen=True)
class _Built:
    """An object built and not yet written."""

    ds: Dataset
    kind: OutputKind
    label: str
    summary: str
    notes: tuple[str, ...]


def _companions(
    result: StudyResult,
    headers: dict[str, Dataset],
    settings: Settings,
    wanted: frozenset[OutputKind],
    stopwatch: _Stopwatch,
    notes: tuple[str, ...],
    skipped: list[str],
    failed: list[str],
) -> list[_Built]:
    """The SEG, Parametric Map, GSPS and KOS objects wanted (each kind timed under its name); what a
    kind left out is added to skipped, a kind whose build raised to failed (`_or_noted`)."""
    built: list[_Built] = []
    if OutputKind.SEG in wanted:
        with stopwatch("seg"), _or_noted("SEG", failed):
            segs, left_out = build_segs(result, headers, settings)
            skipped += left_out
            labels = [", ".join(str(s.SegmentLabel) for s in seg.SegmentSequence) for seg in segs]
            built += [
                _Built(seg, OutputKind.SEG, "", f"SEG: {text}", notes) for seg, text in zip(segs, labels, strict=True)
            ]
    if OutputKind.PMAP in wanted:
        with stopwatch("pmap"), _or_noted("Parametric Map", failed):
            maps, left_out = build_pmaps(result, headers, settings)
            skipped += left_out
            built += [
                _Built(pm, OutputKind.PMAP, label, f"Parametric Map: AI attention {label}", notes) for pm, label in maps
            ]
    if OutputKind.GSPS in wanted:
        with stopwatch("gsps"), _or_noted("GSPS", failed):
            states, left_out = build_gsps(result, headers, settings)
            skipped += left_out
            built += [
                _Built(ps, OutputKind.GSPS, "", f"{_STATE_NAMES[ps.SOPClassUID]}: AI attention outlines", notes)
                for ps in states
            ]
    if OutputKind.KOS in wanted:
        with stopwatch("kos"), _or_noted("KOS", failed):
            selections = build_kos(result, headers, settings)
            built += [_Built(ko, OutputKind.KOS, "", "KOS: images with positive findings", notes) for ko in selections]
    return built


# What the summary calls a presentation state, by SOP class (Grayscale / Color Softcopy Presentation State).
_STATE_NAMES = {"1.2.840.10008.5.1.4.1.1.11.1": "GSPS", "1.2.840.10008.5.1.4.1.1.11.2": "CSPS"}


@contextmanager
def _or_noted(what: str, failed: list[str]) -> Iterator[None]:
    """Build one object (or kind); if it raises, note it in failed and go on, so that one kind that
    cannot be built never costs the study its other objects. A build only computes on headers
    already read, so the same result fails the same way on a re-run: a note, not a retry."""
    try:
        yield
    except MemoryError:
        raise
    except Exception as exc:  # highdicom raises ValueError, TypeError, AttributeError... on what it cannot encode
        text = str(exc).strip()
        note = f"no {what}: {text.splitlines()[0] if text else type(exc).__name__}"
        log.warning("%s", note)
        log.debug("the build of the %s raised", what, exc_info=True)
        failed.append(note)


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
