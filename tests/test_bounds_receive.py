"""One size rule for C-STORE and STOW-RS: the same Deflate bombs, the same refusals, bounded memory.

A Deflated dataset is inflated in 64 KB steps into a spool file and only the attributes before Pixel
Data are decoded, whichever transport carried it; [node] max_inflight_mb bounds what the node handles
at once. The memory test runs a real `dxnode serve` in a child of the cgroup v1 memory controller
and reads the receiver's peak RSS (VmHWM) after three concurrent senders per transport.
"""

from __future__ import annotations

import re
import struct
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest
from conftest import memory_cgroup
from fastapi.testclient import TestClient
from nodeproc import InProcessNode, Node, node_config
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import create_engine, text

from dxnode.config import WebToken
from dxnode.outbox.dicomweb import FAILED_SOP_SEQUENCE, FAILURE_REASON, multipart_body
from dxnode.receive.parse import StoreRefused, read_file_meta, read_part10
from dxnode.web.app import create_app

STORER = "store-token-0123456789"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


class Bombs:
    """Deflated CT files whose private OB element (0009,1010) of zeros inflates to inflated_mb MB.

    The zeros are compressed once; each file is its own header and tail around that block (every
    block ends with a full flush, so none refers back into another and they join into one stream)."""

    def __init__(self, inflated_mb: int) -> None:
        self.inflated_mb = inflated_mb
        comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        zeros = b"\0" * (1 << 20)
        self.zeros = b"".join(comp.compress(zeros) for _ in range(inflated_mb)) + comp.flush(zlib.Z_FULL_FLUSH)

    def file(self, study: str) -> tuple[bytes, str]:
        """(the Part 10 file, its SOP Instance UID)."""
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        uid = generate_uid()
        ds.StudyInstanceUID, ds.SOPInstanceUID = study, uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        low, high = Dataset(), Dataset()
        for elem in ds:
            (low if elem.tag.group < 0x0009 else high).add(elem)
        encoded = []
        for part in (low, high):
            body = DicomBytesIO()
            body.is_little_endian, body.is_implicit_VR = True, False
            pydicom.filewriter.write_dataset(body, part)
            encoded.append(body.getvalue())
        private = struct.pack("<HH", 0x0009, 0x0010) + b"LO" + struct.pack("<H", 6) + b"BOMB  "
        private += struct.pack("<HH", 0x0009, 0x1010) + b"OB\0\0" + struct.pack("<I", self.inflated_mb << 20)
        head = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        tail = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        stream = head.compress(encoded[0] + private) + head.flush(zlib.Z_FULL_FLUSH) + self.zeros
        stream += tail.compress(encoded[1]) + tail.flush()
        meta = BytesIO()
        pydicom.filewriter.write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
        return b"\0" * 128 + b"DICM" + meta.getvalue() + stream, uid


