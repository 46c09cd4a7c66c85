"""MLLP, HL7 v2's framing over TCP: <VT> message <FS><CR>. A bounded frame reader, the listener that
answers every frame on its connection, and a client that sends one frame and reads the answer.

The reader never holds more than its limit of one frame: the rest of a longer frame is read and
dropped (the frame comes back marked oversize, so it is answered, and the next one is read as usual).
A start block inside an unfinished frame ends that frame as broken and starts the next one there, so
a sender that lost its place never makes the listener lose the following message.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from dxnode.listen import bind_tcp

log = logging.getLogger("dxnode.hl7.mllp")

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"
_RECV = 65536


@dataclass(frozen=True)
class Frame:
    """One MLLP frame's content (at most the reader's limit of it)."""

    data: bytes
    oversize: bool = False  # longer than the limit: data is its first part only
    broken: bool = False  # a new start block came before this frame's end block


def frame(message: bytes) -> bytes:
    """message wrapped in MLLP's start and end blocks."""
    return SB + message + EB + CR


class FrameReader:
    """Reads MLLP frames from a connected socket; bytes outside a frame are skipped."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self.sock, self.limit = sock, limit
        self.buf = bytearray()
        self.eof = False

    def _fill(self) -> bool:
        """Read more into buf; False at end of stream (socket.timeout propagates)."""
        if self.eof:
            return False
        chunk = self.sock.recv(_RECV)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def next(self) -> Frame | None:
        """The next frame, or None when the peer closed the connection (a partial frame is dropped)."""
        while (start := self.buf.find(SB)) < 0:
            self.buf.clear()
            if not self._fill():
                return None
        del self.buf[: start + 1]
        data, oversize = bytearray(), False
        while True:
            end, restart = self.buf.find(EB), self.buf.find(SB)
            stop = min(i for i in (end, restart, len(self.buf)) if i >= 0)
            room = self.limit - len(data)
            data += self.buf[: min(stop, max(room, 0))]
            oversize = oversize or stop > room
            if stop in (end, restart):
                del self.buf[: stop + (1 if stop == end else 0)]
                if stop == end and self.buf[:1] == CR:
                    del self.buf[:1]
                return Frame(bytes(data), oversize, broken=stop == restart)
            self.buf.clear()
            if not self._fill():
                return None


Handler = Callable[[Frame, str], bytes]


class MllpListener:
    """A threaded MLLP server: each connection on its own thread, each frame answered by handler(frame, peer).

    The socket is bound by start(); at most max_connections at once (more are closed at once), a
    connection silent for idle_timeout seconds is closed. A handler error answers nothing and closes
    that connection only (the handler of dxnode.hl7.inbound answers every frame itself).
    """

    def __init__(
        self, host: str, port: int, handler: Handler, limit: int, max_connections: int, idle_timeout: float
    ) -> None:
        self.host, self.port, self.handler = host, port, handler
        self.limit, self.max_connections, self.idle_timeout = limit, max_connections, idle_timeout
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()

    def start(self) -> None:
        """Bind and listen (StartError naming "hl7" when the address cannot be bound), then accept on a thread."""
        sock = bind_tcp("hl7", self.host, self.port)
        sock.listen(16)
        sock.settimeout(0.5)  # the accept loop looks at the stop flag this often
        self._sock, self.port = sock, sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="dxnode-hl7-accept", daemon=True)
        self._thread.start()

    def failure(self) -> tuple[str, str] | None:
        """("hl7", why) when the accept thread ended while the node runs."""
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return "hl7", "the MLLP listener stopped"
        return None

    def stop(self) -> None:
        """Stop accepting, close every connection, and wait briefly for the threads."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            with self._lock:
                full = len(self._conns) >= self.max_connections
                if not full:
                    self._conns.add(conn)
            if full:
                log.warning("hl7: %s refused: already %d connections ([hl7] max_connections)", addr, len(self._conns))
                conn.close()
                continue
            peer = f"{addr[0]}:{addr[1]}"
            threading.Thread(target=self._serve, args=(conn, peer), name=f"dxnode-hl7 {peer}", daemon=True).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        """Answer every frame of one connection until the peer closes it, it idles, or the node stops."""
        conn.settimeout(self.idle_timeout)
        reader = FrameReader(conn, self.limit)
        try:
            while not self._stop.is_set() and (got := reader.next()) is not None:
                conn.sendall(frame(self.handler(got, peer)))
        except TimeoutError:
            log.info("hl7: %s idle for %g s: connection closed", peer, self.idle_timeout)
        except OSError as exc:
            log.info("hl7: %s: connection ended: %s", peer, exc.strerror or exc)
        except Exception:
            log.exception("hl7: %s: connection closed after an error", peer)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()


def exchange(host: str, port: int, message: bytes, timeout: float, limit: int = 1 << 20) -> bytes:
    """Send one message over a new MLLP connection and return the answer's content (OSError on failure)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(frame(message))
        got = FrameReader(sock, limit).next()
    if got is None:
        raise ConnectionError("the connection closed before an answer came")
    return got.data
