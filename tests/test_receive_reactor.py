"""pynetdicom's reactors in serve wait for work instead of polling, and a release waits for a report
being handled (dxnode/receive/reactor.py).

Counted, not timed where it can be: each wake-up of a thread is a voluntary context switch in
/proc, so associations that wait show as few switches a second, where pynetdicom's 1 ms polls of
the socket and of the association's queues make a thousand per thread. A response that waited
for the reader's timeout instead of its wake-up would make each C-ECHO take about WAIT_S.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nodeproc import Node, node_config
from pydicom import Dataset
from pynetdicom import AE, evt, transport
from pynetdicom.sop_class import (
    StorageCommitmentPushModel,  # type: ignore[attr-defined]
    Verification,  # type: ignore[attr-defined]
)
from test_commitment import CommitPeer

from dxnode.outbox import commitment
from dxnode.receive import reactor


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Node]:
    node = Node(node_config(tmp_path))
    yield node
    node.stop()


def switches(pid: int) -> int:
    """Voluntary context switches of every thread of pid so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        total += int(status.split("voluntary_ctxt_switches:")[1].split()[0])
    return total


def test_idle_associations_wake_serve_rarely_and_answers_are_not_delayed(serve: Node) -> None:
    ae = AE(ae_title="IDLE")
    ae.add_requested_context(Verification)
    assocs = [ae.associate("127.0.0.1", serve.port, ae_title="DXNODE") for _ in range(4)]
    try:
        assert all(a.is_established for a in assocs)
        time.sleep(0.5)  # the accept and negotiation settle
        rates = []
        for _ in range(2):  # the quieter of two seconds: another process's burst can delay serve's threads
            before, start = switches(serve.proc.pid), time.monotonic()
            time.sleep(1)
            rates.append((switches(serve.proc.pid) - before) / (time.monotonic() - start))
        # 8 pynetdicom threads polling every 1 ms: 8,000 a second; waiting up to WAIT_S each: 800 at most.
        assert min(rates) < 2000, f"{min(rates):.0f} wake-ups a second in serve with 4 idle associations"
        # A response that waited for the reader's timeout would take about WAIT_S; each takes ~3 ms.
        batches = []
        for _ in range(3):
            start = time.monotonic()
            for _ in range(30):
                assert assocs[0].send_c_echo().Status == 0x0000
            batches.append(time.monotonic() - start)
        assert min(batches) < 0.6 * 30 * reactor.WAIT_S, f"30 C-ECHOs took {min(batches):.2f} s at best"
    finally:
        for a in assocs:
            a.release()


def pdu_socket() -> tuple[transport.AssociationSocket, socket.socket]:
    """An AssociationSocket reading one end of a socket pair, and the other end to write to."""
    ours, theirs = socket.socketpair()
    sock = transport.AssociationSocket.__new__(transport.AssociationSocket)
    sock.socket = ours
    return sock, theirs


def test_recv_gathers_a_pdu_sent_in_pieces_and_returns_short_at_end_of_stream() -> None:
    sock, peer = pdu_socket()
    payload = os.urandom(300_000)

    def send() -> None:
        for i in range(0, len(payload), 70_001):
            peer.sendall(payload[i : i + 70_001])
            time.sleep(0.01)
        peer.sendall(b"tail")
        peer.shutdown(socket.SHUT_WR)

    writer = threading.Thread(target=send)
    writer.start()
    try:
        got = reactor._recv(sock, len(payload))
        assert isinstance(got, bytearray) and bytes(got) == payload
        assert bytes(reactor._recv(sock, 10)) == b"tail"  # the peer closed after 4 of 10 bytes
    finally:
        writer.join()
        peer.close()
        if sock.socket is not None:
            sock.socket.close()


def test_release_waits_for_a_report_being_handled_on_the_association() -> None:
    """pynetdicom serves an N-EVENT-REPORT on a thread of its own that clears the reactor's pause
    flag as it ends; a release() begun meanwhile could wait for ever. reactor.release waits for it."""
    reactor.install()
    peer = CommitPeer()
    handling, go, order = threading.Event(), threading.Event(), []

    def on_report(event: Any) -> tuple[int, None]:
        handling.set()
        go.wait(10)
        order.append("report handled")
        return 0x0000, None

    ae = AE("DXNODE")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", peer.port, ae_title="PACS", evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4"
        action = Dataset()
        action.TransactionUID, action.ReferencedSOPSequence = "1.2.3.5", [ref]
        status, _ = assoc.send_n_action(action, 1, StorageCommitmentPushModel, commitment.PUSH_MODEL_INSTANCE)
        assert status.Status == 0x0000 and handling.wait(10)
        releasing = threading.Thread(target=lambda: (reactor.release(assoc, 10), order.append("released")))
        releasing.start()
        releasing.join(0.3)
        assert order == []  # the report is still being handled: no release yet
        go.set()
        releasing.join(15)
        assert order == ["report handled", "released"] and assoc.is_released
    finally:
        go.set()
        if assoc.is_established:
            assoc.abort()
        peer.stop()
