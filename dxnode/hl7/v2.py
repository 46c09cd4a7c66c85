"""HL7 v2 pieces shared by orders in and results out: escaping, field access, the message header,
acknowledgements (MSA with the reason, ERR with the HL7 table 0357 code) and message control ids."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import re
from dataclasses import dataclass
from typing import Literal

import hl7

ENCODING = "^~\\&"  # MSH-2: component, repetition, escape, subcomponent
DEFAULT_VERSION = "2.5.1"
AckCode = Literal["AA", "AE", "AR"]

# HL7 table 0357 (message error condition codes) used in ERR-3.
ERRORS = {
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    207: "Application internal error",
}
_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
_counter = itertools.count(1)


class Refusal(Exception):
    """A message that is answered AE or AR: the code, HL7 error (table 0357), reason and where (e.g. PID^1^3)."""

    def __init__(self, ack: AckCode, error: int, reason: str, location: str = "") -> None:
        super().__init__(reason)
        self.ack, self.error, self.reason, self.location = ack, error, reason, location


def escape(text: str) -> str:
    """text as an HL7 field value: the delimiters escaped, line breaks as spaces."""
    text = "".join(_ESCAPES.get(c, c) for c in text)
    return text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


def timestamp(when: dt.datetime | None = None) -> str:
    """An HL7 DTM in UTC: YYYYMMDDHHMMSS+0000."""
    return (when or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime("%Y%m%d%H%M%S+0000")


def control_id(prefix: str = "DX") -> str:
    """A message control id (MSH-10) unique to this process run, at most 20 characters."""
    stamp = dt.datetime.now(dt.UTC).strftime("%y%m%d%H%M%S")
    return f"{prefix}{stamp}{os.getpid() % 1000:03d}{next(_counter) % 1000:03d}"[:20]


def field(segment: hl7.Segment, number: int, component: int = 1) -> str:
    """A segment's field (component) as text, unescaped; "" when absent."""
    try:
        return str(segment.extract_field(1, number, 1, component, 1)).strip()
    except (IndexError, KeyError):
        return ""


@dataclass(frozen=True)
class Header:
    """What the acknowledgement needs from a message's MSH segment (read leniently, even from a bad one)."""

    sending_application: str = ""  # MSH-3, raw
    sending_facility: str = ""  # MSH-4, raw
    message_type: str = ""  # MSH-9.1
    event: str = ""  # MSH-9.2
    control_id: str = ""  # MSH-10
    processing_id: str = ""  # MSH-11
    version: str = ""  # MSH-12.1
    charset: str = ""  # MSH-18

    @property
    def sender(self) -> str:
        """MSH-3.1^MSH-4.1, as the node records who sent a message."""
        return f"{self.sending_application.split('^')[0]}^{self.sending_facility.split('^')[0]}"


def read_header(first_segment: str) -> Header:
    """The header fields of an MSH segment in the standard delimiters; empty fields where it has none."""
    if not first_segment.startswith("MSH") or len(first_segment) < 4:
        return Header()
    # MSH-1 is the separator itself, so MSH-n is fields[n - 1]
    fields = first_segment.split(first_segment[3])

    def get(n: int) -> str:
        return fields[n - 1] if len(fields) >= n else ""

    kind = get(9).split("^")
    return Header(
        sending_application=get(3),
        sending_facility=get(4),
        message_type=kind[0],
        event=kind[1] if len(kind) > 1 else "",
        control_id=get(10)[:64],
        processing_id=get(11).split("^")[0],
        version=get(12).split("^")[0],
        charset=get(18).split("~")[0],
    )


def is_segment_id(text: str) -> bool:
    """Three characters: a capital letter, then capitals or digits (MSH, PID, ZDS, ...)."""
    return _SEGMENT_ID.fullmatch(text) is not None


def _clean(text: str, limit: int = 199) -> str:
    """A raw header value copied into our answer: no delimiters of ours beyond components, bounded."""
    return "".join(c for c in text if c.isprintable() and c not in "|~\\&")[:limit]


def msh(
    sending_application: str,
    sending_facility: str,
    receiving_application: str,
    receiving_facility: str,
    message_type: str,
    control: str,
    version: str,
    processing_id: str = "P",
) -> str:
    """An MSH segment in the standard delimiters."""
    fields = [
        "MSH",
        ENCODING,
        escape(sending_application),
        escape(sending_facility),
        receiving_application,
        receiving_facility,
        timestamp(),
        "",
        message_type,
        control,
        processing_id,
        version,
    ]
    return "|".join(fields)


def ack(
    our_application: str,
    our_facility: str,
    header: Header,
    code: AckCode,
    text: str,
    error: int | None = None,
    location: str = "",
) -> str:
    """The original-mode acknowledgement of a message: MSH, MSA (code, its control id, the reason), and ERR
    with the table 0357 error when it is not accepted (ERR-1 for v2.3/2.4 readers, ERR-2..4 from v2.5)."""
    version = header.version if header.version else DEFAULT_VERSION
    event = header.event if is_segment_id(header.event) else ""
    segments = [
        msh(
            our_application,
            our_facility,
            _clean(header.sending_application),
            _clean(header.sending_facility),
            f"ACK^{event}^ACK" if event else "ACK",
            control_id("ACK"),
            _clean(version, 20),
            _clean(header.processing_id, 3) or "P",
        ),
        f"MSA|{code}|{_clean(header.control_id, 64)}|{escape(text[:500])}",
    ]
    if error is not None:
        where = [*location.split("^"), "", "", ""]
        name = ERRORS.get(error, "")
        eld = f"{where[0]}^{where[1]}^{where[2]}^{error}&{name}&HL70357"
        segments.append(f"ERR|{eld}|{location}|{error}^{name}^HL70357|E")
    return "\r".join(segments) + "\r"
