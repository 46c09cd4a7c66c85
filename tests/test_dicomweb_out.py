"""STOW-RS deliveries from the outbox: a scripted HTTP server for each status class, and Orthanc's DICOMweb plugin."""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import test_dispatch
from conftest import free_port, need
from nodeproc import wait_port
from test_dispatch import deliveries, enqueue_all

from dxnode.config import Settings
from dxnode.outbox import dispatch
from dxnode.outbox.dicomweb import iter_parts, response_body, retry_after_seconds
from dxnode.store import Output, Store, utcnow

written, outputs = test_dispatch.written, test_dispatch.outputs  # shared fixtures: a real SR + SC as outbox rows
ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class ScriptedStow:
    """A real HTTP server on a free port answering STOW-RS with scripted (status, headers, body) replies."""

    def __init__(self, replies: list[tuple[int, dict[str, str], Any]] | None = None) -> None:
        self.replies = list(replies or [])
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ctype = self.headers["Content-Type"]
                boundary = ctype.split("boundary=", 1)[1].strip('"')
                parts = list(iter_parts(body, boundary))
                from io import BytesIO

                import pydicom

                uids = [str(pydicom.dcmread(BytesIO(p)).SOPInstanceUID) for _, p in parts]
                outer.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "type": ctype, "uids": uids}
                )
                status, headers, payload = outer.replies.pop(0) if outer.replies else (200, {}, None)
                if payload is None and status == 200:
                    payload = response_body([("1.2", u, "") for u in uids], [])
                data = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def stow() -> Iterator[ScriptedStow]:
    server = ScriptedStow()
    yield server
    server.stop()


def web_settings(store: Store, tmp: Path, url: str, **dest: Any) -> Settings:
    return Settings(
        node={"data_dir": tmp / "var"},
        database={"url": store.url},
        destinations=[{"name": "web", "kind": "dicomweb", "url": url, **dest}],
        dispatch={"backoff_initial_seconds": 0.2, "backoff_max_seconds": 0.5, "max_attempts": 3, "timeout_seconds": 5},
    )


