"""Property-based fuzzing of the input path: valid seed files mutated, then received, decoded and reported.

Mutations: attribute values (text with control characters, ISO 2022 escapes, dates and times not in
the calendar), VRs, lengths, character sets, deleted attributes, pixel attributes (Rows, Columns,
BitsAllocated, SamplesPerPixel, PhotometricInterpretation, NumberOfFrames, ...), LUT values, pixel data
length, and a file meta transfer syntax that disagrees with the encoding. Each file goes through
tests/input_chain.py: receive (size bound, parse_dataset), the pixel pipeline (read_frames, to_tensor)
and the SR and SC outputs.

Properties: a clear refusal (StoreRefused, PipelineError) or a result, never another exception; every
SR and SC written passes dciodvfy (checked on every 5th example that wrote some); the process's peak
memory stays within a bound (ru_maxrss here; test_the_fuzz_and_the_corpus_stay_within_a_real_memory_limit runs
both tests again in a child process under a cgroup v1 memory limit, which the kernel enforces). CI runs a fixed
seed (derandomize) and DXNODE_FUZZ_EXAMPLES examples (60 by default). Every failure found becomes a case of the hostile corpus (tests/hostile.py), which
test_every_hostile_case_is_refused_failed_or_reported runs through the same chain.
"""

from __future__ import annotations

import itertools
import os
import resource
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import memory_cgroup, need_tool
from dicom_checks import dciodvfy_errors
from hostile import Case, build_corpus
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st
from input_chain import Outcome, encode, through_the_node
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from dxnode.config import Settings

EXAMPLES = int(os.environ.get("DXNODE_FUZZ_EXAMPLES", "60"))
DCIODVFY_EVERY = 5
MAX_MB = 64  # [node] max_instance_mb and [pipeline] max_decoded_mb of the fuzzed node
MEMORY_BOUND_MB = 6 * MAX_MB + 256  # peak growth of this process over the whole run
CGROUP_LIMIT_MB = 1024  # the fuzz and the hostile corpus in a child process, under a cgroup v1 memory limit

SEEDS = {
    "ct": "CT_small.dcm",
    "mr": "MR_small.dcm",
    "rle": "MR_small_RLE.dcm",
    "j2k": "MR_small_jp2klossless.dcm",
    "rgb_rle": "SC_rgb_rle.dcm",
    "jpeg": "SC_rgb_jpeg_dcmtk.dcm",
}
try:  # a real CR from pydicom-data, on disk when installed (never downloaded)
    import data_store

    _CR = Path(data_store.__file__).parent / "data" / "RG3_J2KI.dcm"
    if _CR.exists():
        SEEDS["cr_j2k"] = str(_CR)
except ImportError:
    pass

