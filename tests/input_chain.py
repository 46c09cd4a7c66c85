"""One received file through the node's input path in-process: receive (size bound, parse), the pixel
pipeline, and the SR/SC outputs, as the fuzz test and the hostile regressions run it.

Each stage either refuses with its documented error (StoreRefused, PipelineError) or gives a result;
anything else escapes as a failure of the test. The outputs are built from a hand-made StudyResult
(a Grad-CAM-like blob on the first frame), so no model runs.
"""

from __future__ import annotations

import tempfile
import zlib
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from dxnode.config import Settings
from dxnode.model import overlay
from dxnode.outputs.report import WrittenOutput, write_outputs
from dxnode.pipeline import Frame, PipelineError, Preprocessing, read_frames, to_tensor
from dxnode.receive.parse import StoreRefused, read_file_meta, read_part10
from dxnode.results import Finding, Heatmap, InstanceOutcome, ModelIdentity, StudyResult
from dxnode.states import Task


@dataclass
class Outcome:
    """How far a file got: refused at receive, failed in the pipeline, or written as SR + SC."""

    refused: str = ""
    failed: str = ""
    frames: int = 0
    written: list[WrittenOutput] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def encode(ds: Dataset, encoding: str, declared: str, meta: FileMetaDataset | None = None) -> bytes:
    """A Part 10 file: ds encoded as the transfer syntax encoding says, its file meta declaring declared.

    The two may differ on purpose (a file that lies about its encoding). A declared Deflated syntax
    deflates the encoded dataset."""
    body = DicomBytesIO()
    body.is_little_endian = UID(encoding) != ExplicitVRBigEndian
    body.is_implicit_VR = UID(encoding) == ImplicitVRLittleEndian
    write_dataset(body, ds)
    data = body.getvalue()
    if UID(declared) == DeflatedExplicitVRLittleEndian:
        comp = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = comp.compress(data) + comp.flush()
    fm = FileMetaDataset()
    source = meta or getattr(ds, "file_meta", FileMetaDataset())
    fm.MediaStorageSOPClassUID = source.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID", "1.2.3")
    fm.MediaStorageSOPInstanceUID = source.get("MediaStorageSOPInstanceUID") or ds.get("SOPInstanceUID", "1.2.3")
    fm.TransferSyntaxUID = declared
    fm.ImplementationClassUID = "1.2.826.0.1.3680043.10.1045.1"
    buf = BytesIO()
    write_file_meta_info(buf, fm, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buf.getvalue() + data


def receive(data: bytes, settings: Settings) -> None:
    """What every transport checks before it stores a file (dxnode/receive/parse.py, as STOW-RS and WADO-RS
    run it: file meta, size and inflated size, the header before Pixel Data, UIDs): StoreRefused, or nothing."""
    part = BytesIO(data)
    read_part10(part, read_file_meta(part), settings.node.max_instance_mb, Path(tempfile.gettempdir()))


def blob(h: int, w: int) -> np.ndarray:
    """A CAM-like map in [0, 1]: one Gaussian blob off centre."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.exp(-(((y - h / 3) / max(h / 5, 1)) ** 2) - ((x - w / 2) / max(w / 5, 1)) ** 2).astype(np.float32)


def hand_made_result(uid: str, study_uid: str, frame: Frame, prep: Preprocessing) -> StudyResult:
    """A one-instance result with a positive finding and its heatmap on the given pipeline Frame."""
    over, cam = overlay(frame, blob(7, 7), prep)
    model = ModelIdentity("fuzz-net", "1.0", "0" * 64, True, Task.MULTILABEL)
    finding = Finding("Effusion", 0.73, 0.5, True, uid, frame.frame_index)
    heatmap = Heatmap("Effusion", uid, frame.frame_index, over, cam)
    findings = [finding, Finding("Nodule", 0.12, 0.5, False, uid, frame.frame_index)]
    return StudyResult(study_uid, model, findings, [InstanceOutcome(uid, "done")], [heatmap])


def through_the_node(data: bytes, folder: Path, settings: Settings, outputs: bool = True) -> Outcome:
    """Receive, decode and report one file as the node does; the outcome, or the exception that escaped."""
    try:
        receive(data, settings)
    except StoreRefused as exc:
        return Outcome(refused=f"{exc.status:#06x} {exc.comment}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "received.dcm"
    path.write_bytes(data)
    prep = Preprocessing()
    try:
        frames = read_frames(path, settings.pipeline, prep, display_max_side=settings.report.sc_max_side)
    except PipelineError as exc:
        assert "\n" not in str(exc) and str(exc), repr(exc)
        return Outcome(failed=str(exc))
    assert frames, "read_frames gave no frame and no reason"
    for f in frames:
        x = to_tensor(f, prep)
        assert x.shape == (3, prep.input_size, prep.input_size) and np.isfinite(x).all()
    outcome = Outcome(frames=len(frames))
    if outputs:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uid, study = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
        result = hand_made_result(uid, study, frames[0], prep)
        outcome.written = write_outputs(result, {uid: path}, settings, folder / "out")
        outcome.notes = sorted({n for w in outcome.written for n in w.notes})
    return outcome
