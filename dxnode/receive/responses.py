"""The C-STORE response a receiver sends for each instance, its command set encoded directly.

pynetdicom builds every response as a pydicom Dataset, encodes it once for its group length and once
more to send it: about 0.25 ms of CPU per received instance, a tenth of the node's whole cost
(docs/benchmarks.md). ``install`` puts ``send_msg`` in pynetdicom's place: a C-STORE response with
no status detail (Offending Element, Error Comment) is encoded here, the same bytes as pynetdicom's
(a test checks it), and sent as one P-DATA (from the reader thread itself where inline.py serves
it); any other message, and any association with handlers bound to EVT_DIMSE_SENT (pynetdicom's own
logging at INFO or DEBUG), goes pynetdicom's way.
"""

from __future__ import annotations

import struct
from typing import Any

from pynetdicom import dimse, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from dxnode.receive import inline
from dxnode.receive.part10 import even

_SEND = dimse.DIMSEServiceProvider.send_msg
_C_STORE_RSP = 0x8001  # Command Field
_NO_DATA_SET = 0x0101  # Command Data Set Type


def _uid(element: int, value: str) -> bytes:
    """A UI element of the command group, Implicit VR Little Endian, padded with NUL to even length."""
    raw = even(value, b"\x00")
    return struct.pack("<HHI", 0x0000, element, len(raw)) + raw


def _us(element: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, element, 2, value)


def store_response(rsp: C_STORE) -> bytes | None:
    """The command set of a C-STORE response (PS3.7 9.3.1.2), or None where pynetdicom must encode it
    (status detail, or a value this encoding does not cover)."""
    if rsp.MessageIDBeingRespondedTo is None or rsp.Status is None:
        return None
    if rsp.OffendingElement is not None or rsp.ErrorComment is not None:
        return None
    try:
        parts = [_uid(0x0002, rsp.AffectedSOPClassUID)] if rsp.AffectedSOPClassUID is not None else []
        parts += [
            _us(0x0100, _C_STORE_RSP),
            _us(0x0120, rsp.MessageIDBeingRespondedTo),
            _us(0x0800, _NO_DATA_SET),
            _us(0x0900, rsp.Status),
        ]
        if rsp.AffectedSOPInstanceUID is not None:
            parts.append(_uid(0x1000, rsp.AffectedSOPInstanceUID))
    except (UnicodeEncodeError, struct.error):
        return None
    body = b"".join(parts)
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def _send_msg(self: dimse.DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    """pynetdicom's send_msg, with a plain C-STORE response encoded by store_response."""
    responding = type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None
    if responding and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        command = store_response(primitive)
        if command is not None and (self.maximum_pdu_size == 0 or len(command) + 6 <= self.maximum_pdu_size):
            pdv = b"\x03" + command  # the last command fragment
            if inline.send_now(self.dul, context_id, pdv):
                return
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, pdv))
            self.dul.send_pdu(pdata)
            return
    _SEND(self, primitive, context_id)


def install() -> None:
    """Encode plain C-STORE responses here (process-wide; by the listener, as reactor.install)."""
    dimse.DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
