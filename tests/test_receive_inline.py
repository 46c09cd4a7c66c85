"""C-STOREs read, served and answered on pynetdicom's reader thread (dxnode/receive/inline.py), and
their command sets read without pydicom (dxnode/receive/command.py): the same primitives, statuses
and stored files as pynetdicom's own way, over real associations to the node's listener."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from nodeproc import InProcessNode, wait_until
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from test_scp import small_ct

from dxnode.receive import inline
from dxnode.receive.command import store_request
from dxnode.receive.ingest import Ingest

_PRIMITIVE = (
    "MessageID",
    "AffectedSOPClassUID",
    "AffectedSOPInstanceUID",
    "Priority",
    "MoveOriginatorApplicationEntityTitle",
    "MoveOriginatorMessageID",
)


def command_set(request: C_STORE | C_ECHO) -> bytes:
    """request's command set as a sender encodes it (Implicit VR Little Endian, group 0000)."""
    message = C_STORE_RQ() if isinstance(request, C_STORE) else C_ECHO_RQ()
    message.primitive_to_message(request)
    encoded = encode(message.command_set, True, True)
    assert isinstance(encoded, bytes)
    return encoded


def pynetdicom_primitive(raw: bytes) -> C_STORE:
    """What pynetdicom makes of a C-STORE-RQ command set: pydicom's decode, then message_to_primitive."""
    message = C_STORE_RQ()
    message.command_set = decode(BytesIO(raw), True, True)
    message.context_id = 1
    primitive = message.message_to_primitive()
    assert isinstance(primitive, C_STORE)
    return primitive


def store_rq(instance: str, priority: int = 2, move: tuple[str, int] | None = None) -> C_STORE:
    request = C_STORE()
    request.MessageID, request.Priority = 7, priority
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = CTImageStorage, instance
    request.DataSet = BytesIO(b"\x08\x00\x18\x00")  # a data set follows (Command Data Set Type)
    if move is not None:
        request.MoveOriginatorApplicationEntityTitle, request.MoveOriginatorMessageID = move
    return request


@pytest.mark.parametrize("uid_length", [20, 21, 63, 64])  # UI values are padded to even length with NUL
@pytest.mark.parametrize("priority", [0, 1, 2])
@pytest.mark.parametrize("move", [None, ("QR_SCP", 65535), ("A", 1)])
def test_a_store_request_reads_as_pynetdicom_reads_it(uid_length: int, priority: int, move: Any) -> None:
    instance = (generate_uid("1.2.826.0.1.3680043.8.498.") + "1" * 64)[:uid_length].rstrip(".")
    raw = command_set(store_rq(instance, priority, move))
    command = store_request(BytesIO(raw))
    assert command is not None
    assert command.CommandField == 0x0001 and command.CommandDataSetType != 0x0101
    message = C_STORE_RQ()
    message.context_id = 1
    mine, theirs = command.primitive(message), pynetdicom_primitive(raw)
    for keyword in _PRIMITIVE:
        assert getattr(mine, keyword) == getattr(theirs, keyword), keyword
    assert mine.AffectedSOPInstanceUID == instance


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


@pytest.mark.parametrize(
    "change",
    [
        "echo",
        "multi-valued",
        "unknown element",
        "repeated element",
        "non-ASCII",
        "truncated",
        "empty UID",
        "no data set",
        "other group",
    ],
)
def test_anything_else_is_left_to_pydicom(change: str) -> None:
    raw = command_set(store_rq(generate_uid()))
    uid = b"1.2.840.10008.5.1.4.1.1.2\x00"
    if change == "echo":
        echo = C_ECHO()
        echo.MessageID, echo.AffectedSOPClassUID = 1, Verification
        raw = command_set(echo)
    elif change == "multi-valued":
        raw += _element(0x1000, b"1.2.3\\4.5.6")
    elif change == "unknown element":
        raw += _element(0x0900, struct.pack("<H", 0))  # Status, in a request
    elif change == "repeated element":
        raw += _element(0x0002, uid)
    elif change == "non-ASCII":
        raw += _element(0x1030, "ÄÖÜ".encode("latin-1") + b" ")
    elif change == "truncated":
        raw = raw[:-3]
    elif change == "empty UID":
        raw += _element(0x1000, b"")
    elif change == "no data set":
        raw = raw.replace(_element(0x0800, struct.pack("<H", 0x0001)), _element(0x0800, struct.pack("<H", 0x0101)))
        assert _element(0x0800, struct.pack("<H", 0x0101)) in raw
    elif change == "other group":
        raw = raw.replace(struct.pack("<HH", 0x0000, 0x0110), struct.pack("<HH", 0x0008, 0x0110))
    assert store_request(BytesIO(raw)) is None


