"""The C-STORE responses the receiver encodes itself (dxnode/receive/responses.py) against pynetdicom's
own encoding (they must give the same bytes), and over a real association."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.events import Event

from dxnode.receive import responses


def response(status: int, instance: str | None, message_id: int = 7) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = CTImageStorage
    if instance is not None:
        rsp.AffectedSOPInstanceUID = instance
    rsp.Status = status
    return rsp


def pynetdicom_encoding(rsp: C_STORE) -> bytes:
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    encoded = encode(msg.command_set, True, True)
    assert isinstance(encoded, bytes)
    return encoded


@pytest.mark.parametrize("uid_length", [20, 21, 63, 64])  # even and odd lengths: UI values are padded with NUL
@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700, 0xC000])
@pytest.mark.parametrize("message_id", [1, 65535])
def test_store_response_is_byte_for_byte_what_pynetdicom_encodes(uid_length: int, status: int, message_id: int) -> None:
    instance = (generate_uid("1.2.826.0.1.3680043.8.498.") + "1" * 64)[:uid_length].rstrip(".")
    rsp = response(status, instance, message_id)
    assert responses.store_response(rsp) == pynetdicom_encoding(rsp)


def test_store_response_without_instance_uid_is_what_pynetdicom_encodes() -> None:
    rsp = response(0xA700, None)
    assert responses.store_response(rsp) == pynetdicom_encoding(rsp)


def test_status_detail_and_requests_are_left_to_pynetdicom() -> None:
    detailed = response(0xC000, generate_uid())
    detailed.ErrorComment = "cannot parse dataset"
    assert responses.store_response(detailed) is None
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = generate_uid()
    assert responses.store_response(request) is None  # a request, not a response


@pytest.fixture(params=["none", "standard"])  # pynetdicom's logging handlers bound, or not
def handlers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """pynetdicom's log handler level while the acceptor starts (its server binds them then)."""
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", request.param)
    return str(request.param)


@pytest.fixture
def acceptor(handlers: str) -> Iterator[tuple[int, list[Dataset | int]]]:
    """A pynetdicom acceptor with responses installed; each C-STORE is answered with the next of answers."""
    answers: list[Dataset | int] = []

    def on_store(event: Event) -> Dataset | int:
        return answers.pop(0)

    responses.install()
    ae = AE(ae_title="ACCEPT")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield server.server_address[1], answers
    finally:
        server.shutdown()


def instance() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CT"
    return ds


def test_a_sender_reads_plain_and_detailed_responses(
    handlers: str, acceptor: tuple[int, list[Dataset | int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, answers = acceptor
    encoded: list[bool] = []  # per response: encoded here (True) or left to pynetdicom

    def counted(rsp: C_STORE) -> bytes | None:
        command = store_response(rsp)
        encoded.append(command is not None)
        return command

    store_response = responses.store_response
    monkeypatch.setattr(responses, "store_response", counted)
    failure = Dataset()
    failure.Status, failure.ErrorComment = 0xA700, "disk nearly full"
    answers += [0x0000, 0xB000, failure]
    ae = AE(ae_title="SEND")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    commands: list[Dataset] = []  # each response's command set as the sender decoded it
    recv = [(evt.EVT_DIMSE_RECV, lambda event: commands.append(event.message.command_set))]
    assoc = ae.associate("127.0.0.1", port, ae_title="ACCEPT", evt_handlers=recv)
    assert assoc.is_established
    try:
        sent = [instance() for _ in range(3)]
        got = [assoc.send_c_store(ds, msg_id=i) for i, ds in enumerate(sent, 1)]
    finally:
        assoc.release()
    assert [rsp.Status for rsp in got] == [0x0000, 0xB000, 0xA700]
    assert [cmd.AffectedSOPInstanceUID for cmd in commands] == [ds.SOPInstanceUID for ds in sent]
    assert [cmd.MessageIDBeingRespondedTo for cmd in commands] == [1, 2, 3]
    # with EVT_DIMSE_SENT handlers bound every response goes pynetdicom's way (they read its message)
    assert encoded == ([True, True, False] if handlers == "none" else [])
    assert got[2].ErrorComment == "disk nearly full"  # pynetdicom's way, detail kept
    assert "ErrorComment" not in got[0]
