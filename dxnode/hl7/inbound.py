"""The HL7 listener's side of a message: check it, act on it, and answer every frame with an ACK.

What each message gets (MSA-1, the HL7 table 0357 error in ERR-3, the reason in MSA-3):

- AR 100: not an HL7 message (no MSH first, a segment id that is not three capitals or digits, a frame
  broken by the next one's start). AR 102: MSH-1/MSH-2 other than ``|^~\\&``, or an unknown MSH-18
  character set. AR 203: MSH-12 not a version of 2.3 to 2.9. AR 207: larger than [hl7] max_message_kb,
  or MSH-3/MSH-4 not in the allow-lists. AR 200/201: a message type other than ORM^O01 and OMI^O23.
- AE 101/102: MSH-10 missing, a field over [hl7] max_field_chars, text not in its character set, an order
  that a rule matches without a usable accession number. AE 207: the node could not record it (the
  database): the sender should send it again.
- AA: the message was read; its orders are recorded (or cancelled); MSA-3 says what was done, including
  "no [[hl7.rules]] entry matches: no action" for orders no rule matches.

A frame is answered whatever it holds, so a bad message never costs the listener or the next message.
"""

from __future__ import annotations

import logging

import hl7

from dxnode.config import HL7_VERSIONS, Settings
from dxnode.hl7.mllp import Frame, MllpListener
from dxnode.hl7.orders import ORDER_TYPES, fetch_orders, order_received, record_ack
from dxnode.hl7.v2 import ENCODING, AckCode, Header, Refusal, ack, is_segment_id, read_header
from dxnode.store import Store

log = logging.getLogger("dxnode.hl7.inbound")

CHARSETS = {"": "utf-8", "ASCII": "utf-8", "UNICODE UTF-8": "utf-8", "8859/1": "latin-1"}


def _charset(name: str) -> str:
    """The Python codec of an MSH-18 value (8859/n, UTF-8, ASCII); Refusal when unknown."""
    name = name.strip().upper()
    if name in CHARSETS:
        return CHARSETS[name]
    if name.startswith("8859/") and name[5:].isdigit():
        return f"iso8859-{name[5:]}"
    raise Refusal("AR", 102, f"MSH-18 character set {name[:20]!r} is not supported (UNICODE UTF-8, 8859/n, ASCII)")


def first_segment(data: bytes) -> str:
    """The first segment of a message (up to its CR or LF), as Latin-1 text: enough to read its header."""
    return data.lstrip().split(b"\r", 1)[0].split(b"\n", 1)[0].decode("latin-1")


def _segments(text: str) -> list[str]:
    """The segments of a message, whatever line ends the sender used (CR, LF or CRLF), blank ones dropped."""
    return [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s.strip()]


def _check_structure(segments: list[str], max_field: int) -> None:
    """Refusal unless every segment has a segment id and no field is over max_field characters."""
    for number, segment in enumerate(segments, start=1):
        sid = segment[:3]
        if not is_segment_id(sid) or segment[3:4] not in ("|", ""):
            raise Refusal("AR", 100, f"segment {number} ({segment[:10]!r}) is not an HL7 segment")
        for position, value in enumerate(segment.split("|")[1:], start=1):
            if len(value) > max_field:
                where = f"{sid}^{number}^{position + (1 if sid == 'MSH' else 0)}"
                raise Refusal("AE", 102, f"field {where} has {len(value)} characters (limit {max_field})", where)


