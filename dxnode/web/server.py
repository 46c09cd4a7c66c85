"""uvicorn on a background thread, so `dxnode serve` runs the web stage beside the SCP."""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI


class WebServer:
    """Serve an ASGI app on host:port (0: any free port) until stop().

    uvicorn installs signal handlers only on the main thread, so on this thread the daemon keeps them.
    """

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.host = host
        self.port = port
        self._thread = threading.Thread(target=self.server.run, name="dxnode-web", daemon=True)

    def start(self, timeout: float = 30) -> None:
        """Start and wait until the socket listens."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"web server did not start on {self.host}:{self.port}")
            time.sleep(0.05)
        sockets = [s for server in self.server.servers for s in server.sockets]
        if sockets:
            self.port = int(sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)