@pytest.fixture(params=["none", "standard"])  # pynetdicom's logging handlers bound (DEBUG), or not
def node(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcessNode]:
    """The node's listener in this process; which thread stores each instance is kept in node.threads."""
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", request.param)
    threads: list[threading.Thread] = []
    original = Ingest.store_c_store

    def observed(self: Ingest, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Ingest, "store_c_store", observed)
    n = InProcessNode(tmp_path)
    n.threads = threads  # type: ignore[attr-defined]
    n.handlers = request.param  # type: ignore[attr-defined]
    yield n
    n.stop()


def associate(port: int, network_timeout: float | None = None) -> Any:
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    if network_timeout is not None:
        ae.network_timeout = network_timeout
    assoc = ae.associate("127.0.0.1", port, ae_title="DXNODE")
    assert assoc.is_established
    return assoc


def test_stores_are_served_on_the_reader_unless_pynetdicom_logs_them(node: InProcessNode) -> None:
    assoc = associate(node.port)
    sent = [small_ct(generate_uid(), generate_uid(), k) for k in range(3)]
    try:
        statuses = [assoc.send_c_store(ds).Status for ds in sent[:2]]
        statuses.append(assoc.send_c_echo().Status)  # other messages go to the reactor thread, in between
        statuses.append(assoc.send_c_store(sent[2]).Status)
    finally:
        assoc.release()
    assert statuses == [0x0000, 0x0000, 0x0000, 0x0000]
    assert set(node.instances()) == {ds.SOPInstanceUID for ds in sent}
    readers = [isinstance(t, DULServiceProvider) for t in node.threads]  # type: ignore[attr-defined]
    assert readers == ([True] * 3 if node.handlers == "none" else [False] * 3)  # type: ignore[attr-defined]


def test_odd_fragments_are_stored_as_sent(node: InProcessNode) -> None:
    """A command set in two PDVs, two PDVs in one PDU and a data set in many small ones: the stored
    file holds what was sent, and the sender gets its response."""
    ds = small_ct(generate_uid(), generate_uid())
    assoc = paused(associate(node.port))
    try:
        context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage)
        request = store_rq(ds.SOPInstanceUID)
        request.MessageID = 3
        command = command_set(request)
        data = encode(ds, False, True)
        assert isinstance(data, bytes)
        pieces = [data[k : k + 333] for k in range(0, len(data), 333)]
        pdus: list[list[tuple[int, bytes]]] = [
            [(context.context_id, b"\x01" + command[:40])],
            [(context.context_id, b"\x03" + command[40:]), (context.context_id, b"\x00" + pieces[0])],
            *[[(context.context_id, b"\x00" + piece)] for piece in pieces[1:-1]],
            [(context.context_id, b"\x02" + pieces[-1])],
        ]
        for pdvs in pdus:
            pdata = P_DATA()
            pdata.presentation_data_value_list = [list(pdv) for pdv in pdvs]  # type: ignore[misc]
            assoc.dul.send_pdu(pdata)
        _, response = assoc.dimse.get_msg(block=True)
        assert response is not None and response.Status == 0x0000
        assert response.MessageIDBeingRespondedTo == 3
    finally:
        assoc.release()
    row = node.instances()[ds.SOPInstanceUID]
    stored = pydicom.dcmread(node.settings.node.data_dir / row.file_path)
    assert stored.PixelData == ds.PixelData and stored.StudyInstanceUID == ds.StudyInstanceUID


def paused(assoc: Any) -> Any:
    """assoc with its reactor paused, as pynetdicom's send_* do: the test reads the answers itself."""
    assoc._reactor_checkpoint.clear()
    wait_until(lambda: assoc._is_paused, 10, "the sender's reactor to pause")
    return assoc


