"""/metrics is the whole node's truth: counters from the job processes, the receiver and the outbox all
move, each metric docs/operations.md tells admins to watch among them; a `dxnode worker` serves its own.

Real `dxnode serve` / `dxnode worker` subprocesses, DCMTK storescu/echoscu/storescp peers, real HTTP.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
from conftest import free_port, need_tool
from nodeproc import Node, StoreSCP, make_study, node_config, storescu, wait_until
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

OPERATIONS = Path(__file__).parents[1] / "docs" / "operations.md"
READ = "prometheus-read-token-0123456789"
TOKENS = [{"name": "prometheus", "token": READ, "role": "read"}]
SAMPLE = re.compile(r"^(dxnode_\w+?)(?:\{([^}]*)\})? (\S+)$")


# Watched metrics of features this test's node does not run (Storage Commitment, UPS, retention): the
# test named moves each, through the metric object named (or the metric's name).
MOVED_ELSEWHERE = {
    "dxnode_deliveries_committed_total": ("test_commitment.py", "metrics.DELIVERIES_COMMITTED"),
    "dxnode_commitment_failed_references_total": ("test_commitment.py", "metrics.COMMITMENT_FAILED_REFERENCES"),
    "dxnode_commitment_timeouts_total": ("test_commitment.py", "metrics.COMMITMENT_TIMEOUTS"),
    "dxnode_ups_workitems_total": ("test_ups_performer.py", "metrics.UPS_WORKITEMS"),
    "dxnode_ups_unreachable_total": ("test_ups_performer.py", "metrics.UPS_UNREACHABLE"),
    "dxnode_stored_bytes": ("test_retention_quota.py", "dxnode_stored_bytes"),
    "dxnode_studies_purged_total": ("test_retention_quota.py", "dxnode_studies_purged_total"),
}


def watched_metrics() -> list[str]:
    """Every metric name in the table of docs/operations.md's "What to watch" that this test's node moves."""
    rows = [line for line in OPERATIONS.read_text().splitlines() if line.startswith("| `dxnode_")]
    names = [name for row in rows for name in re.findall(r"`(dxnode_\w+)", row.split("|")[1])]
    assert len(names) >= 10, names
    return [name for name in names if name not in MOVED_ELSEWHERE]


def test_the_watched_metrics_moved_elsewhere_are_moved_there() -> None:
    """Each watched metric this file leaves out is asserted on in the test named for it."""
    for name, (test_file, handle) in MOVED_ELSEWHERE.items():
        text = (Path(__file__).parent / test_file).read_text()
        assert handle in text, (name, test_file)  # that test reads the metric before and after
        assert name in OPERATIONS.read_text(), name  # still watched: otherwise drop it from the list


def scrape(base: str, token: str | None = READ) -> dict[tuple[str, str], float]:
    """GET /metrics: {(sample name, labels): value} of the dxnode_ samples."""
    request = urllib.request.Request(base + "metrics", headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=30) as answer:
        text = answer.read().decode()
    samples: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if m := SAMPLE.match(line):
            assert (m.group(1), m.group(2) or "") not in samples, f"{line}: twice in one scrape"
            samples[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return samples


def value(samples: dict[tuple[str, str], float], name: str, **labels: str) -> float:
    """The sum of a sample's values over the series matching labels."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab.split(",")))


def moved(samples: dict[tuple[str, str], float], name: str) -> bool:
    """Some series of the metric (a counter's _total, a histogram's _count, a gauge) is above 0."""
    return any(v > 0 for (n, _), v in samples.items() if n in (name, f"{name}_total", f"{name}_count"))


def send_unreadable(port: int, aet: str, folder: Path) -> int:
    """One C-STORE of a dataset without a Study Instance UID (refused 0xC000); its status."""
    ds = pydicom.dcmread(make_study(folder, n=1)[1][0])
    del ds.StudyInstanceUID
    ae = AE(ae_title=aet)
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    ds = ds.copy()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assoc = ae.associate("127.0.0.1", port, ae_title="DXNODE")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    return int(status.Status)


