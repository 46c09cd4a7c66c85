"""Several receiving processes on one port, committing through one commit process
([node] receive_processes; dxnode/receivers.py, dxnode/receive/committer.py)."""

from __future__ import annotations

import collections
import hashlib
import multiprocessing
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import free_port, need_tool
from nodeproc import Node, make_study, node_config, storescu, wait_until
from pydicom import Dataset
from pydicom.uid import UID, generate_uid
from pynetdicom import AE, build_role
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from sqlalchemy import select
from test_tls import client_context, echo, pki  # noqa: F401  (pki is a fixture)

from dxnode.outbox.commitment import PUSH_MODEL_INSTANCE
from dxnode.receive.activity import Activity
from dxnode.receive.committer import Inbox, Request
from dxnode.receive.parse import Received
from dxnode.receive.rows import Arrival
from dxnode.receive.server import AcceptShare, NoDelayServer
from dxnode.receivers import ForwardedActivity, apply
from dxnode.states import DeliveryState, OutputKind
from dxnode.store import Delivery, Output, Store, Study, utcnow

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    need_tool("storescu")
    n = Node(node_config(tmp_path, node={"receive_processes": 2}, worklist={"run_jobs": False}))
    yield n
    n.stop()


def rows(tmp_path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(tmp_path / "var" / "dxnode.db") as db:
        return db.execute("SELECT sop_instance_uid, file_path, sha256 FROM instance").fetchall()


def test_both_processes_receive_and_every_instance_is_committed_once(node: Node, tmp_path: Path) -> None:
    assert node.wait_for(r"listening on .*, 2 receiving processes")
    pids = {int(m) for m in re.findall(r"receiving process (\d+) ready", "\n".join(node.lines))}
    assert len(pids) == 1 and node.proc.pid not in pids
    studies = [make_study(tmp_path / f"s{k}", n=3) for k in range(12)]
    senders = [threading.Thread(target=storescu, args=(node.port, files)) for _, files in studies]
    for t in senders:
        t.start()
    for t in senders:
        t.join(120)
    stored = rows(tmp_path)
    assert len(stored) == 36 and len({uid for uid, _, _ in stored}) == 36
    for _, path, sha256 in stored:  # each file in place, whole, with the digest its row says
        assert hashlib.sha256((tmp_path / "var" / path).read_bytes()).hexdigest() == sha256
    served = set(_associations_per_process(node.lines))
    assert served == {node.proc.pid, *pids}, f"associations served by {served}"
    storescu(node.port, studies[0][1])  # sent again: counted as duplicates, not stored twice
    assert len(rows(tmp_path)) == 36


def test_nonconforming_values_and_hostile_instances_cost_one_log_line_in_every_process(
    node: Node, tmp_path: Path
) -> None:
    """A value pydicom finds nonconforming is stored without a log line quoting it (a study date is
    patient data), and a refused instance is one ERROR line, in serve and in the receiving process."""
    sends = []
    for k in range(6):  # six associations one after another: they alternate between the processes
        _, files = make_study(tmp_path / f"odd{k}", n=1)
        ds = pydicom.dcmread(files[0])
        ds.StudyDate = "Jane^Doe"  # not a DA
        ds.save_as(files[0], enforce_file_format=True)
        hostile = pydicom.dcmread(files[0])
        hostile.SOPInstanceUID = hostile.file_meta.MediaStorageSOPInstanceUID = UID("../../escape")
        hostile.save_as(tmp_path / f"odd{k}" / "hostile.dcm", enforce_file_format=True)
        sends.append([files[0], tmp_path / f"odd{k}" / "hostile.dcm"])
    for files in sends:
        out = subprocess.run(
            ["storescu", "-aec", "DXNODE", "127.0.0.1", str(node.port), *map(str, files)],
            capture_output=True,
            text=True,
        )
        assert out.returncode != 0  # the hostile one refused
    assert len(rows(tmp_path)) == 6
    refusal = "refused (0xC000): invalid SOPInstanceUID"
    wait_until(lambda: sum(refusal in line for line in node.lines) == 6, 30, "six refusals logged")
    lines = list(node.lines)
    served = _associations_per_process(lines)
    assert sorted(served.values()) == [3, 3], f"associations served by {served}"
    assert not [line for line in lines if "Jane" in line or "escape" in line or "Warning" in line], "\n".join(lines)


def test_commitment_reports_on_either_receiving_process_commit_their_rows(tmp_path: Path) -> None:
    """A PACS's Storage Commitment reports on associations it opens to the node, recorded by whichever
    receiving process takes each (the listener is the same in every process: receivers.build_listener)."""
    destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port(), "commitment": True}
    node = Node(
        node_config(tmp_path, node={"receive_processes": 2}, worklist={"run_jobs": False}, destinations=[destination])
    )
    store = Store(f"sqlite:///{tmp_path / 'var' / 'dxnode.db'}")
    try:
        sent: list[tuple[str, str]] = []  # (transaction, SOP Instance UID) of each delivery awaiting its report
        with store.session() as s:
            study = Study(study_instance_uid=generate_uid(), patient_id="P-COMMIT")
            s.add(study)
            s.flush()
            for k in range(12):  # one after another, they alternate between the two processes
                out = Output(
                    study_id=study.id,
                    kind=OutputKind.SR,
                    sop_class_uid=COMPREHENSIVE_SR,
                    sop_instance_uid=generate_uid(),
                    series_instance_uid=generate_uid(),
                    file_path=f"outputs/sr{k}.dcm",
                )
                s.add(out)
                s.flush()
                sent.append((generate_uid(), out.sop_instance_uid))
                s.add(
                    Delivery(
                        output_id=out.id,
                        destination="pacs",
                        state=DeliveryState.SENT,
                        sent_at=utcnow(),
                        commitment_uid=sent[-1][0],
                        commitment_requested_at=utcnow(),
                    )
                )
        ae = AE("PACS")
        ae.add_requested_context(StorageCommitmentPushModel)
        for transaction, uid in sent:  # one association each
            report, item = Dataset(), Dataset()
            report.TransactionUID = transaction
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = COMPREHENSIVE_SR, uid
            report.ReferencedSOPSequence = [item]
            role = build_role(StorageCommitmentPushModel, scp_role=True)  # the PACS reports as the SCP
            assoc = ae.associate("127.0.0.1", node.port, ae_title="DXNODE", ext_neg=[role])
            assert assoc.is_established
            status, _ = assoc.send_n_event_report(report, 1, StorageCommitmentPushModel, PUSH_MODEL_INSTANCE)
            assoc.release()
            assert status.Status == 0x0000
        with store.session() as s:
            assert [d.state for d in s.scalars(select(Delivery))] == [DeliveryState.COMMITTED] * 12
        served = _associations_per_process(node.lines, "PACS")
        assert sorted(served.values()) == [6, 6], f"reports taken by {served}"
    finally:
        store.dispose()
        node.stop()


