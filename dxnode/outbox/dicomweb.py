"""DICOMweb STOW-RS (PS3.18 10.5): the client the outbox uses, and the multipart/response helpers the server shares.

A request is ``POST <base>/studies`` with a ``multipart/related; type="application/dicom"`` body,
one Part 10 file per part. The answer (PS3.18 Table 10.5.3-1) lists stored instances in Referenced
SOP Sequence and refused ones in Failed SOP Sequence with a Failure Reason. HTTP statuses map onto
the outbox's three outcomes: stored, retry later (network errors, 408, 429, 5xx; 429/503 after
Retry-After), or failed for good (other 4xx, a 409 refusal with its reason, redirects).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import os
import secrets
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from dxnode.config import Destination

DICOM_JSON = "application/dicom+json"
MAX_RETRY_AFTER = 86400.0  # seconds: a longer Retry-After is cut to a day
# Failure Reason values of PS3.18 Table I.2-1 / PS3.4 Annex B, in words.
FAILURE_REASONS = {
    0x0110: "Processing failure",
    0x0112: "No such object instance",
    0x0122: "Referenced SOP Class not supported",
    0x0124: "Not authorized",
    0xA700: "Out of resources",
    0xA900: "Data set does not match SOP Class",
    0xC000: "Cannot understand",
    0xC122: "Referenced Transfer Syntax not supported",
    0xC120: "Referenced Study Instance UID mismatch",
    0xB000: "Coercion of data elements",
    0xB006: "Elements discarded",
    0xB007: "Data set does not match SOP Class",
}
FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE = "00081198", "00081199"
REFERENCED_SOP_CLASS, REFERENCED_SOP_INSTANCE = "00081150", "00081155"
FAILURE_REASON, WARNING_REASON, RETRIEVE_URL = "00081197", "00081196", "00081190"


@dataclass(frozen=True)
class StowOutcome:
    """What a STOW-RS request did to one instance."""

    stored: bool
    permanent: bool = False  # failed, and no retry can change it
    error: str = ""
    http_status: int | None = None
    retry_after: float | None = None  # seconds the server asked us to wait (429/503)


def reason_text(code: int) -> str:
    """A Failure/Warning Reason in words, e.g. '0xA900 Data set does not match SOP Class'."""
    return f"0x{code:04X} " + FAILURE_REASONS.get(code, "Unknown reason")


def multipart_body(parts: list[bytes]) -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart/related request of application/dicom parts."""
    boundary = "dxnode-" + secrets.token_hex(16)
    chunks = []
    for part in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        chunks.append(part)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


class Searchable(Protocol):
    """What the multipart parser reads: bytes, or a FileBuffer over a body spooled to disk."""

    def find(self, sub: bytes, start: int = ..., end: int = ...) -> int: ...

    def __getitem__(self, index: slice) -> bytes: ...

    def __len__(self) -> int: ...


class FileBuffer:
    """Read-only bytes-like access (find, slices, len) to an open file, read on demand with pread:
    only what is asked for comes into memory (an mmap would count the whole file in the RSS)."""

    CHUNK = 1 << 20

    def __init__(self, fd: int) -> None:
        self.fd, self.size = fd, os.fstat(fd).st_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: slice) -> bytes:
        start, stop, _ = index.indices(self.size)
        parts, pos = [], start
        while pos < stop:
            data = os.pread(self.fd, stop - pos, pos)
            if not data:
                break
            parts.append(data)
            pos += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        """Lowest index of sub in [start, end), or -1; read a chunk at a time."""
        end = self.size if end is None else min(end, self.size)
        pos = start
        while pos < end:
            block = self[pos : min(end, pos + self.CHUNK + len(sub) - 1)]  # overlap: a match may straddle
            found = block.find(sub)
            if found >= 0:
                return pos + found
            pos += self.CHUNK
        return -1