def c_store(port: int, data: bytes) -> tuple[int, str]:
    """Send one Deflated Part 10 file over a new association: (status, error comment)."""
    ae = AE(ae_title="BOMBER")
    ae.add_requested_context(CT_STORAGE, DeflatedExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DXNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(pydicom.dcmread(BytesIO(data)))
    finally:
        assoc.release()
    return int(status.Status), str(status.get("ErrorComment", ""))


def stow_reasons(response: httpx.Response) -> list[int]:
    """The Failure Reasons of a STOW-RS response (empty when everything was stored)."""
    items = (response.json().get(FAILED_SOP_SEQUENCE) or {}).get("Value") or []
    return [item[FAILURE_REASON]["Value"][0] for item in items]


def stow(client: httpx.Client | TestClient, url: str, parts: list[bytes]) -> httpx.Response:
    body, ctype = multipart_body(parts)
    headers = {"Content-Type": ctype, "Authorization": f"Bearer {STORER}"}
    return client.post(url + "/dicomweb/studies", content=body, headers=headers)


# --- in process: the same refusals from both transports ---------------------------------------


@pytest.fixture
def both(tmp_path: Path) -> Iterator[tuple[InProcessNode, TestClient]]:
    """The listener and the web app over one Ingest, as in `dxnode serve` (max_instance_mb 16)."""
    node = InProcessNode(tmp_path, max_instance_mb=16, max_inflight_mb=16)
    tokens = [WebToken(name="pacs", token=STORER, role="store")]
    settings = node.settings.model_copy(update={"web": node.settings.web.model_copy(update={"tokens": tokens})})
    yield node, TestClient(create_app(settings, node.store, ingest=node.ingest))
    node.stop()


def test_a_bomb_over_max_instance_mb_is_refused_alike_by_c_store_and_stow_rs(
    both: tuple[InProcessNode, TestClient],
) -> None:
    node, client = both
    bombs = Bombs(40)  # 40 MB inflated, over max_instance_mb = 16
    data, uid = bombs.file(generate_uid())
    status, comment = c_store(node.port, data)
    assert (status, comment) == (0xA700, "inflates over [node] max_instance_mb 16")
    data, uid2 = bombs.file(generate_uid())
    r = stow(client, "", [data])
    assert r.status_code == 409 and stow_reasons(r) == [0xA700], r.text
    assert uid not in node.instances() and uid2 not in node.instances()
    # Under the limit, both store it (the header is read from the spool file, the zeros skipped).
    small = Bombs(8)
    data, uid = small.file(generate_uid())
    assert c_store(node.port, data) == (0x0000, "")
    data, uid2 = small.file(generate_uid())
    r = stow(client, "", [data])
    assert r.status_code == 200 and stow_reasons(r) == [], r.text
    assert {uid, uid2} <= set(node.instances())
    assert not [p for p in (node.settings.data_dir / "incoming").iterdir() if p.is_file()], "a spool file was left"


def test_past_max_inflight_mb_both_transports_refuse_with_a700(both: tuple[InProcessNode, TestClient]) -> None:
    node, client = both
    data, uid = Bombs(1).file(generate_uid())
    with node.ingest.inflight.hold(node.ingest.inflight.limit - 1000):  # the node is busy with other instances
        assert c_store(node.port, data) == (0xA700, "node busy: over [node] max_inflight_mb 16")
        r = stow(client, "", [data])
        assert r.status_code == 409 and stow_reasons(r) == [0xA700], r.text
    assert node.ingest.inflight.used == 0  # every refusal gave back what it held
    assert c_store(node.port, data) == (0x0000, "")
    assert uid in node.instances()


@pytest.mark.parametrize(
    ("broken", "reason"), [("cut", "Deflate stream cut short"), ("garbage", "corrupt Deflate stream")]
)
def test_a_broken_deflate_stream_cannot_be_understood(tmp_path: Path, broken: str, reason: str) -> None:
    data, _ = Bombs(1).file(generate_uid())
    f = BytesIO(data)
    read_file_meta(f)
    start = f.tell()  # where the Deflate stream begins
    # Cut short: the end of the stream missing. Garbage: 0xFF starts a block of the reserved type.
    f = BytesIO(data[:-200] if broken == "cut" else data[:start] + b"\xff" * 4000)
    meta = read_file_meta(f)
    with pytest.raises(StoreRefused, match=reason) as refused:
        read_part10(f, meta, 16, tmp_path)
    assert refused.value.status == 0xC000


# --- a real `dxnode serve` under a memory cgroup ----------------------------------------------

BOMB_MB = 100  # each inflates to 100 MB, under max_instance_mb = 128: accepted, and must not cost that in memory
SENDERS = 3
CGROUP_LIMIT_MB = 3072  # the whole node (receiver and any job process) in a cgroup v1 memory child
GROWTH_LIMIT_MB = 120  # the receiver's peak RSS over its resting RSS; inflating whole cost 2x the inflated size each


def _status_kb(pid: int, field: str) -> int:
    found = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert found, field
    return int(found.group(1))


@pytest.mark.slow
def test_three_senders_per_transport_keep_the_receiver_memory_bounded(tmp_path: Path) -> None:
    """3 concurrent C-STORE associations, then 3 concurrent STOW-RS requests, of 100 MB Deflate bombs."""
    with memory_cgroup(CGROUP_LIMIT_MB) as cgroup:
        cfg = node_config(
            tmp_path,
            node={"max_instance_mb": 128},
            pipeline={"modalities": ["DX"]},  # the CT bombs get no job: this measures the receive path
            web={
                "enabled": True,
                "host": "127.0.0.1",
                "port": 0,
                "tokens": [{"name": "pacs", "token": STORER, "role": "store"}],
            },
        )
        node = Node(cfg)
        try:
            (cgroup / "cgroup.procs").write_text(str(node.proc.pid))
            web = node.wait_for(r"dxnode web: (http://\S+)").group(1).rstrip("/")
            assert str(cgroup.name) in Path(f"/proc/{node.proc.pid}/cgroup").read_text()
            t0 = time.monotonic()
            bombs = Bombs(BOMB_MB)
            study = generate_uid()
            files = [bombs.file(study) for _ in range(2 * SENDERS)]
            Path(f"/proc/{node.proc.pid}/clear_refs").write_text("5")  # VmHWM := the resting RSS
            resting = _status_kb(node.proc.pid, "VmRSS")
            with ThreadPoolExecutor(SENDERS) as pool:
                statuses = list(pool.map(lambda f: c_store(node.port, f[0]), files[:SENDERS]))
            assert statuses == [(0, "")] * SENDERS
            print(f"bombs made and sent by C-STORE in {time.monotonic() - t0:.1f} s")
            with httpx.Client(timeout=120) as client, ThreadPoolExecutor(SENDERS) as pool:
                answers = list(pool.map(lambda f: stow(client, web, [f[0]]), files[SENDERS:]))
            assert [a.status_code for a in answers] == [200] * SENDERS, [a.text[:300] for a in answers]
            assert node.proc.poll() is None, "\n".join(node.lines[-40:])
            growth_mb = (_status_kb(node.proc.pid, "VmHWM") - resting) / 1024
            print(f"receiver: resting {resting / 1024:.0f} MB, peak +{growth_mb:.1f} MB (cgroup {CGROUP_LIMIT_MB} MB)")
            engine = create_engine(f"sqlite:///{tmp_path / 'var' / 'dxnode.db'}")
            with engine.connect() as conn:
                stored = set(conn.execute(text("SELECT sop_instance_uid FROM instance")).scalars())
            engine.dispose()
            assert stored == {uid for _, uid in files}
            assert growth_mb < GROWTH_LIMIT_MB, (
                f"receiver peak RSS grew {growth_mb:.0f} MB for {2 * SENDERS} bombs of {BOMB_MB} MB"
                f" (cgroup limit {CGROUP_LIMIT_MB} MB)"
            )
        finally:
            node.stop()
