"""pynetdicom's reactors in serve wait for work instead of polling, and its pause flag is cleared
only by the reactor (dxnode/receive/reactor.py).

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

import pytest
from nodeproc import Node, node_config
from pynetdicom import AE, transport
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

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


def test_only_the_reactor_thread_clears_the_pause_flag_that_release_and_send_wait_for() -> None:
    """pynetdicom serves an N-EVENT-REPORT on a thread of its own that clears _is_paused when its
    handler ends; were that to land while the reactor waits paused, release() would wait forever."""
    reactor.install()
    assoc = Association(AE(), "requestor")

    def on_other_thread(value: bool) -> None:
        other = threading.Thread(target=setattr, args=(assoc, "_is_paused", value))
        other.start()
        other.join()

    on_other_thread(True)  # kill(), or a report's thread as its handler starts: allowed
    assert assoc._is_paused
    on_other_thread(False)  # a report's thread as its handler ends: dropped
    assert assoc._is_paused
    assoc._target = lambda: setattr(assoc, "_is_paused", False)  # type: ignore[attr-defined]  # as its reactor
    assoc.start()
    assoc.join()
    assert not assoc._is_paused
