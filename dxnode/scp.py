"""DICOM reception: a pynetdicom SCP for C-ECHO and durable C-STORE.

Presentation contexts: the 128-context limit of PS3.8 applies to what one association *requests*;
as an acceptor the node may *support* any number, so it supports every storage SOP class
pynetdicom knows (``AllStoragePresentationContexts``) and a sender proposes the ones it needs.
For each proposed context pynetdicom accepts the first transfer syntax of *our* list that the
sender offers, so the list puts compressed syntaxes first: a sender proposes a compressed syntax
only for data already in it (Deflate included), and then never has to decompress or inflate.
Native syntaxes follow, Explicit VR Little Endian first. Nothing is transcoded on receipt.

The listener keeps the AE, TLS and the event handlers; what a C-STORE carries is parsed and checked
by dxnode.receive.parse and made durable by dxnode.receive.ingest (the path STOW-RS shares) before
0x0000 is sent. Any failure gives 0xA700 (out of resources: disk, file system, database) or 0xC000
(cannot understand: unparseable dataset or an invalid UID) and a log line, so the sender retries or
reports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pydicom import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made at import time from a table
    StorageCommitmentPushModel,
    Verification,
)

from dxnode import metrics
from dxnode.config import Settings
from dxnode.listen import StartError, bind_error
from dxnode.listen import address as host_port
from dxnode.receive import chunked, inline, reactor, responses
from dxnode.receive.ingest import Ingest
from dxnode.receive.parse import OUT_OF_RESOURCES, SUCCESS, StoreRefused
from dxnode.receive.server import AcceptShare, NoDelayServer

log = logging.getLogger("dxnode.scp")

# Order matters: pynetdicom accepts the first of these that the sender proposes (see above).
TRANSFER_SYNTAXES = [
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000,
    JPEGLSNearLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    HTJ2K,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
]

MAX_PDU = 262144  # bytes we accept per P-DATA PDU: fewer, larger PDUs for big images


# Answers a Storage Commitment N-EVENT-REPORT: (status, Event Reply or None); outbox/commitment.py's report_handler.
CommitmentReport = Callable[[Event], tuple[int, Dataset | None]]


class Service(Protocol):
    """More SOP classes on the listener (worklist/ups_events.py's UpsWatch): their abstract syntaxes, their handlers."""

    def contexts(self) -> list[str]: ...

    def handlers(self) -> list[EventHandlerType]: ...


class StorageSCP:
    """The node's DICOM listener(s): plain, and optionally DICOM TLS.

    With commitment_report, it also takes Storage Commitment reports (N-EVENT-REPORT) that a
    destination sends on an association it opens to the node, proposing the SCP role for itself."""

    def __init__(
        self,
        settings: Settings,
        ingest: Ingest,
        commitment_report: CommitmentReport | None = None,
        services: Sequence[Service] = (),
        share: AcceptShare | None = None,
    ) -> None:
        self.settings = settings
        self.ingest = ingest
        self.commitment_report = commitment_report
        self.services = services
        self._servers: list[NoDelayServer] = []
        self._threads: list[tuple[str, threading.Thread]] = []  # (part, thread serving it)
        self._stopping = False
        self.share = share  # this process's slot, with several receiving processes (receivers.py)
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = (
            node.acse_timeout,
            node.dimse_timeout,
            node.network_timeout,
        )
        ae.maximum_pdu_size = MAX_PDU
        ae.require_calling_aet = list(node.allowed_calling_aets)
        # A sender configured with the wrong called AE title is refused (A-ASSOCIATE-RJ reason 7,
        # "called AE title not recognised") instead of going unnoticed.
        ae.require_called_aet = not node.accept_any_called_ae
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:  # always set in pynetdicom's own list
                ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        if self.commitment_report is not None:
            # The reporting destination is the requestor and the Storage Commitment SCP: accept the
            # roles it proposes (SCP/SCU Role Selection), or the default ones if it proposes none.
            ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        for uid in (uid for service in self.services for uid in service.contexts()):
            ae.add_supported_context(uid)
        return ae

    def _handlers(self) -> list[EventHandlerType]:
        report = self.commitment_report
        return [
            *([(evt.EVT_N_EVENT_REPORT, report)] if report is not None else []),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_CONN_CLOSE, lambda event: self.ingest.activity.closed(id(event.assoc))),
            *(handler for service in self.services for handler in service.handlers()),
        ]

    def start(self, listening: Sequence[socket.socket] = ()) -> None:
        """Start listening (returns at once; associations run on pynetdicom's threads), on the sockets
        of listening (plain, then TLS) where given: those of the first receiving process.

        Raises StartError naming the listener ("dicom", "dicom-tls") and the cause when one cannot
        start; the listeners started before it keep running until stop().
        """
        node = self.settings.node
        tls = None
        if node.tls_port is not None:
            try:
                tls = self._tls_context()
            except (OSError, ValueError, ssl.SSLError) as exc:
                raise StartError("dicom-tls", f"cannot load the TLS certificate or key: {exc}") from None
        self.ingest.open()
        chunked.register(self.ae, self.ingest.incoming, node.max_instance_mb, self.ingest.writer)
        reactor.install()
        responses.install()
        inline.install()
        given: list[socket.socket | None] = [*listening, None, None]
        self._serve("dicom", (node.host, node.port), None, given[0])
        if node.tls_port is not None:
            self._serve("dicom-tls", (node.host, node.tls_port), tls, given[1])

    def _serve(
        self,
        part: str,
        address: tuple[str, int],
        ssl_context: ssl.SSLContext | None,
        listening: socket.socket | None = None,
    ) -> None:
        """Bind one listener (or take listening) and serve it on a daemon thread (what
        AE.start_server(block=False) does)."""
        try:
            server = self.ae.make_server(
                address,
                ssl_context=ssl_context,
                evt_handlers=self._handlers(),
                server_class=NoDelayServer,
                listening=listening,
                share=self.share,
            )
        except OSError as exc:
            raise bind_error(part, address[0], address[1], exc) from None
        assert isinstance(server, NoDelayServer)
        thread = threading.Thread(target=server.serve_forever, name=f"dxnode-scp:{address[1]}", daemon=True)
        thread.start()
        self._servers.append(server)
        self._threads.append((part, thread))

    def _tls_context(self) -> ssl.SSLContext:
        """Server TLS context from node.tls_cert/tls_key, verifying clients against tls_ca if set."""
        node = self.settings.node
        if not (node.tls_cert and node.tls_key):
            raise ValueError("node.tls_port is set but node.tls_cert and node.tls_key are not")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(node.tls_cert), str(node.tls_key))
        if node.tls_ca:
            ctx.load_verify_locations(str(node.tls_ca))
        ctx.verify_mode = (
            ssl.CERT_REQUIRED if node.tls_require_client_cert else ssl.CERT_OPTIONAL if node.tls_ca else ssl.CERT_NONE
        )
        return ctx

    def stop(self) -> None:
        """Stop listening and end open associations."""
        self._stopping = True
        self.ingest.close()
        chunked.unregister(self.ae)
        for server in self._servers:
            server.shutdown()
        self._servers.clear()

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets (plain, then TLS), for the other receiving processes."""
        return [server.socket for server in self._servers if server.socket is not None]

    @property
    def port(self) -> int:
        """The bound plain port (config port 0 means any free port)."""
        return int(self._servers[0].server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The bound TLS port, if TLS is on."""
        return int(self._servers[1].server_address[1]) if len(self._servers) > 1 else None

    @property
    def listening(self) -> bool:
        """True while the listener threads run."""
        return (
            bool(self._servers)
            and all(s.socket is not None and s.socket.fileno() != -1 for s in self._servers)
            and all(thread.is_alive() for _, thread in self._threads)
        )

    def failure(self) -> tuple[str, str] | None:
        """(part, why) of a listener that stopped serving while the node runs; None while all serve."""
        if self._stopping:
            return None
        for (part, thread), server in zip(self._threads, self._servers, strict=False):
            if not thread.is_alive():
                host, port = server.server_address[:2]
                return part, f"the listener on {host_port(str(host), int(port))} stopped"
        return None

    # --- event handlers ----------------------------------------------------------------------

    def _on_established(self, event: Event) -> None:
        where = f" in process {os.getpid()}" if self.settings.node.receive_processes > 1 else ""
        log.info("association from %s (%s)%s", event.assoc.requestor.ae_title, event.assoc.requestor.address, where)

    def _on_rejected(self, event: Event) -> None:
        calling = str(event.assoc.requestor.ae_title).strip()
        called = str(getattr(event.assoc.requestor.primitive, "called_ae_title", "") or "").strip()
        node = self.settings.node
        # pynetdicom checks the calling AE title, then the called one (its reason wins), then the association limit.
        if self.ae.require_called_aet and called != node.ae_title:
            reason, why = "called_aet", f"called AE title {called!r} not recognised (this node is {node.ae_title!r})"
        elif node.allowed_calling_aets and calling not in node.allowed_calling_aets:
            reason, why = "calling_aet", "calling AE title not allowed"
        else:
            reason, why = "max_associations", f"more than {node.max_associations} associations"
        log.warning("association from %r (%s) rejected: %s", calling, event.assoc.requestor.address, why)
        metrics.ASSOCIATIONS_REJECTED.labels(reason=reason).inc()

    def _on_store(self, event: Event) -> int | Dataset:
        """Store one instance durably, then acknowledge; failure statuses otherwise."""
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            status = self.store_instance(event, calling)
        except StoreRefused as exc:
            log.error("C-STORE from %s refused (0x%04X): %s", calling, exc.status, exc.comment)
            metrics.INSTANCES_REFUSED.labels(status=f"0x{exc.status:04X}").inc()
            reply = Dataset()
            reply.Status = exc.status
            reply.ErrorComment = exc.comment[:64]
            return reply
        except Exception as exc:  # never let a bad instance take the node down
            log.exception("C-STORE from %s failed: %s", calling, exc)
            metrics.INSTANCES_REFUSED.labels(status=f"0x{OUT_OF_RESOURCES:04X}").inc()
            return OUT_OF_RESOURCES
        return status

    def store_instance(self, event: Event, calling_aet: str) -> int:
        """Check, parse, write and record one instance; raise StoreRefused with the status to send.

        pynetdicom has written the dataset, as it arrived, to a file in incoming/ (receive/chunked.py),
        never holding it whole in memory; that file is checked (read_received reads what comes before
        Pixel Data, a Deflated one inflated in steps to a spool file), fsynced and renamed into place."""
        if not isinstance(event.request, C_STORE):  # only bound to EVT_C_STORE
            raise TypeError(f"not a C-STORE request: {type(event.request).__name__}")
        self.ingest.store_c_store(event, calling_aet, str(event.assoc.requestor.address))
        return SUCCESS