def test_a_malformed_pdu_aborts_the_association_and_the_node_serves_the_next(node: InProcessNode) -> None:
    assoc = associate(node.port)
    item = struct.pack(">L", 500) + b"\x01\x03" + b"\x00" * 10  # says 500 bytes, has 12
    assoc.dul.socket.send(struct.pack(">BBL", 0x04, 0, len(item)) + item)
    wait_until(lambda: assoc.is_aborted, 10, "the node's A-ABORT")
    assert node.instances() == {}
    serves_the_next(node)


def test_a_pdu_longer_than_an_instance_may_be_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A P-DATA PDU that says 4 GB: aborted at once (pynetdicom's reader waits for it, to hold it whole)."""
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")  # as the node sets it below DEBUG (logs.py)
    node = InProcessNode(tmp_path, max_instance_mb=16)
    try:
        assoc = associate(node.port)
        head = struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0) + struct.pack(">L", 0xFFFFFFEC) + b"\x01\x00"
        assoc.dul.socket.send(head)
        wait_until(lambda: assoc.is_aborted, 10, "the node's A-ABORT")
        assert node.instances() == {}
        serves_the_next(node)
    finally:
        node.stop()


def serves_the_next(node: InProcessNode) -> None:
    """A new association stores an instance."""
    ds = small_ct(generate_uid(), generate_uid())
    again = associate(node.port)
    try:
        assert again.send_c_store(ds).Status == 0x0000
    finally:
        again.release()
    assert ds.SOPInstanceUID in node.instances()


def test_a_store_of_a_class_no_storage_service_serves_goes_pynetdicoms_way(node: InProcessNode) -> None:
    """A C-STORE on the Verification context goes to pynetdicom's reactor thread, as anything pynetdicom
    might abort for (its blocking abort would wait for the reader itself), and the node goes on."""
    assoc = paused(associate(node.port))
    verification = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == Verification)
    request = store_rq(generate_uid())
    request.AffectedSOPClassUID = Verification
    request.DataSet = BytesIO(encode(small_ct(generate_uid(), generate_uid()), True, True))
    assoc.dimse.send_msg(request, verification.context_id)
    _, answer = assoc.dimse.get_msg(block=True)  # (the DIMSE timeout's None if no answer came)
    # pynetdicom's Verification SCP answers it, with a C-ECHO response: served by the reactor thread
    assert isinstance(answer, C_ECHO) and answer.MessageIDBeingRespondedTo == request.MessageID
    assoc.release()
    serves_the_next(node)


def test_a_store_slower_than_the_network_timeout_is_answered_and_the_association_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The network timeout is the peer's silence: the node's own slow commit does not abort it."""
    original = Ingest.store_c_store

    def slow(self: Ingest, *args: Any, **kwargs: Any) -> Any:
        time.sleep(1.5)  # the slow commit itself: longer than the network timeout below
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Ingest, "store_c_store", slow)
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")  # as the node sets it below DEBUG (logs.py)
    node = InProcessNode(tmp_path, network_timeout=1)
    try:
        assoc = associate(node.port)
        try:
            sent = [small_ct(generate_uid(), generate_uid(), k) for k in range(2)]
            assert [assoc.send_c_store(ds).Status for ds in sent] == [0x0000, 0x0000]
            assert assoc.is_established
        finally:
            assoc.release()
        assert set(node.instances()) == {ds.SOPInstanceUID for ds in sent}
    finally:
        node.stop()


def test_inline_is_only_for_the_listeners_associations() -> None:
    """A pynetdicom acceptor the node did not register (a test peer, a PACS simulator in the same
    process) keeps pynetdicom's threads."""
    inline.install()
    seen: list[threading.Thread] = []
    ae = AE(ae_title="OTHER")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)

    def on_store(event: Any) -> int:
        seen.append(threading.current_thread())
        return 0x0000

    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        sender = AE(ae_title="SENDER")
        sender.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = sender.associate("127.0.0.1", server.server_address[1], ae_title="OTHER")
        assert assoc.send_c_store(small_ct(generate_uid(), generate_uid())).Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    assert len(seen) == 1 and not isinstance(seen[0], DULServiceProvider)
