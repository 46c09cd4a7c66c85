"""STOW-RS into the node's web server: dicomweb-client, raw requests for every refusal, and Orthanc's DICOMweb client."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from conftest import free_port
from nodeproc import make_study, wait_until
from pydicom.data import get_testdata_file
from sqlalchemy import select
from test_dicomweb_out import orthanc_with_dicomweb, rest
from webnode import ADMIN, READER, make_store, node_settings

from dxnode.outbox.dicomweb import FAILED_SOP_SEQUENCE, FAILURE_REASON, REFERENCED_SOP_INSTANCE, multipart_body
from dxnode.store import Audit, Instance, Job, Study, utcnow
from dxnode.web.app import create_app
from dxnode.web.server import WebServer
from dxnode.web.services import services_of
from dxnode.worklist import queue

STORER = "store-token-0123456789"


class WebNode:
    def __init__(self, tmp: Path, **web: Any) -> None:
        settings = node_settings(tmp, **web)
        settings.web.tokens.append(type(settings.web.tokens[0])(name="pacs", token=STORER, role="store"))
        self.settings, self.store = settings, make_store(settings)
        self.app = create_app(settings, self.store)
        self.server = WebServer(self.app, "127.0.0.1", 0)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.port}"

    def post(self, body: bytes, ctype: str, path: str = "/dicomweb/studies", token: str = STORER) -> httpx.Response:
        return httpx.post(
            self.url + path,
            content=body,
            headers={"Content-Type": ctype, "Authorization": f"Bearer {token}", "Accept": "application/dicom+json"},
            timeout=60,
        )

    def instances(self) -> dict[str, str]:
        with self.store.session() as s:
            return dict(s.execute(select(Instance.sop_instance_uid, Instance.file_path)).all())


@pytest.fixture
def node(tmp_path: Path) -> Iterator[WebNode]:
    n = WebNode(tmp_path, stow_max_body_mb=2, stow_max_part_mb=1)
    yield n
    n.server.stop()
    n.store.dispose()


def files(folder: Path, n: int = 2, **kw: Any) -> tuple[str, list[Path]]:
    return make_study(folder, n=n, **kw)


def failures(response: httpx.Response) -> list[tuple[str | None, int]]:
    items = (response.json().get(FAILED_SOP_SEQUENCE) or {}).get("Value") or []
    return [
        (((i.get(REFERENCED_SOP_INSTANCE) or {}).get("Value") or [None])[0], i[FAILURE_REASON]["Value"][0])
        for i in items
    ]


def test_dicomweb_client_stores_a_study_durably_and_it_joins_the_worklist(node: WebNode, tmp_path: Path) -> None:
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session

    study_uid, paths = files(tmp_path / "study", n=3)
    session = create_session()
    session.headers["Authorization"] = f"Bearer {STORER}"
    client = DICOMwebClient(url=node.url + "/dicomweb", session=session)
    datasets = [pydicom.dcmread(p) for p in paths]
    answer = client.store_instances(datasets)  # raises unless 200
    stored = {str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence}
    assert stored == {str(d.SOPInstanceUID) for d in datasets}
    rows = node.instances()
    assert set(rows) == stored
    for d in datasets:
        on_disk = node.settings.data_dir / rows[str(d.SOPInstanceUID)]
        assert pydicom.dcmread(on_disk).SOPInstanceUID == d.SOPInstanceUID  # the file behind every "stored"
    assert not list(node.settings.data_dir.rglob("*.tmp*"))
    with node.store.session() as s:
        study = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        assert study is not None and study.num_instances == 3
        assert s.scalar(select(Audit).where(Audit.action == "stow.received")).actor == "pacs"  # type: ignore[union-attr]
    node.settings.worklist.stable_seconds = 0
    assert len(queue.sweep(node.store, node.settings)) == 1
    with node.store.session() as s:
        assert s.scalar(select(Job.state)) == "queued"
    # The same instances again: acknowledged, not stored twice (as over C-STORE).
    client.store_instances(datasets)
    assert set(node.instances()) == stored


def test_partial_and_total_failures_with_reasons(node: WebNode, tmp_path: Path) -> None:
    _, (good, other) = files(tmp_path / "study", n=2)
    hostile = pydicom.dcmread(other)
    hostile.SOPInstanceUID = hostile.file_meta.MediaStorageSOPInstanceUID = "1.2.3.../../../../etc/x"
    buf = BytesIO()
    hostile.save_as(buf, enforce_file_format=False)
    body, ctype = multipart_body([good.read_bytes(), buf.getvalue(), b"not dicom at all"])
    r = node.post(body, ctype)
    assert r.status_code == 202 and r.headers["content-type"].startswith("application/dicom+json")
    assert failures(r) == [(None, 0xC000), (None, 0xC000)]  # the hostile UID is not echoed back
    assert set(node.instances()) == {str(pydicom.dcmread(good).SOPInstanceUID)}
    assert not any(".." in str(p) for p in node.settings.data_dir.rglob("*"))

    body, ctype = multipart_body([b"garbage"])
    r = node.post(body, ctype)
    assert r.status_code == 409 and failures(r) == [(None, 0xC000)]


def test_a_part_cut_short_in_its_pixel_data_fails_alone(node: WebNode, tmp_path: Path) -> None:
    """A part whose Pixel Data declares more bytes than the part has: 0xC000 for it, the others stored."""
    _, (good, other) = files(tmp_path / "study", n=2)
    body, ctype = multipart_body([good.read_bytes(), other.read_bytes()[:-1000]])
    r = node.post(body, ctype)
    assert r.status_code == 202
    assert failures(r) == [(str(pydicom.dcmread(other).SOPInstanceUID), 0xC000)]
    assert set(node.instances()) == {str(pydicom.dcmread(good).SOPInstanceUID)}


def test_a_stow_request_is_activity_for_the_stable_study_sweep(node: WebNode, tmp_path: Path) -> None:
    """Its studies are busy while it stores and their quiet time starts at its end, as for an association."""
    study_uid, paths = files(tmp_path / "study", n=2)
    body, ctype = multipart_body([p.read_bytes() for p in paths])
    before = utcnow()
    assert node.post(body, ctype).status_code == 200
    activity = services_of(node.app).receiver().activity
    assert study_uid not in activity.busy_studies()
    released = activity.released_at()[study_uid]
    assert released >= before and set(node.instances()) == {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}
    with node.store.session() as s:  # released after the last instance arrived
        assert released >= s.scalar(select(Study.last_received_at).where(Study.study_instance_uid == study_uid))


def test_study_in_the_path_must_match(node: WebNode, tmp_path: Path) -> None:
    study_uid, (a,) = files(tmp_path / "study", n=1)
    body, ctype = multipart_body([a.read_bytes()])
    r = node.post(body, ctype, path="/dicomweb/studies/1.2.3.4")
    sop = str(pydicom.dcmread(a).SOPInstanceUID)
    assert r.status_code == 409 and failures(r) == [(sop, 0xC409)]
    assert node.post(body, ctype, path=f"/dicomweb/studies/{study_uid}").status_code == 200
    assert node.post(body, ctype, path="/dicomweb/studies/..%2F..%2Fetc").status_code in (400, 404)


def test_tokens_media_types_and_size_limits(node: WebNode, tmp_path: Path) -> None:
    _, (a,) = files(tmp_path / "study", n=1)
    body, ctype = multipart_body([a.read_bytes()])
    assert node.post(body, ctype, token="wrong").status_code == 401
    assert node.post(body, ctype, token=READER).status_code == 403  # a read token does not write
    assert httpx.get(node.url + "/api/studies", headers={"Authorization": f"Bearer {STORER}"}).status_code == 403
    assert node.post(body, "application/dicom").status_code == 415
    assert node.post(body, ctype.replace("application/dicom", "application/dicom+xml")).status_code == 415
    assert node.post(b"--x\r\n", 'multipart/related; type="application/dicom"; boundary=y').status_code == 400
    big = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    big.PixelData = bytes(1200 * 1024)  # one part over stow_max_part_mb = 1
    big.Rows, big.Columns = 768, 800
    buf = BytesIO()
    big.save_as(buf, enforce_file_format=True)
    body2, ctype2 = multipart_body([buf.getvalue(), a.read_bytes()])
    r = node.post(body2, ctype2)
    assert r.status_code == 202 and failures(r) == [(None, 0xA700)]
    huge, ctype3 = multipart_body([buf.getvalue()] * 2)  # body over stow_max_body_mb = 2
    assert node.post(huge, ctype3).status_code == 413
    assert node.post(body, ctype, token=ADMIN).status_code == 200


def test_orthanc_dicomweb_client_sends_a_study_to_the_node(node: WebNode, tmp_path: Path) -> None:
    http_port = free_port()
    orthanc = orthanc_with_dicomweb(
        tmp_path / "orthanc",
        http_port,
        {
            "Servers": {
                "dxnode": {
                    "Url": node.url + "/dicomweb/",
                    "HttpHeaders": {"Authorization": f"Bearer {STORER}"},
                }
            }
        },
    )
    try:
        base = f"http://127.0.0.1:{http_port}"
        study_uid, paths = files(tmp_path / "study", n=2, patient_id="PAT-ORTHANC-WEB")
        for p in paths:
            req = urllib.request.Request(f"{base}/instances", data=p.read_bytes(), method="POST")
            urllib.request.urlopen(req, timeout=30).read()
        orthanc_study = rest(f"{base}/tools/lookup", study_uid.encode())[0]["ID"]
        rest(f"{base}/dicom-web/servers/dxnode/stow", json.dumps({"Resources": [orthanc_study]}).encode())
        got = wait_until(lambda: len(node.instances()) == 2 or None, timeout=60, what="instances at the node")
        assert got
        with node.store.session() as s:
            study = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            assert study is not None and study.patient_id == "PAT-ORTHANC-WEB"
    finally:
        orthanc.terminate()
        orthanc.wait(timeout=30)


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def test_a_large_body_is_spooled_to_disk_not_held_in_memory(tmp_path: Path) -> None:
    """100 MB of STOW-RS in one request raises the peak RSS by far less than the body's size."""
    n = WebNode(tmp_path, stow_max_body_mb=512, stow_max_part_mb=8)
    try:
        template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        template.Rows, template.Columns = 1000, 800
        template.PixelData = bytes(1000 * 800 * 2)
        body_file = tmp_path / "body.bin"
        boundary = "dxnode-test-boundary"
        uids = []
        with open(body_file, "wb") as f:
            for _ in range(64):
                template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
                uids.append(str(template.SOPInstanceUID))
                buf = BytesIO()
                template.save_as(buf, enforce_file_format=True)
                f.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
                f.write(buf.getvalue() + b"\r\n")
            f.write(f"--{boundary}--\r\n".encode())
        size_mb = body_file.stat().st_size / 2**20
        assert size_mb > 95
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _rss_kb("VmRSS")
        with open(body_file, "rb") as f:
            r = httpx.post(
                n.url + "/dicomweb/studies",
                content=f,
                headers={
                    "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                    "Authorization": f"Bearer {STORER}",
                },
                timeout=300,
            )
        growth_mb = (_rss_kb("VmHWM") - before) / 1024
        assert r.status_code == 200, r.text[:500]
        assert set(n.instances()) == set(uids)
        # The old code held the body, its parts and their copies: over twice the body's size.
        assert growth_mb < 40, f"peak RSS grew {growth_mb:.0f} MB for a {size_mb:.0f} MB body"
        assert not [p for p in (n.settings.data_dir / "incoming").iterdir() if p.is_file()], "a spool file was left"
    finally:
        n.server.stop()
        n.store.dispose()