def part_spans(body: Searchable, boundary: str) -> list[tuple[dict[str, str], int, int]]:
    """(headers with lower-case names, start, end of the content) of each part of a multipart body
    (RFC 2046); ValueError if the body is malformed anywhere. Nothing is copied but the headers, so
    a body spooled to disk is checked whole before any part is read."""
    dash = b"--" + boundary.encode("latin-1")
    delimiter = b"\r\n" + dash
    if body[: len(dash)] == dash:  # no preamble
        pos = len(dash)
    else:
        found = body.find(delimiter)
        if found < 0:
            raise ValueError("multipart body without its boundary")
        pos = found + len(delimiter)
    spans: list[tuple[dict[str, str], int, int]] = []
    while True:
        if body[pos : pos + 2] == b"--":  # the close delimiter
            return spans
        nxt = body.find(delimiter, pos)
        end = nxt if nxt >= 0 else len(body)
        while body[pos : pos + 1] in (b" ", b"\t"):  # transport padding
            pos += 1
        if body[pos : pos + 2] != b"\r\n":
            raise ValueError("malformed multipart boundary line")
        head_start = pos + 2
        # The header section ends at an empty line; a part without headers starts with it.
        sep = (
            head_start - 2 if body[head_start : head_start + 2] == b"\r\n" else body.find(b"\r\n\r\n", head_start, end)
        )
        if sep >= 0:
            headers = {}
            for line in body[head_start : max(head_start, sep)].decode("latin-1").split("\r\n"):
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            if headers or end > sep + 4:  # an empty piece between two delimiters is no part
                spans.append((headers, sep + 4, end))
        elif end - head_start > 64 or body[head_start:end].strip():
            raise ValueError("multipart part without a header/body separator")
        if nxt < 0:
            raise ValueError("multipart body has no close delimiter")
        pos = nxt + len(delimiter)


def iter_parts(body: Searchable, boundary: str) -> Iterator[tuple[dict[str, str], bytes]]:
    """(headers with lower-case names, content) of each part of a multipart body, one at a time."""
    for headers, start, end in part_spans(body, boundary):
        yield headers, body[start:end]


