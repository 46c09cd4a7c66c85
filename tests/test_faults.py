"""Faults with real processes: job processes killed mid-job, a poison study, SIGTERM during a job,
a receive-only node with two `dxnode worker` on PostgreSQL, 16 concurrent senders, a node killed
while its outbox sends, and a node SIGKILLed at random points.

Peers: DCMTK storescu/storescp; every `dxnode` here is a real subprocess (tests/nodeproc.py).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import free_port, need_tool
from nodeproc import Node, StoreSCP, make_study, node_config, storescu, wait_until
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select
from test_e2e import SR_STORAGE

from dxnode.store import Audit, Delivery, Instance, InstanceResult, Job, Output, Store, Study

pytestmark = pytest.mark.slow


def sqlite_url(tmp: Path) -> str:
    return f"sqlite:///{tmp / 'var' / 'dxnode.db'}"


def pacs_destination(pacs: StoreSCP) -> list[dict[str, Any]]:
    return [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}]


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    """A DCMTK storescp PACS keeping every received copy (+uf: a re-send is a second file)."""
    need_tool("storescp", "storescu")
    scp = StoreSCP(tmp_path / "pacs", free_port(), args=("+uf",))
    yield scp
    scp.stop()


def srs_by_study(pacs: StoreSCP) -> dict[str, set[str]]:
    """SR SOP Instance UIDs received by the PACS, per study."""
    found: dict[str, set[str]] = {}
    for ds in pacs.datasets():
        if ds.SOPClassUID in SR_STORAGE:
            found.setdefault(ds.StudyInstanceUID, set()).add(ds.SOPInstanceUID)
    return found


def jobs_by_study(store: Store) -> dict[str, list[Job]]:
    with store.session() as s:
        rows = s.execute(select(Study.study_instance_uid, Job).join(Job, Job.study_id == Study.id).order_by(Job.id))
        out: dict[str, list[Job]] = {}
        for uid, job in rows:
            out.setdefault(uid, []).append(job)
        return out


def all_done(store: Store, studies: list[str]) -> bool:
    jobs = jobs_by_study(store)
    return all(jobs.get(uid) and jobs[uid][-1].state == "done" for uid in studies)


def pid_of(worker: str) -> int:
    """The pid in a worker id (host:pid/start); 0 for none."""
    return int(worker.rpartition(":")[2].partition("/")[0] or 0)


def send(port: int, files: list[Path], statuses: dict[str, int], aet: str = "MODALITY") -> None:
    """One association sending the files; records each C-STORE status (-1: no answer)."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(MRImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title="DXNODE")
    if not assoc.is_established:
        return
    try:
        for path in files:
            ds = pydicom.dcmread(path)
            try:
                status = assoc.send_c_store(ds)
            except Exception:
                statuses[ds.SOPInstanceUID] = -1
                break
            statuses[ds.SOPInstanceUID] = int(status.Status) if "Status" in status else -1
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()


def test_job_process_killed_mid_job_reception_continues_and_one_sr(tmp_path: Path, pacs: StoreSCP) -> None:
    cfg = node_config(tmp_path, destinations=pacs_destination(pacs), worklist={"retry_backoff_seconds": 0.5})
    node = Node(cfg, "--no-web")
    store = Store(sqlite_url(tmp_path))
    try:
        study_a, files_a = make_study(tmp_path / "a", n=40)
        study_b, files_b = make_study(tmp_path / "b", n=40)
        storescu(node.port, files_a)
        job = wait_until(
            lambda: next((j for j in jobs_by_study(store).get(study_a, []) if j.state == "running"), None),
            timeout=120,
            what="study A's job running",
        )
        statuses: dict[str, int] = {}
        sender = threading.Thread(target=send, args=(node.port, files_b, statuses))
        sender.start()
        os.kill(pid_of(job.worker), signal.SIGKILL)
        sender.join(120)
        # Reception never noticed: every C-STORE of study B succeeded while the job process died.
        assert len(statuses) == 40 and set(statuses.values()) == {0}
        wait_until(lambda: all_done(store, [study_a, study_b]), timeout=180, what="both studies done")
        srs = wait_until(
            lambda: found if len(found := srs_by_study(pacs)) == 2 else None, timeout=60, what="SRs at the PACS"
        )
        assert {uid: len(s) for uid, s in srs.items()} == {study_a: 1, study_b: 1}
        (a,) = jobs_by_study(store)[study_a]
        assert a.attempts == 2 and a.lost == 1 and node.proc.poll() is None
        assert len(node.job_pids()) == 2  # the supervisor started a new job process
    finally:
        node.stop()
        store.dispose()