def test_the_tls_port_is_shared_too(tmp_path: Path, pki: Path) -> None:  # noqa: F811
    tls = {"tls_port": 0, "tls_cert": str(pki / "server.crt"), "tls_key": str(pki / "server.key")}
    tls |= {"tls_ca": str(pki / "ca.crt"), "tls_require_client_cert": True}
    node = Node(node_config(tmp_path, node={"receive_processes": 2, **tls}, worklist={"run_jobs": False}))
    try:
        port = int(node.wait_for(r"\(TLS on (\d+)\)").group(1))
        child = int(node.wait_for(r"receiving process (\d+) ready").group(1))
        for _ in range(12):
            assert echo(port, client_context(pki, with_cert=True))
        assert not echo(port, client_context(pki, with_cert=False))
        served = set(_associations_per_process(node.lines))
        assert served == {node.proc.pid, child}, f"associations served by {served}"
    finally:
        node.stop()


def test_a_receiving_process_that_dies_stops_the_node_naming_it(node: Node) -> None:
    child = int(node.wait_for(r"receiving process (\d+) ready").group(1))
    os.kill(child, signal.SIGKILL)
    assert node.proc.wait(30) == 1
    assert any(re.search(rf"receive: receiving process {child} exited", line) for line in node.lines), node.lines[-5:]


def test_the_commit_process_dying_stops_the_node_naming_it(node: Node, tmp_path: Path) -> None:
    commit = int(node.wait_for(r"commit process (\d+) ready").group(1))
    os.kill(commit, signal.SIGKILL)
    assert node.proc.wait(30) == 1
    assert any("receive: the commit process exited" in line for line in node.lines), node.lines[-5:]