def test_every_watched_metric_moves_after_real_jobs_and_deliveries(tmp_path: Path) -> None:
    need_tool("storescu", "storescp", "echoscu")
    pacs = StoreSCP(tmp_path / "pacs", free_port())
    cfg = node_config(
        tmp_path,
        node={"allowed_calling_aets": ["MODALITY", "SENDER"]},
        web={"enabled": True, "host": "127.0.0.1", "port": 0, "tokens": TOKENS},
        dispatch={"max_attempts": 2},
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
            {"name": "dead", "ae_title": "DEAD", "host": "127.0.0.1", "port": free_port()},  # nobody listens
        ],
    )
    node = Node(cfg)
    try:
        base = node.wait_for(r"dxnode web: (http://\S+/)").group(1)
        study_uid, files = make_study(tmp_path / "study", n=2)
        storescu(node.port, files, "MODALITY")
        assert 0xC000 <= send_unreadable(node.port, "SENDER", tmp_path / "bad") <= 0xCFFF
        echo = subprocess.run(
            ["echoscu", "-aet", "INTRUDER", "-aec", "DXNODE", "127.0.0.1", str(node.port)], timeout=30
        )
        assert echo.returncode != 0  # rejected: not an allowed calling AE title

        names = watched_metrics()
        seen: dict[str, bool] = dict.fromkeys(names, False)

        def everything_moved() -> dict[tuple[str, str], float] | None:
            samples = scrape(base)
            for name in names:
                seen[name] = seen[name] or moved(samples, name)  # gauges (backlog) move and come back
            # A scrape reads the counters and the database's gauges one after the other, so a delivery
            # that fails in between shows in one and not yet in the other: wait until both say so.
            settled = (
                value(samples, "dxnode_outbox_backlog") == 0
                and value(samples, "dxnode_outbox_failed") >= 2
                and value(samples, "dxnode_deliveries_failed_for_good_total", destination="dead") >= 2
                and value(samples, "dxnode_deliveries_sent_total", destination="pacs") >= 2
                and value(samples, "dxnode_jobs", state="done") >= 1
                and value(samples, "dxnode_jobs_finished_total", state="done") >= 1
            )
            return samples if all(seen.values()) and settled else None

        try:
            samples = wait_until(everything_moved, timeout=120, what="every watched metric to move")
        except AssertionError:
            raise AssertionError(f"never moved: {[n for n, ok in seen.items() if not ok]}") from None

        # the job ran in a job process, counted there and seen here
        assert value(samples, "dxnode_jobs_finished_total", state="done") == value(samples, "dxnode_jobs", state="done")
        assert value(samples, "dxnode_jobs_finished_total", state="done") == 1
        assert value(samples, "dxnode_inference_seconds_count") >= 1
        assert value(samples, "dxnode_instances_received_total", calling_aet="MODALITY") == 2
        assert value(samples, "dxnode_instances_refused_total", status="0xC000") == 1
        assert value(samples, "dxnode_associations_rejected_total", reason="calling_aet") == 1
        # counters named for what they count: failed attempts (retries counted) vs deliveries given up
        given_up = value(samples, "dxnode_deliveries_failed_for_good_total", destination="dead")
        assert given_up == value(samples, "dxnode_outbox_failed") == 2  # the SR and the SC
        assert value(samples, "dxnode_delivery_attempts_failed_total", destination="dead") == 2 * given_up
        assert value(samples, "dxnode_deliveries_sent_total", destination="pacs") == 2
        assert value(samples, "dxnode_deliveries_failed_for_good_total", destination="pacs") == 0
        assert len(pacs.datasets()) == 2 and all(d.StudyInstanceUID == study_uid for d in pacs.datasets())
        # /metrics needs a read token; /readyz and /healthz do not, and show only booleans
        try:
            scrape(base, token=None)
            raise AssertionError("/metrics answered without a token")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
        with urllib.request.urlopen(base + "readyz", timeout=30) as answer:
            ready = json.load(answer)
        assert ready == {"ready": True, "checks": {"database": True, "model": True, "scp": True, "workers": True}}
    finally:
        node.stop()
        pacs.stop()


def test_a_worker_serves_its_own_metrics(tmp_path: Path) -> None:
    """A receive-only node and a `dxnode worker` on one database and data dir: the worker's /metrics
    counts the jobs and deliveries it did, and its multiprocess folder is its own."""
    need_tool("storescu", "storescp")
    pacs = StoreSCP(tmp_path / "pacs", free_port())
    shared = tmp_path / "shared"
    database = {"url": f"sqlite:///{shared / 'dxnode.db'}"}
    destinations = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}]
    (tmp_path / "recv").mkdir()
    (tmp_path / "worker").mkdir()
    recv_cfg = node_config(
        tmp_path / "recv",
        node={"data_dir": str(shared)},
        database=database,
        worklist={"run_jobs": False},
        destinations=destinations,
    )
    worker_cfg = node_config(
        tmp_path / "worker",
        node={"data_dir": str(shared)},
        database=database,
        web={"enabled": True, "host": "127.0.0.1", "port": 0, "tokens": TOKENS},
        destinations=destinations,
    )
    receiver = Node(recv_cfg, "--no-web")
    worker = Node(worker_cfg, command="worker")
    try:
        base = worker.wait_for(r"dxnode worker metrics: (http://\S+/)").group(1)
        with urllib.request.urlopen(base + "healthz", timeout=30) as answer:
            assert json.load(answer) == {"status": "ok"}
        _, files = make_study(tmp_path / "study", n=1)
        storescu(receiver.port, files, "MODALITY")

        def finished() -> dict[tuple[str, str], float] | None:
            samples = scrape(base)
            done = value(samples, "dxnode_jobs_finished_total", state="done") == 1
            return samples if done and value(samples, "dxnode_deliveries_sent_total", destination="pacs") == 2 else None

        samples = wait_until(finished, timeout=120, what="the worker's job and deliveries in its /metrics")
        assert value(samples, "dxnode_inference_seconds_count") >= 1
        assert value(samples, "dxnode_instances_received_total") == 0  # received by the other node
        with urllib.request.urlopen(base + "readyz", timeout=30) as answer:
            assert json.load(answer) == {"ready": True, "checks": {"database": True, "workers": True}}
        folders = sorted(p.name for p in (shared / "metrics").iterdir())
        host = socket.gethostname()
        assert folders == sorted([f"{host}-{receiver.proc.pid}", f"{host}-{worker.proc.pid}"])
    finally:
        worker.stop()
        receiver.stop()
        pacs.stop()
