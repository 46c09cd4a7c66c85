"""uvicorn on a background thread, so `dxnode serve` runs the web stage beside the SCP."""

from __future__ import annotations

import contextlib
import threading
import time

import uvicorn
from fastapi import FastAPI

from dxnode.listen import StartError, address, bind_tcp


class WebServer:
    """Serve an ASGI app on host:port (0: any free port) until stop().

    The socket is bound here, before uvicorn runs, so a taken or forbidden address raises
    StartError naming it (uvicorn itself would log and exit its thread). uvicorn installs signal
    handlers only on the main thread, so on this thread the daemon keeps them.
    """

    def __init__(self, app: FastAPI, host: str, port: int, part: str = "web") -> None:
        # proxy_headers off: uvicorn would believe X-Forwarded-For from 127.0.0.1; the app trusts only
        # [web] trusted_proxies (dxnode.web.app.trust_proxies).
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off", proxy_headers=False
        )
        self.server = uvicorn.Server(config)
        self.host, self.port, self.part = host, port, part
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self, timeout: float = 30) -> None:
        """Bind, start and wait until the socket listens; StartError if it cannot."""
        sock = bind_tcp(self.part, self.host, self.port)
        self.port = int(sock.getsockname()[1])
        self._thread = threading.Thread(target=self.server.run, args=([sock],), name="dxnode-web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                with contextlib.suppress(OSError):
                    sock.close()
                raise StartError(self.part, f"the web server did not start on {address(self.host, self.port)}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/"

    def failure(self) -> str | None:
        """Why the server is no longer serving (None while it serves, or once stop() was called)."""
        if self._stopping or self._thread is None or self._thread.is_alive():
            return None
        return f"the web server on {address(self.host, self.port)} stopped"

    def stop(self) -> None:
        self._stopping = True
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