def test_activity_events_of_a_receiving_process_reach_serves_activity_in_batches() -> None:
    ours, theirs = multiprocessing.Pipe()
    sent, seen = ForwardedActivity(theirs), Activity()
    sent.begin(7, "1.2.3")
    apply(seen, ours.recv())
    assert seen.busy_studies() == {"1.2.3"}
    sent.end("1.2.3")
    apply(seen, ours.recv())
    assert seen.busy_studies() == {"1.2.3"}  # its association is still open
    sent.closed(7)
    apply(seen, ours.recv())
    assert seen.busy_studies() == set() and "1.2.3" in seen.released_at()
    # events close together go as one message (FLUSH_S), in their order
    for k in range(50):
        sent.begin(8, f"2.{k}")
        sent.end(f"2.{k}")
    sent.closed(8)
    messages = 0
    while "2.49" not in seen.released_at():
        apply(seen, ours.recv())
        messages += 1
    assert messages < 10 and seen.busy_studies() == set()
    # close() sends what has gathered, without waiting FLUSH_S
    sent.begin(9, "3.1")
    sent.close()
    assert ours.poll(0)
    apply(seen, ours.recv())
    assert seen.busy_studies() == {"3.1"}


_SERVED = re.compile(r"association from (\S+) \([^)]*\) in process (\d+)")  # serve's INFO line per association


def _associations_per_process(lines: Iterable[str], title: str | None = None) -> collections.Counter[int]:
    """How many associations (from the calling AE title, or any) each process logged."""
    return collections.Counter(
        int(m[2]) for line in list(lines) if (m := _SERVED.search(line)) and title in (None, m[1])
    )


def _served_by(node: Node, titles: list[str]) -> dict[str, int]:
    """The process each calling AE title's association was established in (serve's INFO lines)."""

    def seen() -> dict[str, int] | None:
        where = {m[1]: int(m[2]) for line in list(node.lines) if (m := _SERVED.search(line))}
        return where if all(t in where for t in titles) else None

    return wait_until(seen, 30, f"associations of {titles}")


def test_a_new_association_goes_to_the_receiving_process_with_fewest_open(node: Node) -> None:
    """Least connections: both processes wait on the socket, the busier one lets the other accept."""
    assert node.wait_for(r"listening on .*, 2 receiving processes")
    ae = AE(ae_title="PROBE")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = {}
    for k in range(6):  # one at a time: each process idle, so only the counts decide
        ae.ae_title = f"FIRST{k}"
        held[f"FIRST{k}"] = ae.associate("127.0.0.1", node.port, ae_title="DXNODE")
        assert held[f"FIRST{k}"].is_established
    where = _served_by(node, list(held))
    assert sorted(collections.Counter(where.values()).values()) == [3, 3], where
    emptied = where["FIRST0"]
    released = [title for title in held if where[title] == emptied]
    ports = {held[title].dul.socket.socket.getsockname()[1] for title in released}  # type: ignore[union-attr]
    for title in released:
        held[title].release()
    # The node counts a close on the thread that closes its end, in the same pass of its loop.
    wait_until(
        lambda: not _server_ends_open(node.port, ports), 30, "the node's ends of the released associations closed"
    )
    for k in range(3):  # that process now has none open and the other three: each goes to it
        ae.ae_title = f"AGAIN{k}"
        held[f"AGAIN{k}"] = ae.associate("127.0.0.1", node.port, ae_title="DXNODE")
        assert held[f"AGAIN{k}"].is_established
    again = _served_by(node, [f"AGAIN{k}" for k in range(3)])
    assert {again[f"AGAIN{k}"] for k in range(3)} == {emptied}, again
    for assoc in held.values():
        if assoc.is_established:
            assoc.release()