@contextlib.contextmanager
def _pynetdicom_errors() -> Any:
    """Collect pynetdicom's log lines instead of showing them (unless DEBUG logging asks for them)."""
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("pynetdicom")
    if logger.isEnabledFor(logging.DEBUG):
        yield records
        return

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler, propagate = Collect(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _connect_error(records: Sequence[logging.LogRecord]) -> str | None:
    """The socket error pynetdicom logged when it could not connect (e.g. '[Errno 111] Connection refused')."""
    for r in records:
        text = r.getMessage()
        if text.startswith("TCP Initialisation Error:"):
            return text.split(":", 1)[1].strip()
    return None


def echo(host: str, port: int, calling_aet: str, called_aet: str, timeout: float = 10) -> tuple[bool, str]:
    """C-ECHO a remote node; (success, one line saying what happened)."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    where = f"{host}:{port}"
    with _pynetdicom_errors() as records:
        try:
            assoc = ae.associate(host, port, ae_title=called_aet)
        except socket.gaierror as exc:
            return False, f"cannot resolve host {host!r}: {exc.strerror or exc}"
        if not assoc.is_established:
            if assoc.is_rejected:
                rsp = assoc.acceptor.primitive
                reason = str(getattr(rsp, "reason_str", "") or "no reason given")
                return (
                    False,
                    f"association rejected by {where} (called AE {called_aet}): {reason[:1].lower()}{reason[1:]}",
                )
            error = _connect_error(records)
            if error is not None:
                if "refused" in error.lower():
                    return False, f"connection refused by {where}"
                if "timed out" in error.lower():
                    return False, f"no answer from {where} within {timeout:g} s"
                return False, f"cannot connect to {where}: {error}"
            if assoc.is_aborted:
                return False, f"association with {where} aborted (called AE {called_aet})"
            return False, f"no answer from {where} within {timeout:g} s"
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
    code = getattr(status, "Status", None)
    if code == SUCCESS:
        return True, f"C-ECHO {called_aet}@{where}: success"
    return False, f"C-ECHO {called_aet}@{where}: " + ("no response" if code is None else f"status 0x{code:04X}")
