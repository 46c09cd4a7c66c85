"""C-STORE requests of the node's associations read, served and answered on pynetdicom's DUL reader thread.

pynetdicom passes each P-DATA-TF PDU its reader reads through its state machine (an event on a
queue, a PDU object, the DT-2 action, a P-DATA primitive) to DIMSE, which puts each whole message
on a queue for the association's reactor thread; that thread runs the service class and its
handler and puts the response on the reader's queue, which sends it through the state machine
again (Evt9, DT-1). Per instance: two hand-offs between threads and two state-machine steps, about
a quarter of a receiving process's interpreter time (docs/benchmarks.md). ``install`` shortens that
for the associations of a listener's AE (chunked.register), while the association is established
(Sta6) and no handler watches its data, PDUs, messages or transitions (pynetdicom's logging at
DEBUG binds such handlers: then everything goes pynetdicom's way):

- a P-DATA-TF PDU goes straight to DIMSE as a P-DATA primitive, which is what DT-2 does (Sta6 stays
  Sta6); a malformed one goes pynetdicom's way, to be refused as before; a PDU longer than a whole
  instance may be (max_instance_mb) is refused (A-ABORT) before it is read, where pynetdicom would
  read and hold it whole;
- a whole C-STORE request, on an accepted context and for a storage SOP class, is served on the
  reader thread by pynetdicom's own StorageServiceClass (the handler, its status checks, 0xC211
  for a handler's exception) instead of on the reactor thread;
- its response is written to the socket there (what DT-1 does; ``send_now``), unless something else
  waits to be sent first.

Anything else (negotiation, release, abort, other messages, a context or SOP class pynetdicom would
abort for, whose blocking abort would wait for this very thread) goes pynetdicom's way, unchanged.
A sender waits for each C-STORE response before its next request (pynetdicom negotiates no
asynchronous operations), so the reader has nothing to read while the handler runs. The network
timeout's idle timer is stopped meanwhile and restarted after the response: a slow commit is the
node's wait, not the peer's silence (on the reactor thread the handler's time counted towards it).
"""

from __future__ import annotations

import functools
import struct
import threading
from io import BytesIO
from typing import Any

from pynetdicom import _config, dimse_messages, dul, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from dxnode.receive import chunked
from dxnode.receive.command import StoreCommand, store_request

_READ = dul.DULServiceProvider._read_pdu_data
_DECODE = dimse_messages.decode
_WATCHED = (
    evt.EVT_DATA_RECV,
    evt.EVT_PDU_RECV,
    evt.EVT_FSM_TRANSITION,
    evt.EVT_DIMSE_RECV,
    evt.EVT_DATA_SENT,
    evt.EVT_PDU_SENT,
)
_PDU_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)  # what pynetdicom's reader decodes
_HEAD = struct.Struct(">BBL")  # PDU type, reserved, length
_LENGTH = struct.Struct(">L")  # a PDV item's length


def _inline(provider: dul.DULServiceProvider) -> bool:
    """True while provider's association is established, is a listener's, and nothing watches it."""
    limit = provider.__dict__.get("_dxnode_inline")
    if limit is None:
        assoc = provider.assoc
        limit = chunked.limit(assoc.ae) if assoc.is_acceptor else None
        if limit is None or any(assoc.get_handlers(event) for event in _WATCHED):
            limit = 0
        provider._dxnode_inline = limit  # type: ignore[attr-defined]  # (what also bounds its PDUs)
        if limit:
            _serve_here(assoc, provider)
    return bool(limit) and provider.state_machine.current_state == "Sta6"


def _serve_here(assoc: Association, provider: dul.DULServiceProvider) -> None:
    """Whole messages that DIMSE queues for the reactor thread: a C-STORE request is served at once
    when the reader itself queues it (and _serve takes it)."""
    queue = assoc.dimse.msg_queue
    put = queue.put

    def put_or_serve(item: Any, block: bool = True, timeout: float | None = None) -> None:
        if threading.current_thread() is provider and _serve(assoc, provider, item):
            return
        put(item, block, timeout)

    queue.put = put_or_serve  # type: ignore[method-assign]


@functools.cache
def _storage(uid: str) -> bool:
    """True for a SOP class pynetdicom serves with its StorageServiceClass."""
    return uid_to_service_class(uid) is StorageServiceClass


def _serve(assoc: Association, provider: dul.DULServiceProvider, item: tuple[int, Any]) -> bool:
    """Serve a C-STORE request here, as pynetdicom's reactor would (Association._serve_request);
    False where it must go to the reactor thread."""
    context_id, request = item
    if type(request) is not C_STORE or not request.is_valid_request or assoc._sent_release:
        return False
    context = assoc._accepted_cx.get(context_id)
    uid = str(request.AffectedSOPClassUID)
    if context is None or _config.UNRESTRICTED_STORAGE_SERVICE or uid in assoc.acceptor.accepted_common_extended:
        return False
    if not _storage(uid):
        return False
    timer = provider._idle_timer
    timer.stop()
    try:
        assoc.dimse.cancel_req = {}
        StorageServiceClass(assoc).SCP(request, context)
        assoc.dimse.cancel_req = {}
    finally:
        timer.restart()
    return True


