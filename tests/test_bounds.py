"""Bounded decoding and receiving: declared sizes, codestream headers, Deflate bombs, non-finite LUTs, bad UIDs."""

from __future__ import annotations

import io
import os
import resource
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hostile import deflate_bomb, frames_of, patch_j2k_siz, raw, with_frame
from nodeproc import InProcessNode
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from test_scp import send_one, small_ct

from dxnode.bounds import inflated_size_exceeds, j2k_size, jpeg_size
from dxnode.config import PipelineSettings
from dxnode.pipeline import PipelineError, Preprocessing, read_frames

PREP = Preprocessing(input_size=64)


def frames(ds: pydicom.Dataset, **settings: object) -> list:
    return read_frames(ds, PipelineSettings(**settings), PREP)  # type: ignore[arg-type]


def test_declared_size_is_refused_before_any_decoder_runs() -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    ds.Rows = ds.Columns = 65535
    started = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(PipelineError, match=r"65535 x 65535 .* over \[pipeline\] max_decoded_mb = 256"):
        frames(ds)
    assert time.perf_counter() - started < 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 50_000  # kB: nothing was allocated


def test_the_limit_counts_the_frames_decoded_and_is_configurable() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # 128 x 128 x 16 bits = 32 KB a frame
    assert frames(ds, max_decoded_mb=0.04)
    with pytest.raises(PipelineError, match=r"max_decoded_mb = 0\.03"):
        frames(ds, max_decoded_mb=0.03)


@pytest.mark.parametrize(("value", "reason"), [(b"-5", "Number of Frames -5"), (b"0", "Number of Frames 0")])
def test_bad_number_of_frames_fails_with_a_reason(value: bytes, reason: str) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    raw(ds, "NumberOfFrames", "IS", value)
    with pytest.raises(PipelineError, match=reason):
        frames(ds)


def test_j2k_codestream_disagreeing_with_the_dataset_is_refused() -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    assert j2k_size(frames_of(ds)[0])[:3] == (64, 64, 1)  # type: ignore[index]
    with_frame(ds, patch_j2k_siz(frames_of(ds)[0], 60000, 60000))
    with pytest.raises(PipelineError, match="codestream is 60000 x 60000, the dataset says 64 x 64"):
        frames(ds)


def test_jpeg_headers_are_read_for_every_jpeg_family() -> None:
    for name, size in {
        "SC_rgb_jpeg_dcmtk.dcm": (100, 100, 3),
        "JPGExtended.dcm": (256, 1024, 1),
        "MR_small_jpeg_ls_lossless.dcm": (64, 64, 1),
    }.items():
        assert jpeg_size(frames_of(pydicom.dcmread(get_testdata_file(name)))[0]) == size, name


def test_deflate_bomb_is_measured_in_bounded_memory() -> None:
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = b"".join(comp.compress(b"\0" * (1 << 20)) for _ in range(200)) + comp.flush()
    assert len(bomb) < 300_000
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert inflated_size_exceeds(io.BytesIO(bomb), 100 << 20)
    assert not inflated_size_exceeds(io.BytesIO(bomb), 201 << 20)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 20_000  # kB


def test_deflated_file_over_the_limit_is_refused_before_pydicom_inflates_it(tmp_path: Path) -> None:
    path, _ = deflate_bomb(tmp_path, generate_uid(), 40)
    with pytest.raises(PipelineError, match="inflates to more than 32 MB"):
        read_frames(path, PipelineSettings(max_decoded_mb=32), PREP)
    assert read_frames(path, PipelineSettings(max_decoded_mb=64), PREP)  # under the limit it is an image


@pytest.mark.parametrize(("center", "width"), [(b"NaN", b"400"), (b"40", b"inf"), (b"1e308", b"1e308"), (b"40", b"0")])
def test_unusable_window_falls_back_to_the_pixel_range_with_a_note(center: bytes, width: bytes) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    raw(ds, "WindowCenter", "DS", center)
    raw(ds, "WindowWidth", "DS", width)
    (frame,) = frames(ds)
    assert np.isfinite(frame.image).all() and frame.image.max() > frame.image.min()
    assert frame.window is not None and all(np.isfinite(frame.window))
    assert frame.notes and "Window Center/Width not usable" in frame.notes[0]


@pytest.mark.parametrize("keyword", ["RescaleSlope", "RescaleIntercept"])
@pytest.mark.parametrize("value", [b"NaN", b"inf", b"1e308"])
def test_non_finite_rescale_fails_the_instance_with_its_reason(keyword: str, value: bytes) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    raw(ds, keyword, "DS", value)
    with pytest.raises(PipelineError, match=f"{keyword} .* is not a usable number"):
        frames(ds)


# --- receive ---------------------------------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path) -> Iterator[InProcessNode]:
    n = InProcessNode(tmp_path, max_instance_mb=16)
    yield n
    n.stop()


def test_study_uid_with_vr_ul_is_refused(node: InProcessNode) -> None:
    ds = small_ct(generate_uid(), generate_uid())
    ds["StudyInstanceUID"] = pydicom.DataElement(0x0020000D, "UL", 7)
    assert send_one(node.port, ds) == 0xC000
    assert node.instances() == {}


def test_deflate_bomb_over_max_instance_mb_is_refused_without_inflating_it(node: InProcessNode, tmp_path: Path) -> None:
    path, uid = deflate_bomb(tmp_path, generate_uid(), 64)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(ds.SOPClassUID, DeflatedExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DXNODE")
    assert assoc.is_established
    status = assoc.send_c_store(path)
    assoc.release()
    assert status.Status == 0xA700 and "max_instance_mb" in status.ErrorComment
    assert uid not in node.instances()
    (tmp_path / "small").mkdir()
    small, small_uid = deflate_bomb(tmp_path / "small", generate_uid(), 4)  # under the limit: stored
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DXNODE")
    assert assoc.send_c_store(small).Status == 0x0000
    assoc.release()
    assert small_uid in node.instances()


def test_stale_temporary_files_are_removed_at_start(tmp_path: Path) -> None:
    folder = tmp_path / "var" / "incoming" / "1.2.3" / "1.2.3.4"
    folder.mkdir(parents=True)
    stale, live = folder / ".1.2.3.4.5.dcm.0a1b.tmp", folder / ".1.2.3.4.6.dcm.0a1c.tmp"
    stale.write_bytes(b"half a file")
    live.write_bytes(b"being written")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    node = InProcessNode(tmp_path)
    try:
        assert not stale.exists() and live.exists()
    finally:
        node.stop()


def test_rle_header_cannot_make_the_decoder_allocate(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    with_frame(ds, struct.pack("<16I", 1, 64, *([0] * 14)) + b"\x00" * 64)
    ds.Rows = ds.Columns = 65535
    with pytest.raises(PipelineError, match="max_decoded_mb"):
        frames(ds)
