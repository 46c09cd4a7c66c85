"""HL7 and FHIR peers for the tests: a real HL7 receiver (the `hl7` library's asyncio MLLP server on a
thread) and a FHIR endpoint stand-in (http.server), each recording what it was sent."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hl7
import hl7.mllp


class Hl7Receiver:
    """An HL7 system on a free port: the hl7 library's MLLP server; answers each message with the next code."""

    def __init__(self, codes: list[str]) -> None:
        self.codes, self.messages = codes, list[hl7.Message]()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(hl7.mllp.start_hl7_server(self._client, "127.0.0.1", 0))
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)

    async def _client(self, reader: Any, writer: Any) -> None:
        try:
            while True:
                message = await reader.readmessage()
                self.messages.append(message)
                code = self.codes[min(len(self.messages), len(self.codes)) - 1]
                writer.writemessage(message.create_ack(code))
                await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class FhirServer:
    """A FHIR endpoint stand-in: records each POSTed body and answers with the next status."""

    def __init__(self, statuses: list[int]) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.bodies.append(json.loads(body))
                outer.headers.append(dict(self.headers))
                status = statuses[min(len(outer.bodies), len(statuses)) - 1]
                reply = json.dumps({"resourceType": "Bundle", "type": "transaction-response"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