TEXT = ["PatientName", "PatientID", "StudyDescription", "ReferringPhysicianName", "AccessionNumber", "StudyID"]
TEXT += ["InstitutionName", "SeriesDescription", "OperatorsName", "BodyPartExamined", "Laterality", "Manufacturer"]
DATES = ["StudyDate", "PatientBirthDate", "SeriesDate", "ContentDate", "AcquisitionDate"]
TIMES = ["StudyTime", "SeriesTime", "ContentTime"]
DELETABLE = [
    "Modality",
    "PatientName",
    "PatientID",
    "StudyDate",
    "StudyTime",
    "PatientSex",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPClassUID",
    "SpecificCharacterSet",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "SamplesPerPixel",
    "PixelRepresentation",
    "PixelData",
    "WindowCenter",
    "RescaleSlope",
    "ImageOrientationPatient",
    "PixelSpacing",
]
PIXEL_INTS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "SamplesPerPixel"]
PIXEL_INTS += ["PixelRepresentation", "PlanarConfiguration"]
RETYPED = ["Rows", "Columns", "PatientName", "StudyDate", "Modality", "WindowCenter", "NumberOfFrames"]
RETYPED += ["StudyInstanceUID", "PatientSex", "BitsAllocated", "SpecificCharacterSet"]
GEOMETRY = ["ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "SliceThickness", "PatientOrientation"]
GEOMETRY += ["Laterality", "ImageLaterality", "PatientSex"]
VRS = ["UN", "OB", "LO", "SH", "US", "SS", "UL", "FL", "DS", "IS", "CS", "PN", "UI", "DA", "LT"]
CHARSETS: list[str | list[str]] = ["ISO_IR 100", "ISO_IR 192", "GB18030", "ISO 2022 IR 149", ["", "ISO 2022 IR 149"]]
CHARSETS += [["", "ISO 2022 IR 87"], "ISO_IR 999", "ISO_IR 13", "ISO_IR 144", "ISO_IR 6", ""]
NAMES = [
    b"\x1b$)C\x0e\xb1\xe8\x0f^\x0e\xc8\xf1\x0f",  # ISO 2022 IR 149 with SO/SI
    b"\x0e\xb1\xe8^\xc8\xf1\x0f",  # SO/SI without a designation
    b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B",  # ISO 2022 IR 87
    "Müller^Jürgen".encode("latin-1"),
    "王^小明".encode("gb18030"),
    b"Bad\xff\xfe^Bytes",
    b"A" * 68 + b"^B",
    b"X" * 30 + b"=" + b"Y" * 68 + b"=" + b"Z" * 70 + b"=extra=groups",
    b"a^b^c^d^e^f^g",
]
SYNTAXES = [None, ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
SYNTAXES += [RLELossless, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless]

characters = st.sampled_from([*"AZaz09 ^=\\-.'é王Δ", "\x00", "\x0e", "\x0f", "\x1b", "\t", "\n", "\x7f", "\x85"])
dates = st.one_of(
    st.integers(0, 99999999).map(lambda n: f"{n:08d}"),
    st.sampled_from(["20251399", "20241331", "20240230", "00000000", "2024", "2024-01-01", "notadate", ""]),
)
times = st.one_of(
    st.integers(0, 999999).map(lambda n: f"{n:06d}"),
    st.sampled_from(["250000", "996060", "235960", "1", "12", "1234567", "12:30", "120000.1234567"]),
)
mutation = st.one_of(
    st.tuples(st.just("text"), st.sampled_from(TEXT), st.text(characters, max_size=80)),
    st.tuples(st.just("long"), st.sampled_from(TEXT), st.integers(60, 3000)),
    st.tuples(st.just("date"), st.sampled_from(DATES), dates),
    st.tuples(st.just("time"), st.sampled_from(TIMES), times),
    st.tuples(
        st.just("datetime"), st.just("AcquisitionDateTime"), st.sampled_from(["20241331120000", "2024010125", "x"])
    ),
    st.tuples(st.just("charset"), st.sampled_from(CHARSETS), st.one_of(st.sampled_from(NAMES), st.binary(max_size=80))),
    st.tuples(st.just("delete"), st.sampled_from(DELETABLE), st.none()),
    st.tuples(st.just("retype"), st.sampled_from(RETYPED), st.tuples(st.sampled_from(VRS), st.binary(max_size=12))),
    st.tuples(
        st.just("pixel"),
        st.sampled_from(PIXEL_INTS),
        st.sampled_from([0, 1, 2, 3, 4, 7, 8, 12, 15, 16, 32, 64, 255, 256, 512, 4096, 65535]),
    ),
    st.tuples(
        st.just("photometric"),
        st.just("PhotometricInterpretation"),
        st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR", "FOO", ""]),
    ),
    st.tuples(
        st.just("frames"), st.just("NumberOfFrames"), st.sampled_from(["0", "1", "2", "3", "-1", "100000", "ab"])
    ),
    st.tuples(
        st.just("lut"),
        st.sampled_from(["WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"]),
        st.sampled_from(["NaN", "inf", "-inf", "1e308", "0", "-400", "abc", "", "1\\2"]),
    ),
    st.tuples(st.just("pixeldata"), st.just("PixelData"), st.floats(0.0, 1.5)),
    st.tuples(
        st.just("geometry"),
        st.sampled_from(GEOMETRY),
        st.sampled_from(["abc", "NaN\\1\\0\\0\\1\\0", "1\\0\\0\\0\\1\\0", "0\\0", "-1\\2", "X\\Y", "A\\F", ""]),
    ),
)


def _raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Set an element to bytes written as they are (values pydicom would refuse to make)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    ds[tag] = DataElement(tag, vr, value)


def _pad(text: str) -> bytes:
    data = text.encode("utf-8")
    return data + b" " * (len(data) % 2)


def _pixel_data(ds: Dataset, fraction: float) -> None:
    """Pixel Data cut (or extended with zeros) to a fraction of its length."""
    if "PixelData" not in ds:
        return
    data = bytes(ds.PixelData)
    n = int(len(data) * fraction) // 2 * 2
    _raw(ds, "PixelData", ds["PixelData"].VR, data[:n] + b"\x00" * max(0, n - len(data)))


APPLY: dict[str, Callable[[Dataset, str, Any], None]] = {
    "text": lambda ds, k, v: _raw(ds, k, dictionary_VR(k), _pad(v)),
    "long": lambda ds, k, n: _raw(ds, k, dictionary_VR(k), b"L" * (n + n % 2)),
    "date": lambda ds, k, v: _raw(ds, k, "DA", _pad(v)),
    "time": lambda ds, k, v: _raw(ds, k, "TM", _pad(v)),
    "datetime": lambda ds, k, v: _raw(ds, k, "DT", _pad(v)),
    "charset": lambda ds, cs, name: (
        setattr(ds, "SpecificCharacterSet", cs),
        _raw(ds, "PatientName", "PN", name + b" " * (len(name) % 2)),
    ),
    "delete": lambda ds, k, _: ds.pop(tag_for_keyword(k), None),
    "retype": lambda ds, k, vr_value: _raw(ds, k, vr_value[0], vr_value[1] + b"\x00" * (len(vr_value[1]) % 2)),
    "pixel": lambda ds, k, v: setattr(ds, k, v),
    "photometric": lambda ds, k, v: _raw(ds, k, "CS", _pad(v)),
    "frames": lambda ds, k, v: _raw(ds, k, "IS", _pad(v)),
    "lut": lambda ds, k, v: _raw(ds, k, "DS", _pad(v)),
    "pixeldata": lambda ds, k, fraction: _pixel_data(ds, fraction),
    "geometry": lambda ds, k, v: _raw(ds, k, dictionary_VR(k), _pad(v)),
}

_seed_bytes: dict[str, bytes] = {}


def seed(name: str) -> Dataset:
    """A fresh copy of a seed dataset."""
    if name not in _seed_bytes:
        path = SEEDS[name]
        _seed_bytes[name] = Path(path if os.path.isabs(path) else str(get_testdata_file(path))).read_bytes()
    return pydicom.dcmread(BytesIO(_seed_bytes[name]))


def node_settings(data_dir: Path) -> Settings:
    return Settings(
        node={"data_dir": data_dir, "max_instance_mb": MAX_MB},
        pipeline={"max_decoded_mb": MAX_MB},
        report={"sc_max_side": 512},
    )


def mutated_file(name: str, mutations: list[tuple[str, str, Any]], declared: str | None) -> bytes:
    """The seed with the mutations applied, encoded as the seed was and declared as declared says."""
    ds = seed(name)
    meta = ds.file_meta
    encoding = str(meta.TransferSyntaxUID)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for kind, keyword, value in mutations:
                APPLY[kind](ds, keyword, value)
            return encode(ds, encoding, declared or encoding, meta)
        except Exception:  # a mutation pydicom cannot even write: not an input a peer could send
            reject()


def check_outputs(outcome: Outcome) -> None:
    """Every SR and SC written passes dciodvfy with no error."""
    for w in outcome.written:
        assert dciodvfy_errors(w.path) == [], (w.kind, dciodvfy_errors(w.path), outcome.notes)


_written = itertools.count()
_peak_kb: list[int] = []


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
@given(
    name=st.sampled_from(sorted(SEEDS)),
    mutations=st.lists(mutation, min_size=1, max_size=4),
    declared=st.sampled_from(SYNTAXES),
)
def test_mutated_inputs_are_refused_or_reported_and_outputs_stay_valid(
    name: str, mutations: list[tuple[str, str, Any]], declared: str | None
) -> None:
    need_tool("dciodvfy")
    if not _peak_kb:
        _peak_kb.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    data = mutated_file(name, mutations, declared)
    with tempfile.TemporaryDirectory() as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = through_the_node(data, Path(tmp), node_settings(Path(tmp)))
        assert outcome.refused or outcome.failed or len(outcome.written) == 2, outcome
        event("refused at receive" if outcome.refused else "failed in the pipeline" if outcome.failed else "reported")
        if outcome.written and next(_written) % DCIODVFY_EVERY == 0:
            check_outputs(outcome)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - _peak_kb[0]) / 1024
    assert grown_mb < MEMORY_BOUND_MB, f"peak memory grew {grown_mb:.0f} MB (bound {MEMORY_BOUND_MB} MB)"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_corpus(tmp_path_factory.mktemp("hostile"), deflate_bomb_mb=MAX_MB + 16)


def test_every_hostile_case_is_refused_failed_or_reported(corpus: list[Case], tmp_path: Path) -> None:
    """The hostile corpus in-process, through the same chain: benign cases get an SR and SC that pass dciodvfy."""
    need_tool("dciodvfy")
    outcomes = {}
    for case in corpus:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = through_the_node(case.path.read_bytes(), tmp_path / case.name, node_settings(tmp_path))
        outcomes[case.name] = outcome
        if case.benign:
            assert len(outcome.written) == 2, (case.name, outcome)
            check_outputs(outcome)
        else:
            assert outcome.refused or outcome.failed or outcome.written, (case.name, outcome)
    assert outcomes["deflate_bomb"].refused.startswith("0xa700"), outcomes["deflate_bomb"]
    # pylibjpeg-rle panics (a BaseException) on segments longer than Rows x Columns: a refusal like any other
    assert outcomes["rle_rows_fewer_than_segments"].failed.startswith("cannot decode pixel data (RLE Lossless): ")


@pytest.mark.slow
def test_the_fuzz_and_the_corpus_stay_within_a_real_memory_limit(tmp_path: Path) -> None:
    """Both tests above in a child process placed in a cgroup v1 memory child limited to CGROUP_LIMIT_MB
    (memory+swap too, where swap is accounted): past the limit the kernel kills the child and this fails."""
    need_tool("dciodvfy")
    with memory_cgroup(CGROUP_LIMIT_MB) as cgroup:
        # The shell puts itself in the cgroup, then becomes the child: every page it touches is charged there.
        child = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly"]
        child += ["-k", "mutated_inputs or every_hostile_case", f"--basetemp={tmp_path / 'child'}"]
        out = subprocess.run(
            ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *child],
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "DXNODE_FUZZ_EXAMPLES": str(EXAMPLES)},
            cwd=Path(__file__).parent.parent,
        )
        peak_mb = int((cgroup / "memory.max_usage_in_bytes").read_text()) >> 20
    print(f"memory cgroup limit in force: {CGROUP_LIMIT_MB} MB ({cgroup.name}); the child's peak {peak_mb} MB")
    killed = " (killed: the kernel's OOM killer at the limit)" if out.returncode == -9 else ""
    assert out.returncode == 0, f"child exit {out.returncode}{killed}, limit {CGROUP_LIMIT_MB} MB\n{out.stdout[-3000:]}"
    assert "2 passed" in out.stdout, out.stdout[-3000:]
    assert peak_mb > 100, f"only {peak_mb} MB charged to the cgroup: the child did not run in it"