def test_an_unexpected_storing_error_is_logged_once_and_the_client_gets_no_exception_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from dxnode.receive.ingest import Ingest
    from dxnode.receive.parse import OUT_OF_RESOURCES

    class Failing(Ingest):
        """A receiver with a bug: its storing path raises an exception no handler expects."""

        def store_received(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("secret detail /srv/dxnode/internal")

    settings = node_settings(tmp_path)
    settings.web.tokens.append(type(settings.web.tokens[0])(name="pacs", token=STORER, role="store"))
    store = make_store(settings)
    server = WebServer(create_app(settings, store, ingest=Failing(settings, store)), "127.0.0.1", 0)
    server.start()
    try:
        _, paths = files(tmp_path / "study", n=1)
        body, ctype = multipart_body([paths[0].read_bytes()])
        with caplog.at_level("WARNING", logger="dxnode.stow"):
            r = httpx.post(
                f"http://127.0.0.1:{server.port}/dicomweb/studies",
                content=body,
                headers={"Content-Type": ctype, "Authorization": f"Bearer {STORER}"},
                timeout=60,
            )
        assert r.status_code == 409 and [reason for _, reason in failures(r)] == [OUT_OF_RESOURCES]
        assert "secret detail" not in r.text
        logged = [rec for rec in caplog.records if rec.exc_info and "secret detail" in str(rec.exc_info[1])]
        assert len(logged) == 1  # once, with the reason
        assert not any("secret detail" in rec.getMessage() for rec in caplog.records)
    finally:
        server.stop()
        store.dispose()
