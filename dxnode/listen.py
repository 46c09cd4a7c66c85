"""The node's listen addresses: bind them with a clear error, and check them all before a slow start.

A node starts every part it is configured to run or exits (status 2) with one line naming the part
and the cause, e.g. ``web: 127.0.0.1:8080 is in use (another dxnode?)``: ``dxnode serve`` checks
every address here before it opens the database or loads the model.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterable

# Exit status of `dxnode serve` / `dxnode worker` when a part cannot start (the same as a config error).
EXIT_START = 2
# Exit status when a part that was running dies (systemd's Restart=on-failure starts the node again).
EXIT_PART_DIED = 1
WILDCARD = ("", "0.0.0.0", "::")


class StartError(Exception):
    """A part of the node cannot start or stopped running; str() is the one line for the admin."""

    def __init__(self, part: str, cause: str) -> None:
        super().__init__(f"{part}: {cause}")
        self.part, self.cause = part, cause


def address(host: str, port: int) -> str:
    """host:port as an admin writes it ([::1]:8080 for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_error(part: str, host: str, port: int, exc: OSError) -> StartError:
    """The bind failure of one part's address in words, with its likely cause."""
    where = address(host, port)
    if isinstance(exc, socket.gaierror):
        return StartError(part, f"{where}: cannot resolve host {host!r} ({exc.strerror})")
    if exc.errno == errno.EADDRINUSE:
        return StartError(part, f"{where} is in use (another dxnode?)")
    if exc.errno == errno.EACCES:
        hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)" if 0 < port < 1024 else ""
        return StartError(part, f"{where}: permission denied{hint}")
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartError(part, f"{where}: cannot assign this address (not an address of this host?)")
    return StartError(part, f"{where}: {exc.strerror or exc}")


def bind_tcp(part: str, host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEADDR, as pynetdicom and uvicorn bind (not yet listening)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise bind_error(part, host, port, exc) from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise bind_error(part, host, port, exc) from None
    return sock


def _same_port(a: tuple[str, int], b: tuple[str, int]) -> bool:
    return a[1] == b[1] and (a[0] == b[0] or a[0] in WILDCARD or b[0] in WILDCARD)


def check_addresses(parts: Iterable[tuple[str, str, int]]) -> None:
    """Bind every (part, host, port) at once, then let go; raise StartError for the first that fails.

    Port 0 (any free port) always binds. Two parts on one port are named as such, not as "in use".
    """
    held: list[socket.socket] = []
    seen: list[tuple[str, tuple[str, int]]] = []
    try:
        for part, host, port in parts:
            if port == 0:
                continue
            for other, where in seen:
                if _same_port(where, (host, port)):
                    raise StartError(part, f"{address(host, port)} is also the address of {other}")
            held.append(bind_tcp(part, host, port))
            seen.append((part, (host, port)))
    finally:
        for sock in held:
            with contextlib.suppress(OSError):
                sock.close()
