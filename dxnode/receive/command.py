"""C-STORE request command sets (PS3.7 9.3.1.1) read directly, for the listener's reader threads.

pynetdicom decodes each command set into a pydicom Dataset, then reads it back element by element
onto the request primitive: an eighth of a receiving process's interpreter time per instance
(docs/benchmarks.md). ``store_request`` reads a C-STORE-RQ's command set (Implicit VR Little
Endian, group 0000) with struct, the values as pydicom would give them. Anything it does not expect
(another command, another element, an empty, multi-valued or non-ASCII value, a repeated tag) gives
None, and pydicom decodes it as before. The primitive's own setters still check every value.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE

_ELEMENT = struct.Struct("<HHI")  # group, element, value length
_US = struct.Struct("<H")
_C_STORE_RQ = 0x0001
_NO_DATA_SET = 0x0101
# element -> (keyword, VR): the elements a C-STORE-RQ may carry
_ELEMENTS = {
    0x0000: ("CommandGroupLength", "UL"),
    0x0002: ("AffectedSOPClassUID", "UI"),
    0x0100: ("CommandField", "US"),
    0x0110: ("MessageID", "US"),
    0x0700: ("Priority", "US"),
    0x0800: ("CommandDataSetType", "US"),
    0x1000: ("AffectedSOPInstanceUID", "UI"),
    0x1030: ("MoveOriginatorApplicationEntityTitle", "AE"),
    0x1031: ("MoveOriginatorMessageID", "US"),
}
_ON_PRIMITIVE = frozenset(
    (
        "AffectedSOPClassUID",
        "MessageID",
        "Priority",
        "AffectedSOPInstanceUID",
        "MoveOriginatorApplicationEntityTitle",
        "MoveOriginatorMessageID",
    )
)


@dataclass(frozen=True, slots=True)
class StoreCommand:
    """A C-STORE-RQ command set, by keyword: what pynetdicom's DIMSE reads of a decoded one."""

    values: dict[str, Any]

    def __getattr__(self, keyword: str) -> Any:
        try:
            return self.values[keyword]
        except KeyError:
            raise AttributeError(keyword) from None

    def primitive(self, message: DIMSEMessage) -> C_STORE:
        """The request primitive of the whole message this command set is of, as pynetdicom's
        message_to_primitive makes it: each value through its checking setter, then the data set."""
        request = C_STORE()
        for keyword, value in self.values.items():
            if keyword in _ON_PRIMITIVE:
                setattr(request, keyword, value)
        request.DataSet = message.data_set
        request._context_id = message.context_id
        request._dataset_path = message._data_set_path
        request._dataset_file = message._data_set_file
        return request


def _value(vr: str, raw: bytes) -> Any:
    """raw's value as pydicom decodes it, or None where this reading does not cover it."""
    if vr == "US":
        return _US.unpack(raw)[0] if len(raw) == 2 else None
    if vr == "UL":
        return struct.unpack("<I", raw)[0] if len(raw) == 4 else None
    if b"\\" in raw or not raw.isascii():
        return None
    text = raw.decode("ascii")
    text = text.rstrip("\0 ") if vr == "UI" else text.strip()
    return text or None


def store_request(stream: BytesIO) -> StoreCommand | None:
    """The C-STORE-RQ command set in stream, or None for pydicom to decode (see the module's note)."""
    raw = stream.getvalue()
    values: dict[str, Any] = {}
    offset, end = 0, len(raw)
    while offset < end:
        if offset + 8 > end:
            return None
        group, element, length = _ELEMENT.unpack_from(raw, offset)
        known = _ELEMENTS.get(element)
        offset += 8
        if group != 0 or known is None or known[0] in values or offset + length > end:
            return None
        value = _value(known[1], raw[offset : offset + length])
        if value is None:
            return None
        values[known[0]] = value
        offset += length
    if values.get("CommandField") != _C_STORE_RQ or values.get("CommandDataSetType", _NO_DATA_SET) == _NO_DATA_SET:
        return None
    return StoreCommand(values)