def ssl_context(dest: Destination) -> ssl.SSLContext:
    """Verification against the system CAs plus the destination's ca_file."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if dest.ca_file:
        ctx.load_verify_locations(cafile=str(dest.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _auth(dest: Destination) -> tuple[httpx.Auth | None, dict[str, str], str]:
    """(httpx auth, headers, '') for the destination, or (None, {}, why the secret is missing)."""
    if dest.auth == "none":
        return None, {}, ""
    secret = os.environ.get(dest.secret_env, "")
    if not secret:
        return None, {}, f"environment variable {dest.secret_env} (secret of destination {dest.name}) is not set"
    if dest.auth == "basic":
        return httpx.BasicAuth(dest.username, secret), {}, ""
    return None, {"Authorization": f"Bearer {secret}"}, ""


def retry_after_seconds(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Retry-After as seconds: delay-seconds or an HTTP-date (RFC 9110 10.2.3); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - (now or dt.datetime.now(dt.UTC))).total_seconds())


def _first(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def instance_outcome(payload: Any, sop_instance_uid: str) -> tuple[str, str]:
    """('stored'|'failed'|'unknown', reason) of an instance in a STOW-RS response body (DICOM JSON)."""
    if not isinstance(payload, dict):
        return "unknown", ""
    for item in (payload.get(FAILED_SOP_SEQUENCE) or {}).get("Value") or []:
        if isinstance(item, dict) and _first(item, REFERENCED_SOP_INSTANCE) == sop_instance_uid:
            code = _first(item, FAILURE_REASON)
            return "failed", reason_text(int(code)) if isinstance(code, int) else "no Failure Reason given"
    for item in (payload.get(REFERENCED_SOP_SEQUENCE) or {}).get("Value") or []:
        if isinstance(item, dict) and _first(item, REFERENCED_SOP_INSTANCE) == sop_instance_uid:
            code = _first(item, WARNING_REASON)
            return "stored", reason_text(int(code)) if isinstance(code, int) else ""
    return "unknown", ""


def _server_reason(response: httpx.Response, sop_instance_uid: str) -> str:
    """The server's words for a refusal: the instance's Failure Reason, else the start of the body."""
    try:
        state, reason = instance_outcome(response.json(), sop_instance_uid)
        if state == "failed":
            return reason
    except ValueError:
        pass
    text = " ".join(response.text.split())[:300]
    return text or response.reason_phrase


class StowClient:
    """One HTTP connection pool to one STOW-RS service; use as a context manager."""

    def __init__(self, dest: Destination, timeout: float) -> None:
        self.dest = dest
        self.auth, headers, self.config_error = _auth(dest)
        self.url = dest.url.rstrip("/") + "/studies"
        self.client = httpx.Client(
            verify=ssl_context(dest),
            timeout=timeout,
            headers={"Accept": DICOM_JSON, **headers},
            follow_redirects=False,  # a redirect could carry the credentials elsewhere
        )

    def __enter__(self) -> StowClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def store(self, data: bytes, sop_instance_uid: str) -> StowOutcome:
        """POST one Part 10 file; the outcome for its instance."""
        if self.config_error:
            return StowOutcome(False, error=self.config_error)
        body, content_type = multipart_body([data])
        try:
            response = self.client.post(
                self.url,
                content=body,
                headers={"Content-Type": content_type},
                auth=self.auth or httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.HTTPError as exc:
            return StowOutcome(False, error=f"STOW-RS to {self.url} failed: {type(exc).__name__}: {exc}")
        code = response.status_code
        where = f"STOW-RS {self.url}: HTTP {code}"
        if code in (200, 202):
            try:
                state, reason = instance_outcome(response.json(), sop_instance_uid)
            except ValueError:
                state, reason = ("stored", "") if code == 200 else ("unknown", "")
            if state == "failed":
                return StowOutcome(False, True, f"{where}: refused: {reason}", code)
            if state == "unknown" and code == 202:
                return StowOutcome(False, error=f"{where}: instance not listed in the response", http_status=code)
            return StowOutcome(True, http_status=code, error=reason)
        if code in (408, 429) or code >= 500:
            wait = retry_after_seconds(response.headers.get("Retry-After")) if code in (429, 503) else None
            wait = None if wait is None else min(wait, MAX_RETRY_AFTER)
            return StowOutcome(False, False, f"{where}: {_server_reason(response, sop_instance_uid)}", code, wait)
        return StowOutcome(False, True, f"{where}: {_server_reason(response, sop_instance_uid)}", code)


def response_body(stored: list[tuple[str, str, str]], failed: list[tuple[str, str, int]]) -> dict[str, Any]:
    """A PS3.18 STOW-RS response (DICOM JSON): stored (class, instance, retrieve URL), failed (class, instance, reason)."""
    body: dict[str, Any] = {}
    if stored:
        body[REFERENCED_SOP_SEQUENCE] = {
            "vr": "SQ",
            "Value": [
                {
                    REFERENCED_SOP_CLASS: {"vr": "UI", "Value": [cls]},
                    REFERENCED_SOP_INSTANCE: {"vr": "UI", "Value": [inst]},
                    **({RETRIEVE_URL: {"vr": "UR", "Value": [url]}} if url else {}),
                }
                for cls, inst, url in stored
            ],
        }
    if failed:
        body[FAILED_SOP_SEQUENCE] = {
            "vr": "SQ",
            "Value": [
                {
                    **({REFERENCED_SOP_CLASS: {"vr": "UI", "Value": [cls]}} if cls else {}),
                    **({REFERENCED_SOP_INSTANCE: {"vr": "UI", "Value": [inst]}} if inst else {}),
                    FAILURE_REASON: {"vr": "US", "Value": [reason]},
                }
                for cls, inst, reason in failed
            ],
        }
    return body