def _server_ends_open(port: int, clients: set[int]) -> bool:
    """True while the node (local port) still holds open a TCP connection from one of the client ports:
    established, or closed by the client and not yet by the node (CLOSE_WAIT), in /proc/net/tcp."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) in clients and state in ("01", "08"):
            return True
    return False


def test_connections_that_never_associate_leave_the_balance_even(node: Node) -> None:
    """A port scan, a health check, garbage bytes: each connection counted and uncounted, so associations
    opened afterwards still split evenly."""
    assert node.wait_for(r"listening on .*, 2 receiving processes")
    for payload in (b"", b"GET / HTTP/1.0\r\n\r\n", b"\x01\x00" + bytes(64)):  # nothing, HTTP, a cut A-ASSOCIATE-RQ
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", node.port)) as probe:
                probe.sendall(payload)
                probe.shutdown(socket.SHUT_WR)
                probe.settimeout(30)
                while probe.recv(4096):  # the node answers (A-ABORT) or just closes
                    pass
    ae = AE(ae_title="PROBE")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = {}
    for k in range(6):
        ae.ae_title = f"AFTER{k}"
        held[f"AFTER{k}"] = ae.associate("127.0.0.1", node.port, ae_title="DXNODE")
        assert held[f"AFTER{k}"].is_established
    where = _served_by(node, list(held))
    assert sorted(collections.Counter(where.values()).values()) == [3, 3], where
    for assoc in held.values():
        assoc.release()


def test_a_close_the_count_missed_is_corrected_when_the_server_is_idle() -> None:
    """The recount, between connections: the slot is set back to the associations that run."""
    share = AcceptShare.create(multiprocessing.get_context("spawn"), 2)
    ae = AE(ae_title="DXNODE")
    ae.add_supported_context("1.2.840.10008.1.1")
    server = ae.make_server(("127.0.0.1", 0), server_class=NoDelayServer, share=share)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        peer = AE(ae_title="PROBE")
        peer.add_requested_context("1.2.840.10008.1.1")
        assocs = [peer.associate("127.0.0.1", server.server_address[1], ae_title="DXNODE") for _ in range(2)]
        assert all(a.is_established for a in assocs)
        assert share.counts[0] == 2 and share.busier()  # slot 1, another process, has none
        share.counts[0] = 7  # as if two closes had gone unreported
        wait_until(lambda: share.counts[0] == 2, 5, "the recount")
        for a in assocs:
            a.release()
        wait_until(lambda: share.counts[0] == 0, 5, "both closes counted")
    finally:
        server.shutdown()


def test_a_connection_whose_thread_cannot_start_leaves_the_count_and_the_recount_working(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No thread left for a connection: socketserver closes it, its count is taken back, and the idle
    recount (which waits while a connection is starting) still runs afterwards."""
    share = AcceptShare.create(multiprocessing.get_context("spawn"), 2)
    ae = AE(ae_title="DXNODE")
    ae.add_supported_context("1.2.840.10008.1.1")
    server = ae.make_server(("127.0.0.1", 0), server_class=NoDelayServer, share=share)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    start = threading.Thread.start

    def no_thread_for_requests(thread: threading.Thread) -> None:
        if getattr(thread, "_target", None) == server.process_request_thread:
            raise RuntimeError("can't start new thread")  # as threading says when none are left
        start(thread)

    try:
        monkeypatch.setattr(threading.Thread, "start", no_thread_for_requests)
        with socket.create_connection(server.server_address) as probe:
            probe.settimeout(10)
            assert probe.recv(1) == b""  # closed by the node
        monkeypatch.undo()
        assert share.counts[0] == 0
        peer = AE(ae_title="PROBE")
        peer.add_requested_context("1.2.840.10008.1.1")
        assoc = peer.associate("127.0.0.1", server.server_address[1], ae_title="DXNODE")
        assert assoc.is_established and share.counts[0] == 1
        share.counts[0] = 5
        wait_until(lambda: share.counts[0] == 1, 5, "the recount")
        assoc.release()
    finally:
        monkeypatch.undo()
        server.shutdown()


def test_the_commit_process_reads_requests_whole_however_they_arrive() -> None:
    """Several requests in one read, one longer than a read, and the end of the connection."""
    ours, theirs = multiprocessing.Pipe()
    inbox = Inbox(ours)
    rec = Received(
        "1.2.840.10008.5.1.4.1.1.2", "1.2.3.1", "1.2.3.100", "1.2.3.200", "1.2.840.10008.1.2.1",
        "P1", "Doe^Jane", "A1", "20200101", "CT HEAD", "CT", "HEAD", 1, "axial", 1,
    )  # fmt: skip
    small = [
        Request(k, Arrival(Path("t"), Path("p"), rec, Path("r"), 1, "", "AE", "addr", None), k, True) for k in range(3)
    ]
    for request in small:
        theirs.send(request)
    assert inbox.read() == small
    big = Request(9, Arrival(Path("t"), Path("p"), rec, Path("r"), 1, "", "AE", "addr", "x" * 200_000), 9, False)
    theirs.send(big)
    got: list[Request] = []
    reads = 0
    while not got:
        got, reads = inbox.read(), reads + 1
    assert got == [big] and reads > 1
    theirs.close()
    with pytest.raises(EOFError):
        inbox.read()