def send_now(provider: dul.DULServiceProvider, context_id: int, pdv: bytes) -> bool:
    """Send one P-DATA-TF PDU of one PDV (its control header first) from the reader thread itself,
    as DT-1 would; False where it must be queued (another thread, or something queued before it)."""
    if threading.current_thread() is not provider or not _inline(provider) or provider.to_provider_queue.queue:
        return False
    sock = provider.socket
    if sock is None:
        return False
    item = 1 + len(pdv)  # the context ID, then the PDV (its control header first)
    sock.send(_HEAD.pack(0x04, 0, 4 + item) + _LENGTH.pack(item) + bytes((context_id,)) + pdv)
    return True


def _pdvs(pdu: bytearray) -> list[tuple[int, Any]] | None:
    """The (context ID, control header and fragment) of each PDV item of a whole P-DATA-TF PDU, as
    views of it; None where the items do not fill it exactly (pynetdicom's decoder then refuses it)."""
    view = memoryview(pdu)
    items: list[tuple[int, Any]] = []
    offset, end = 6, len(pdu)
    while offset < end:
        if offset + 6 > end:
            return None
        (length,) = _LENGTH.unpack_from(pdu, offset)
        if length < 2 or offset + 4 + length > end:
            return None
        items.append((pdu[offset + 4], view[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    return items or None


def _read_pdu_data(self: dul.DULServiceProvider) -> None:
    """pynetdicom's (DULServiceProvider._read_pdu_data, the same events and log lines), but a P-DATA-TF
    PDU of an inline association goes straight to DIMSE."""
    if not _inline(self) or self.event_queue.queue:
        return _READ(self)
    sock = self.socket
    assert sock is not None
    try:
        data = sock.recv(6)
    except (OSError, TimeoutError) as exc:
        dul.LOGGER.error("Connection closed before the entire PDU was received")
        dul.LOGGER.exception(exc)
        self.event_queue.put("Evt17")
        return
    if len(data) != 6:
        self.event_queue.put("Evt17")
        return
    pdu_type, _, length = _HEAD.unpack(data)
    if pdu_type not in _PDU_TYPES:
        dul.LOGGER.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
        self.event_queue.put("Evt19")
        return
    if length > self._dxnode_inline:  # type: ignore[attr-defined]  # (_inline set it: max_instance_mb's bytes)
        # not read: one PDU larger than a whole instance may be is no sender's, and would be held whole
        dul.LOGGER.error(f"Refused a PDU of {length} bytes, over [node] max_instance_mb")
        self.event_queue.put("Evt19")
        return
    try:
        data += sock.recv(length)
    except (OSError, TimeoutError) as exc:
        dul.LOGGER.error("Connection closed before the entire PDU was received")
        dul.LOGGER.exception(exc)
        self.event_queue.put("Evt17")
        return
    if len(data) != 6 + length:
        dul.LOGGER.error(f"The received PDU is shorter than expected ({len(data)} of {6 + length} bytes received)")
        self.event_queue.put("Evt17")
        return
    if pdu_type == 0x04 and (pdvs := _pdvs(data)) is not None:
        primitive = P_DATA()
        primitive._presentation_data_value_list = pdvs  # (its setter wants bytes; DIMSE reads views alike)
        self.assoc.dimse.receive_primitive(primitive)
        return
    try:
        pdu, event = self._decode_pdu(data)
        self.event_queue.put(event)
    except Exception as exc:
        dul.LOGGER.error("Unable to decode the received PDU data")
        dul.LOGGER.exception(exc)
        self.event_queue.put("Evt19")
        return
    self._recv_pdu.put(pdu)


def _decode(stream: BytesIO, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> Any:
    """pynetdicom's decode of a command set (DIMSEMessage.decode_msg), but a C-STORE-RQ's read by
    command.store_request on an inline association's reader."""
    thread = threading.current_thread()
    if is_implicit_vr and is_little_endian and not deflated and thread.__dict__.get("_dxnode_inline"):
        command: StoreCommand | None = store_request(stream)
        if command is not None:
            return command
    return _DECODE(stream, is_implicit_vr, is_little_endian, deflated)


def install() -> None:
    """Read, serve and answer the listener's C-STOREs on the reader thread (once; process-wide)."""
    dimse_messages.decode = _decode  # type: ignore[assignment]  # (a StoreCommand reads as the Dataset would)
    dul.DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]
