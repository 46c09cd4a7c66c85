"""DICOM TLS: the listener (with and without client certificates) and the outbox as a TLS client."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import need_tool
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from dxnode.config import Settings
from dxnode.outbox import dispatch
from dxnode.receive.ingest import Ingest
from dxnode.scp import StorageSCP
from dxnode.store import Delivery, Instance, Output, Store, Study, upgrade


def openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, made by openssl."""
    need_tool("openssl")
    d = tmp_path_factory.mktemp("pki")
    openssl(
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
        "/CN=dxnode test CA",
        cwd=d,
    )
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        extra = ["-extfile", "san.cnf"] if name == "server" else []
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            *extra,
            cwd=d,
        )
    return d


def tls_node(tmp: Path, pki: Path, require_client_cert: bool) -> tuple[StorageSCP, Store]:
    url = f"sqlite:///{tmp / 'rx.db'}"
    upgrade(url)
    settings = Settings(
        node={
            "host": "127.0.0.1",
            "port": 0,
            "data_dir": tmp / "rx",
            "min_free_mb": 10,
            "tls_port": 0,
            "tls_cert": pki / "server.crt",
            "tls_key": pki / "server.key",
            "tls_ca": pki / "ca.crt",
            "tls_require_client_cert": require_client_cert,
        },
        database={"url": url},
    )
    store = Store(url)
    scp = StorageSCP(settings, Ingest(settings, store))
    scp.start()
    return scp, store


def client_context(pki: Path, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    if with_cert:
        ctx.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    return ctx


def echo(port: int, tls: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title="TLSCLIENT")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="DXNODE", tls_args=(tls, "127.0.0.1") if tls else None)
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return bool(ok)


@pytest.fixture
def node(tmp_path: Path, pki: Path) -> Iterator[tuple[StorageSCP, Store]]:
    scp, store = tls_node(tmp_path, pki, require_client_cert=True)
    yield scp, store
    scp.stop()
    store.dispose()


def test_tls_listener_beside_the_plain_port(node: tuple[StorageSCP, Store], pki: Path) -> None:
    scp, store = node
    assert scp.tls_port and scp.tls_port != scp.port
    assert echo(scp.tls_port, client_context(pki, with_cert=True))
    assert not echo(scp.tls_port, client_context(pki, with_cert=False))  # client certificate required
    assert not echo(scp.tls_port, None)  # plain DICOM on the TLS port
    assert echo(scp.port, None)  # the plain port stays open
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ae = AE(ae_title="TLSCLIENT")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1", scp.tls_port, ae_title="DXNODE", tls_args=(client_context(pki, True), "127.0.0.1")
    )
    assert assoc.is_established and assoc.send_c_store(ds).Status == 0
    assoc.release()
    with store.session() as s:
        assert s.scalar(select(Instance.sop_instance_uid)) == ds.SOPInstanceUID


def test_outbox_delivers_over_tls_with_a_client_certificate(
    node: tuple[StorageSCP, Store], pki: Path, tmp_path: Path
) -> None:
    scp, receiver = node
    url = f"sqlite:///{tmp_path / 'tx.db'}"
    upgrade(url)
    sender = Store(url)
    settings = Settings(
        node={
            "ae_title": "SENDER",
            "data_dir": tmp_path / "tx",
            "tls_ca": pki / "ca.crt",
            "tls_cert": pki / "client.crt",
            "tls_key": pki / "client.key",
        },
        database={"url": url},
        destinations=[
            {"name": "secure-pacs", "ae_title": "DXNODE", "host": "127.0.0.1", "port": scp.tls_port, "tls": True}
        ],
    )
    src = Path(get_testdata_file("CT_small.dcm"))
    (settings.data_dir / "outputs").mkdir(parents=True)
    (settings.data_dir / "outputs" / "ct.dcm").write_bytes(src.read_bytes())
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    with sender.session() as s:
        study = Study(study_instance_uid=ds.StudyInstanceUID)
        s.add(study)
        s.flush()
        out = Output(
            study_id=study.id,
            kind="sc",
            sop_class_uid=ds.SOPClassUID,
            sop_instance_uid=ds.SOPInstanceUID,
            series_instance_uid=ds.SeriesInstanceUID,
            file_path="outputs/ct.dcm",
        )
        s.add(out)
        s.flush()
        dispatch.enqueue(s, out, settings)
    assert dispatch.send_due(sender, settings) == 1
    with receiver.session() as s:
        assert s.scalar(select(Instance.sop_instance_uid)) == ds.SOPInstanceUID
    with sender.session() as s:
        assert s.scalar(select(Delivery.state)) == "sent"
    sender.dispose()
