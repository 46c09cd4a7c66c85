"""pynetdicom's threaded association server as serve runs it: Nagle off, a cheap copy of the
supported contexts per association, and a listening socket several receiving processes can share."""

from __future__ import annotations

import contextlib
import copy
import socket
import socketserver
from typing import Any

from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer


class NoDelayServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with Nagle's algorithm off on each accepted socket, and its
    supported contexts copied cheaply for each association.

    pynetdicom leaves Nagle on; a small C-STORE response then can wait for a delayed ACK.
    """

    def __init__(self, *args: Any, listening: socket.socket | None = None, **kwargs: Any) -> None:
        self._listening = listening  # a listening socket another receiving process bound (receivers.py)
        super().__init__(*args, **kwargs)
        self.contexts = _Contexts(self.contexts)

    def server_bind(self) -> None:
        if self._listening is None:
            super().server_bind()
        else:
            if self.socket is not None:
                self.socket.close()
            self.socket = self._listening
            self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Listen, without blocking in accept: several receiving processes may share the socket, and
        the one that loses the race for a connection must go back to its loop, not wait in accept."""
        if self._listening is None:
            super().server_activate()
        if self.socket is not None:
            self.socket.setblocking(False)

    def server_close(self) -> None:
        """Close the socket; a shared one (listening) without shutdown, which would end it for every process."""
        if self._listening is None:
            super().server_close()
        elif self.socket is not None:
            self.socket.close()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = super().get_request()
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def shutdown(self) -> None:
        """Stop serving and close the socket. (pynetdicom's shutdown also removes the server from the
        AE's private list of servers that AE.start_server made, where a server from make_server is not.)"""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class _Contexts(list[PresentationContext]):
    """A server's supported presentation contexts. pynetdicom deep-copies them for every association
    it accepts, which for the ~160 storage contexts of 16 transfer syntaxes took most of the 30-50 ms
    an association took to set up; copied here one level down, sharing the UIDs (immutable strings)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return [_copy_context(cx) for cx in self]


def _copy_context(cx: PresentationContext) -> PresentationContext:
    """cx copied with its own lists; any attribute not a list or immutable is deep-copied."""
    new = copy.copy(cx)
    for name, value in vars(cx).items():
        if isinstance(value, list):
            setattr(new, name, list(value))
        elif not isinstance(value, str | int | float | None):
            setattr(new, name, copy.deepcopy(value))
    return new