def check(data: bytes, settings: Settings) -> tuple[Header, hl7.Message]:
    """The header and parsed message of a frame's content; Refusal (AE or AR, with the reason) when it cannot be used."""
    first = first_segment(data)
    header = read_header(first)
    if not first.startswith("MSH"):
        raise Refusal("AR", 100, "not an HL7 message: it does not start with an MSH segment")
    if first[3:4] != "|" or first[4:].split("|", 1)[0] not in (ENCODING, ENCODING + "#"):
        raise Refusal("AR", 102, "MSH-1 and MSH-2 must be | and ^~\\& (the standard encoding characters)", "MSH^1^2")
    try:
        text = data.decode(_charset(header.charset))
    except UnicodeDecodeError as exc:
        raise Refusal("AE", 102, f"byte {exc.start} is not {header.charset or 'UTF-8'} text (MSH-18)") from None
    segments = _segments(text.strip())
    _check_structure(segments, settings.hl7.max_field_chars)
    if not header.control_id:
        raise Refusal("AE", 101, "MSH-10 (message control id) is missing", "MSH^1^10")
    if header.version not in HL7_VERSIONS:
        raise Refusal("AR", 203, f"HL7 version {header.version[:10]!r} is not supported (2.3 to 2.9)", "MSH^1^12")
    _check_sender(header, settings)
    if (header.message_type, header.event) not in ORDER_TYPES:
        known = {t for t, _ in ORDER_TYPES}
        what = f"{header.message_type}^{header.event}"[:20]
        raise Refusal(
            "AR",
            201 if header.message_type in known else 200,
            f"message type {what} is not taken here (ORM^O01 and OMI^O23 orders only)",
            "MSH^1^9",
        )
    try:
        return header, hl7.parse("\r".join(segments))
    except Exception as exc:  # the library's errors are not one type
        raise Refusal("AR", 100, f"not an HL7 message: {exc}".splitlines()[0][:200]) from None


def _check_sender(header: Header, settings: Settings) -> None:
    """Refusal when MSH-3 or MSH-4 is not in a non-empty allow-list."""
    app, facility = (v.split("^")[0] for v in (header.sending_application, header.sending_facility))
    apps, facilities = settings.hl7.allowed_sending_applications, settings.hl7.allowed_sending_facilities
    if apps and app not in apps:
        raise Refusal("AR", 207, f"sending application {app[:40]!r} is not allowed here", "MSH^1^3")
    if facilities and facility not in facilities:
        raise Refusal("AR", 207, f"sending facility {facility[:40]!r} is not allowed here", "MSH^1^4")


def _act(store: Store, settings: Settings, header: Header, msg: hl7.Message) -> str:
    """Record the orders of a checked message; the text of its AA."""
    orders, ignored = fetch_orders(msg, settings)
    done = [order_received(store, settings, o, header.sender, header.control_id) for o in orders]
    return "; ".join(done + ignored)[:500] or "no action"


def answer(store: Store, settings: Settings, got: Frame, peer: str = "") -> bytes:
    """The ACK of one frame (the listener's handler): never raises, whatever the frame holds."""
    header = read_header(first_segment(got.data))
    code: AckCode = "AA"
    error: int | None = None
    location = ""
    try:
        if got.broken:
            raise Refusal("AR", 100, "the frame ended without its end block (the next frame started)")
        if got.oversize:
            raise Refusal(
                "AR", 207, f"the message is larger than {settings.hl7.max_message_kb} KiB ([hl7] max_message_kb)"
            )
        header, msg = check(got.data, settings)
        text = _act(store, settings, header, msg)
    except Refusal as refusal:
        code, error, text, location = refusal.ack, refusal.error, refusal.reason, refusal.location
    except Exception as exc:
        log.exception("hl7: message %s from %s could not be recorded", header.control_id, peer)
        code, error, text = "AE", 207, f"the node could not record it, send it again ({type(exc).__name__})"
    level = logging.INFO if code == "AA" else logging.WARNING
    log.log(
        level,
        "hl7: %s %s from %s (%s): %s %s",
        header.message_type or "?",
        header.control_id,
        peer,
        header.sender,
        code,
        text,
    )
    record_ack(store, header.sender, header.control_id, code)
    reply = ack(settings.hl7.sending_application, settings.hl7.sending_facility, header, code, text, error, location)
    try:
        return reply.encode(_charset(header.charset), "replace")
    except Refusal:
        return reply.encode("utf-8", "replace")


def make_listener(store: Store, settings: Settings) -> MllpListener:
    """The [hl7] MLLP listener, not yet started (start() binds it)."""
    h = settings.hl7
    return MllpListener(
        h.host,
        h.port,
        lambda got, peer: answer(store, settings, got, peer),
        h.max_message_kb * 1024,
        h.max_connections,
        h.idle_timeout_seconds,
    )