def big_rle_instance(path: Path, study_uid: str, side: int = 8192) -> None:
    """A valid RLE Lossless CT instance of side x side 16-bit zeros: a 2-4 MB file that decodes to
    side^2 * 2 bytes (128 MB at 8192, under any declared-size limit) and much more while processed."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    full, rest = divmod(side, 128)
    row = bytes([0x81, 0]) * full + (bytes([257 - rest, 0]) if rest else b"")
    segment = row * side
    header = struct.pack("<16L", 2, 64, 64 + len(segment), *([0] * 13))
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = encapsulate([header + segment + segment])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)


def job_process_baseline_mb(tmp: Path) -> int:
    """Resident size of a process that imported the job body and loaded the node's model."""
    code = (
        "import os; from dxnode.config import Settings; from dxnode.jobs.body import run_job; "
        "from dxnode.model import load_classifier; from dxnode.worklist.supervisor import rss_mb; "
        "load_classifier(Settings().model); print(rss_mb(os.getpid()))"
    )
    env = dict(os.environ, TORCH_HOME=str(tmp / "torch-home"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    return int(out.stdout.strip().splitlines()[-1])


def test_poison_study_ends_failed_after_max_attempts_while_others_are_processed(tmp_path: Path, pacs: StoreSCP) -> None:
    limit = job_process_baseline_mb(tmp_path) + 400
    cfg = node_config(
        tmp_path,
        destinations=pacs_destination(pacs),
        worklist={"max_attempts": 2, "retry_backoff_seconds": 1, "worker_max_rss_mb": limit},
    )
    node = Node(cfg, "--no-web")
    store = Store(sqlite_url(tmp_path))
    try:
        poison_uid = generate_uid()
        (tmp_path / "poison").mkdir()
        big_rle_instance(tmp_path / "poison" / "big.dcm", poison_uid)
        rle = ["storescu", "-xr", "-aet", "MODALITY", "-aec", "DXNODE", "127.0.0.1", str(node.port)]
        sent = subprocess.run([*rle, str(tmp_path / "poison" / "big.dcm")], capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: poison_uid in jobs_by_study(store), timeout=60, what="the poison study queued")
        healthy, files = make_study(tmp_path / "healthy", n=2)
        storescu(node.port, files)
        poison = wait_until(
            lambda: j if (j := jobs_by_study(store)[poison_uid][-1]).state == "failed" else None,
            timeout=240,
            what="the poison job failed",
        )
        assert poison.attempts == 2 and poison.lost == 2
        assert poison.error.startswith("the worker stopped 2 times while running this job (last stage reached: ")
        assert f"over worker_max_rss_mb = {limit}" in poison.error
        # The node kept receiving and processing: the healthy study and one sent after the failure.
        later, files = make_study(tmp_path / "later", n=1)
        storescu(node.port, files)
        wait_until(lambda: all_done(store, [healthy, later]), timeout=120, what="other studies done")
        srs = wait_until(
            lambda: found if len(found := srs_by_study(pacs)) == 2 else None, timeout=60, what="SRs at the PACS"
        )
        assert set(srs) == {healthy, later}
        assert node.proc.poll() is None
    finally:
        node.stop()
        store.dispose()


def test_sigterm_during_a_long_job_exits_in_time_with_the_job_done_or_queued(tmp_path: Path) -> None:
    need_tool("storescu")
    cfg = node_config(tmp_path, node={"stop_timeout_seconds": 6})
    node = Node(cfg, "--no-web")
    store = Store(sqlite_url(tmp_path))
    try:
        study, files = make_study(tmp_path / "study", n=80)
        storescu(node.port, files)
        analysing = {"analyze", "decode", "model", "cam"}  # the heartbeat names the stage between batches
        job = wait_until(
            lambda: next(
                (j for j in jobs_by_study(store).get(study, []) if j.state == "running" and j.stage in analysing),
                None,
            ),
            timeout=120,
            what="the job analysing",
        )
        started = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        node.proc.wait(30)
        took = time.monotonic() - started
        assert took < 6, f"stopped in {took:.1f} s"
        (final,) = jobs_by_study(store)[study]
        assert final.state in ("done", "queued"), final.state
        if final.state == "queued":
            assert final.attempts == 0  # a shutdown is not the job's fault
        with pytest.raises(ProcessLookupError):
            os.kill(pid_of(job.worker), 0)
        assert any("stopping (within 6 s)" in line for line in node.lines)
    finally:
        node.stop()
        store.dispose()


def test_receive_only_node_and_two_workers_on_postgresql_share_the_work(tmp_path: Path, pg_url: str) -> None:
    need_tool("storescu")
    shared = tmp_path / "shared"
    database = {"url": pg_url}
    (tmp_path / "receiver").mkdir()
    (tmp_path / "worker").mkdir()
    receiver = node_config(
        tmp_path / "receiver", node={"data_dir": str(shared)}, database=database, worklist={"run_jobs": False}
    )
    worker_cfg = node_config(
        tmp_path / "worker", node={"data_dir": str(shared)}, database=database, worklist={"retry_backoff_seconds": 0.5}
    )
    recv = Node(receiver, "--no-web")
    workers = [Node(worker_cfg, command="worker") for _ in range(2)]
    store = Store(pg_url)
    try:
        assert recv.job_pids() == []  # receive-only: no job process
        studies, files = [], []
        for i in range(30):
            uid, fs = make_study(tmp_path / f"s{i}", n=2)
            studies.append(uid)
            files += fs
        storescu(recv.port, files)
        wait_until(lambda: len(jobs_by_study(store)) == 30, timeout=120, what="30 jobs queued")
        # Kill the first worker (and its job process) while it runs a job, once it has finished one.
        first = set(workers[0].job_pids())

        def first_worker_busy() -> bool:
            mine = [j for js in jobs_by_study(store).values() for j in js if pid_of(j.worker) in first]
            return any(j.state == "done" for j in mine) and any(j.state == "running" for j in mine)

        wait_until(first_worker_busy, timeout=180, what="the first worker done with a job and running another")
        workers[0].kill_all()
        wait_until(lambda: all_done(store, studies), timeout=300, what="all 30 studies done")
        jobs = jobs_by_study(store)
        assert all(len(js) == 1 for js in jobs.values())
        with store.session() as s:
            srs = s.execute(
                select(Output.study_id, func.count()).where(Output.kind == "sr").group_by(Output.study_id)
            ).all()
            claims = [
                (target, actor)
                for target, actor, detail in s.execute(
                    select(Audit.target, Audit.actor, Audit.detail).where(Audit.action == "job.state")
                )
                if '"state": "running"' in detail
            ]
        runs = Counter(target for target, _ in claims)
        by_worker = Counter(pid_of(actor) for _, actor in claims)
        assert len(runs) == 30 and sorted(runs.values())[:29] == [1] * 29, runs  # only the killed job ran twice
        assert len(by_worker) == 2 and min(by_worker.values()) >= 1, f"work not spread over both workers: {by_worker}"
        assert len(srs) == 30 and all(n == 1 for _, n in srs)
    finally:
        for n in (recv, *workers):
            n.stop()
        store.dispose()


def mixed_study(folder: Path, n: int) -> tuple[str, list[Path]]:
    """A study of one MR instance (the only one the pipeline rules below analyse) and n-1 CT instances."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = generate_uid()
    files = []
    for i in range(n):
        ds = mr if i == 0 else ct
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = folder / f"i{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study, files


CONCURRENT_SENDERS = 16
INSTANCES_PER_SENDER = int(os.environ.get("DXNODE_TEST_INSTANCES_PER_SENDER", "200"))


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_sixteen_concurrent_senders_get_one_sr_per_study(
    tmp_path: Path, pacs: StoreSCP, backend: str, request: pytest.FixtureRequest
) -> None:
    url = sqlite_url(tmp_path) if backend == "sqlite" else request.getfixturevalue("pg_url")
    cfg = node_config(
        tmp_path,
        node={"max_associations": 32},
        database={"url": url},
        destinations=pacs_destination(pacs),
        pipeline={"modalities": ["MR"]},
    )
    studies = [mixed_study(tmp_path / f"s{k}", INSTANCES_PER_SENDER) for k in range(CONCURRENT_SENDERS)]
    node = Node(cfg, "--no-web")
    store = Store(url)
    try:
        senders = [
            subprocess.Popen(
                ["storescu", "-aet", f"SENDER{k}", "-aec", "DXNODE", "127.0.0.1", str(node.port), *map(str, files)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for k, (_, files) in enumerate(studies)
        ]
        for p in senders:
            out = p.communicate(timeout=600)[0]
            assert p.returncode == 0, out
        uids = [uid for uid, _ in studies]

        def settled() -> bool:
            """Each study's newest job is done over all its instances and every delivery is sent: a job
            started on part of a study would have been followed by another one by then."""
            jobs = jobs_by_study(store)
            with store.session() as s:
                if s.scalar(select(func.count()).select_from(Delivery).where(Delivery.state != "sent")):
                    return False
                return all(
                    jobs.get(uid)
                    and jobs[uid][-1].state == "done"
                    and s.scalar(select(func.count()).where(InstanceResult.job_id == jobs[uid][-1].id))
                    == INSTANCES_PER_SENDER
                    for uid in uids
                )

        wait_until(settled, timeout=300, what="every study done over all its instances, every SR sent")
        assert {uid: len(s) for uid, s in srs_by_study(pacs).items()} == {uid: 1 for uid in uids}
        with store.session() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == CONCURRENT_SENDERS * INSTANCES_PER_SENDER
            assert s.scalar(select(func.sum(Instance.duplicates))) == 0
        jobs = jobs_by_study(store)
        for uid in uids:
            (job,) = jobs[uid]  # one job per study: none started on part of it
            with store.session() as s:
                covered = s.scalar(select(func.count()).where(InstanceResult.job_id == job.id))
            assert covered == INSTANCES_PER_SENDER
    finally:
        node.stop()
        store.dispose()


def test_node_killed_while_its_outbox_sends_delivers_the_rest_within_a_minute(tmp_path: Path) -> None:
    need_tool("storescp", "storescu")
    pacs_port = free_port()
    cfg = node_config(
        tmp_path, destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]
    )
    node = Node(cfg, "--no-web")
    store = Store(sqlite_url(tmp_path))
    pacs = None
    try:
        files = []
        for i in range(5):
            files += make_study(tmp_path / f"s{i}", n=1)[1]
        storescu(node.port, files)

        def deliveries() -> list[Delivery]:
            with store.session() as s:
                return list(s.scalars(select(Delivery)))

        # Every SR and SC waits in the outbox (the PACS is down).
        wait_until(lambda: len(d := deliveries()) == 10 and all(r.attempts >= 1 for r in d), timeout=180, what="outbox")
        # A slow PACS: each C-STORE takes a second, so the node dies in the middle of its batch.
        pacs = StoreSCP(tmp_path / "pacs", pacs_port, args=("+uf", "--sleep-after", "1"))
        wait_until(lambda: any(r.state == "sent" for r in deliveries()), timeout=60, what="a first delivery")
        node.kill_all()
        assert any(r.state == "pending" for r in deliveries())
        restarted = time.monotonic()
        node = Node(cfg, "--no-web")
        try:
            wait_until(lambda: all(r.state == "sent" for r in deliveries()), timeout=60, what="the rest delivered")
        except AssertionError:
            print("\n".join(node.lines[-60:]))
            for r in deliveries():
                print(r.id, r.state, r.attempts, r.next_attempt_at, r.leased_by, r.lease_heartbeat_at, r.last_error)
            raise
        assert time.monotonic() - restarted < 60
        received = Counter(ds.SOPInstanceUID for ds in pacs.datasets())
        assert len(received) == 10
        # The object on the wire when the node died may arrive twice (same UID); nothing else does.
        assert sum(received.values()) <= 11, received
    finally:
        node.stop()
        store.dispose()
        if pacs is not None:
            pacs.stop()


KILL_ROUNDS = int(os.environ.get("DXNODE_TEST_KILL_ROUNDS", "10"))


def test_node_sigkilled_at_random_points_loses_nothing(tmp_path: Path, pacs: StoreSCP) -> None:
    seed = int(os.environ.get("DXNODE_TEST_SEED", str(random.randrange(10**6))))
    rng = random.Random(seed)
    cfg = node_config(tmp_path, destinations=pacs_destination(pacs), worklist={"retry_backoff_seconds": 0.5})
    acked: dict[str, int] = {}
    studies: list[str] = []
    store = Store(sqlite_url(tmp_path))

    def running() -> bool:
        with store.session() as s:
            return bool(s.scalar(select(func.count()).where(Job.state == "running")))

    def outputs_of(study: str) -> bool:
        with store.session() as s:
            return bool(
                s.scalar(select(func.count()).select_from(Output).join(Study).where(Study.study_instance_uid == study))
            )

    points = []
    for round_ in range(KILL_ROUNDS):
        node = Node(cfg, "--no-web")
        study, files = make_study(tmp_path / f"s{round_}", n=3)
        studies.append(study)
        statuses: dict[str, int] = {}
        sender = threading.Thread(target=send, args=(node.port, files, statuses))
        sender.start()
        point = rng.choice(["receive", "job", "outbox"])
        points.append(point)
        with contextlib.suppress(AssertionError):  # a point not reached in time: kill there anyway
            if point == "job":
                wait_until(running, timeout=60, what="a running job")
            elif point == "outbox":
                wait_until(lambda: outputs_of(study), timeout=60, what="outputs written")  # noqa: B023
        time.sleep(rng.uniform(0, 1))
        node.kill_all()
        sender.join(60)
        acked.update({uid: s for uid, s in statuses.items() if s == 0})
    print(f"seed {seed}: kill points {points}")
    node = Node(cfg, "--no-web")
    try:
        with store.session() as s:
            rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
            received = {u for (u,) in s.execute(select(Study.study_instance_uid).where(Study.num_instances > 0))}
        for uid in acked:  # every acknowledged instance is in the database and on disk
            assert uid in rows, f"seed {seed}: acknowledged {uid} lost"
            assert (tmp_path / "var" / rows[uid].file_path).is_file()
        try:
            wait_until(lambda: all_done(store, sorted(received)), timeout=240, what=f"every study done (seed {seed})")
        except AssertionError:
            for uid, js in jobs_by_study(store).items():
                print(uid, [(j.state, j.attempts, j.lost, j.error) for j in js])
            print("\n".join(node.lines[-40:]))
            raise
        wait_until(
            lambda: set(srs_by_study(pacs)) == received, timeout=120, what=f"an SR per study at the PACS (seed {seed})"
        )
        assert all(len(s) == 1 for s in srs_by_study(pacs).values()), f"seed {seed}"
        with store.session() as s:
            assert s.scalar(select(func.count()).where(Job.state == "running")) == 0
    finally:
        node.stop()
        store.dispose()