def test_stow_rs_delivery_in_order_with_bearer_token(
    store: Store, tmp_path: Path, outputs: list[Output], stow: ScriptedStow, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PACS_TOKEN", "s3cret-token")
    settings = web_settings(
        store, tmp_path, f"http://127.0.0.1:{stow.port}/dicom-web", auth="bearer", secret_env="PACS_TOKEN"
    )
    enqueue_all(store, settings, outputs)
    assert dispatch.send_due(store, settings) == 2
    assert [r["uids"] for r in stow.requests] == [[o.sop_instance_uid] for o in outputs]
    assert all(r["path"] == "/dicom-web/studies" and r["auth"] == "Bearer s3cret-token" for r in stow.requests)
    assert 'type="application/dicom"' in stow.requests[0]["type"]
    rows = deliveries(store)
    assert [(d.state, d.http_status) for d in rows] == [("sent", 200)] * 2
    assert all("s3cret" not in d.last_error for d in rows)


def test_basic_auth_and_missing_secret(
    store: Store, tmp_path: Path, outputs: list[Output], stow: ScriptedStow, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"http://127.0.0.1:{stow.port}/wado"
    settings = web_settings(store, tmp_path, url, auth="basic", username="node", secret_env="PACS_PW")
    enqueue_all(store, settings, outputs[:1])
    assert dispatch.send_due(store, settings) == 0  # the variable is not set: retried, never sent without it
    row = deliveries(store)[0]
    assert row.state == "pending" and "PACS_PW" in row.last_error and stow.requests == []
    monkeypatch.setenv("PACS_PW", "pw:with:colons")
    assert dispatch.send_due(store, settings, now=utcnow() + dt.timedelta(seconds=5)) == 1
    assert stow.requests[0]["auth"] == "Basic " + base64.b64encode(b"node:pw:with:colons").decode()


def test_409_with_failure_reason_fails_at_once_and_the_next_row_flows(
    store: Store, tmp_path: Path, outputs: list[Output], stow: ScriptedStow
) -> None:
    first = outputs[0]
    stow.replies = [(409, {}, response_body([], [(first.sop_class_uid, first.sop_instance_uid, 0xA900)]))]
    settings = web_settings(store, tmp_path, f"http://127.0.0.1:{stow.port}")
    enqueue_all(store, settings, outputs)
    assert dispatch.send_due(store, settings) == 1
    failed, sent = deliveries(store)
    assert failed.state == "failed" and failed.attempts == 1 and failed.http_status == 409
    assert "0xA900 Data set does not match SOP Class" in failed.last_error
    assert sent.state == "sent"


def test_other_4xx_fails_at_once_with_the_servers_words(
    store: Store, tmp_path: Path, outputs: list[Output], stow: ScriptedStow
) -> None:
    stow.replies = [(415, {}, b"only application/dicom+xml here")]
    settings = web_settings(store, tmp_path, f"http://127.0.0.1:{stow.port}")
    enqueue_all(store, settings, outputs[:1])
    dispatch.send_due(store, settings)
    row = deliveries(store)[0]
    assert row.state == "failed" and "HTTP 415" in row.last_error and "application/dicom+xml" in row.last_error


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured_and_later_rows_wait(
    store: Store, tmp_path: Path, outputs: list[Output], stow: ScriptedStow, status: int
) -> None:
    stow.replies = [(status, {"Retry-After": "120"}, b"busy")]
    settings = web_settings(store, tmp_path, f"http://127.0.0.1:{stow.port}")
    enqueue_all(store, settings, outputs)
    before = utcnow()
    assert dispatch.send_due(store, settings) == 0
    head, behind = deliveries(store)
    assert head.state == "pending" and head.http_status == status
    assert head.next_attempt_at >= before + dt.timedelta(seconds=119)  # not the 0.2 s backoff
    assert behind.attempts == 0 and len(stow.requests) == 1  # order: nothing overtakes the head
    assert dispatch.send_due(store, settings, now=utcnow() + dt.timedelta(seconds=60)) == 0
    assert dispatch.send_due(store, settings, now=utcnow() + dt.timedelta(seconds=125)) == 2
    assert [r["uids"][0] for r in stow.requests] == [o.sop_instance_uid for o in [outputs[0], *outputs]]


def test_408_and_500_are_retried_and_network_errors_too(store: Store, tmp_path: Path, outputs: list[Output]) -> None:
    port = free_port()
    settings = web_settings(store, tmp_path, f"http://127.0.0.1:{port}")
    enqueue_all(store, settings, outputs[:1])
    dispatch.send_due(store, settings)
    row = deliveries(store)[0]
    assert row.state == "pending" and "ConnectError" in row.last_error
    server = ScriptedStow([(408, {}, b"slow"), (500, {}, b"oops")])
    try:
        settings = web_settings(store, tmp_path, f"http://127.0.0.1:{server.port}")
        for _ in range(2):
            dispatch.send_due(store, settings, now=utcnow() + dt.timedelta(seconds=5))
        row = deliveries(store)[0]
        assert row.state == "failed" and row.attempts == 3 and "HTTP 500" in row.last_error  # max_attempts = 3
    finally:
        server.stop()


def test_retry_after_http_date() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert retry_after_seconds("Thu, 01 Jan 2026 00:01:00 GMT", now) == 60
    assert retry_after_seconds("7") == 7 and retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_https_is_verified_against_ca_file(
    store: Store, tmp_path: Path, outputs: list[Output], stow: ScriptedStow
) -> None:
    need(shutil.which("openssl") is not None, "openssl")
    d = tmp_path / "pki"
    d.mkdir()

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ossl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
    )
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1")
    ossl(
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.crt",
        "-days",
        "2",
        "-extfile",
        "ext",
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(d / "srv.crt", d / "srv.key")
    stow.server.socket = ctx.wrap_socket(stow.server.socket, server_side=True)
    url = f"https://127.0.0.1:{stow.port}"
    untrusting = web_settings(store, tmp_path, url)
    enqueue_all(store, untrusting, outputs[:1])
    assert dispatch.send_due(store, untrusting) == 0
    assert "CERTIFICATE_VERIFY_FAILED" in deliveries(store)[0].last_error
    trusting = web_settings(store, tmp_path, url, ca_file=str(d / "ca.crt"))
    assert dispatch.send_due(store, trusting, now=utcnow() + dt.timedelta(seconds=5)) == 1


def test_config_refuses_credentials_in_url_and_auth_without_secret() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="no credentials in url"):
        Settings(destinations=[{"name": "w", "kind": "dicomweb", "url": "https://u:p@pacs/dicom-web"}])
    with pytest.raises(ValidationError, match="needs secret_env"):
        Settings(destinations=[{"name": "w", "kind": "dicomweb", "url": "https://pacs/dw", "auth": "bearer"}])
    with pytest.raises(ValidationError, match="auth over plain http"):
        Settings(
            destinations=[
                {"name": "w", "kind": "dicomweb", "url": "http://pacs/dw", "auth": "bearer", "secret_env": "T"}
            ]
        )
    with pytest.raises(ValidationError, match="needs ae_title, host and port"):
        Settings(destinations=[{"name": "d", "host": "pacs", "port": 104}])


def orthanc_with_dicomweb(tmp: Path, http_port: int, extra: dict[str, Any] | None = None) -> subprocess.Popen[bytes]:
    """Orthanc on free ports with Debian's DICOMweb plugin (its REST API at /, DICOMweb at /dicom-web/)."""
    need(shutil.which("Orthanc") is not None and ORTHANC_DICOMWEB.exists(), "orthanc + orthanc-dicomweb")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = {
        "Name": "dxnode-dicomweb",
        "StorageDirectory": str(tmp / "storage"),
        "IndexDirectory": str(tmp / "index"),
        "HttpPort": http_port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(ORTHANC_DICOMWEB)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", **(extra or {})},
    }
    (tmp / "orthanc.json").write_text(json.dumps(cfg))
    log = (tmp / "orthanc.log").open("wb")  # kept for the reader of a failing test
    proc = subprocess.Popen(["Orthanc", "--verbose", str(tmp / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    wait_port(http_port, timeout=60)
    return proc


def rest(url: str, data: bytes | None = None) -> Any:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_orthanc_receives_sr_and_sc_by_stow_rs(store: Store, tmp_path: Path, outputs: list[Output]) -> None:
    http_port = free_port()
    orthanc = orthanc_with_dicomweb(tmp_path / "orthanc", http_port)
    try:
        settings = web_settings(store, tmp_path, f"http://127.0.0.1:{http_port}/dicom-web/")
        enqueue_all(store, settings, outputs)
        assert dispatch.send_due(store, settings) == 2, [d.last_error for d in deliveries(store)]
        base = f"http://127.0.0.1:{http_port}"
        found = {}
        for o in outputs:
            hit = rest(f"{base}/tools/lookup", o.sop_instance_uid.encode())
            assert hit and hit[0]["Type"] == "Instance"
            tags = rest(f"{base}/instances/{hit[0]['ID']}/simplified-tags")
            found[o.kind] = tags["SOPClassUID"]
        assert found == {"sr": "1.2.840.10008.5.1.4.1.1.88.33", "sc": "1.2.840.10008.5.1.4.1.1.7"}
        assert [d.http_status for d in deliveries(store)] == [200, 200]
    finally:
        orthanc.terminate()
        orthanc.wait(timeout=30)
