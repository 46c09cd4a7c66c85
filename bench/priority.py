"""Priority benchmark: with routine CR studies queued, how soon does a STAT study's SR reach the PACS?

A real `dxnode serve` (one job process, the untrained demo model, SQLite) between DCMTK storescu
and storescp. N routine single-image CR studies (a real CR chest from pydicom-data, new UIDs each)
are sent and queued; once a few of them ran (--before), one more CR study is sent whose images say
Requested Procedure Priority STAT.
Measured in the same run:
  - one job's time: the median started-to-finished time of the jobs that ran (the STAT one included);
  - the STAT latency: from the STAT job's queueing to its SR's arrival at the PACS;
  - how many routine jobs were still queued when it arrived (it jumped them).
Target (issue 22): STAT latency within 2x one job's time. Without priorities it would wait for every
routine job queued before it. Run (a few minutes):
  .venv/bin/python -m bench.priority [--routine 100]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from bench.e2e import CR_TEMPLATE, DXNODE, ENV, send
from bench.loopback import free_port, wait_port


def make_cr(folder: Path, patient: str, priority: str = "") -> str:
    """One single-image CR study in folder (new UIDs), optionally with a Requested Procedure Priority."""
    ds = pydicom.dcmread(CR_TEMPLATE)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID, ds.PatientName = patient, f"BENCH^{patient}"
    if priority:
        ds.RequestedProcedurePriority = priority
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / "0.dcm", enforce_file_format=True)
    return str(ds.StudyInstanceUID)


class Node:
    """`dxnode serve` (one job process, outbox every 0.2 s) and a storescp PACS on loopback."""

    def __init__(self, work: Path) -> None:
        self.port, self.pacs_port = free_port(), free_port()
        self.pacs_dir, self.db = work / "pacs", work / "var" / "dxnode.db"
        self.pacs_dir.mkdir(parents=True)
        (work / "torch-home").mkdir()
        config = work / "dxnode.toml"
        config.write_text(
            f'[node]\nhost = "127.0.0.1"\nport = {self.port}\ndata_dir = "{work / "var"}"\nmin_free_mb = 100\n'
            f'[database]\nurl = "sqlite:///{self.db}"\n'
            "[worklist]\nstable_seconds = 1\nsweep_interval_seconds = 0.2\npoll_interval_seconds = 0.1\nworkers = 1\n"
            '[report]\nheatmap_for = "top1"\n[dispatch]\ninterval_seconds = 0.2\n[web]\nenabled = false\n'
            f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {self.pacs_port}\n'
        )
        self.pacs = subprocess.Popen(
            ["storescp", "-aet", "PACS", "-od", str(self.pacs_dir), str(self.pacs_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=ENV,
        )
        self.log = open(work / "serve.log", "w")  # noqa: SIM115 (closed in stop)
        self.serve = subprocess.Popen(
            [DXNODE, "--config", str(config), "--log-level", "WARNING", "serve", "--no-web"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=dict(ENV, TORCH_HOME=str(work / "torch-home")),
        )
        wait_port(self.pacs_port)
        wait_port(self.port, timeout=120)
        self.seen: dict[str, str] = {}  # PACS file -> its study

    def jobs(self) -> list[dict[str, Any]]:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30) as db:
            db.row_factory = sqlite3.Row
            return [
                dict(r)
                for r in db.execute(
                    "select job.*, study.study_instance_uid from job join study on study.id = job.study_id order by job.id"
                )
            ]

    def sr_studies(self) -> set[str]:
        """Studies with an SR at the PACS (each new file read once)."""
        for path in self.pacs_dir.iterdir():
            if path.name.startswith("SR") and path.name not in self.seen:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                self.seen[path.name] = str(ds.StudyInstanceUID)
        return set(self.seen.values())

    def wait(self, check: Any, what: str, timeout: float = 1800) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.serve.poll() is not None:
                raise RuntimeError(f"dxnode serve exited: see {self.log.name}")
            if value := check():
                return value
            time.sleep(0.05)
        raise TimeoutError(what)

    def stop(self) -> None:
        self.serve.terminate()
        self.serve.wait(120)
        self.pacs.terminate()
        self.pacs.wait(30)
        self.log.close()


def _at(text: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routine", type=int, default=100, help="routine CR studies queued first (default 100)")
    parser.add_argument("--before", type=int, default=3, help="routine jobs that end before the STAT study is sent")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if not shutil.which("storescu") or not shutil.which("storescp"):
        print("bench.priority needs DCMTK (apt-get install dcmtk)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="dxnode-priority-"))
    try:
        warm = make_cr(work / "send" / "warm", "WARM")
        for k in range(args.routine):
            make_cr(work / "send" / "routine" / f"{k:03d}", f"R{k:03d}")
        stat = make_cr(work / "send" / "stat", "STAT", priority="STAT")
        node = Node(work / "node")
        try:
            send(node.port, work / "send" / "warm")  # the model loaded and the first job run before timing
            node.wait(lambda: warm in node.sr_studies(), "the warm-up SR")
            send(node.port, work / "send" / "routine")
            node.wait(lambda: len(node.jobs()) >= 1 + args.routine, f"{args.routine} routine jobs queued")
            # A few routine jobs run first: the queue in its steady state, and samples of one job's time.
            node.wait(lambda: sum(j["state"] == "done" for j in node.jobs()) >= 1 + args.before, "routine jobs done")
            send(node.port, work / "send" / "stat")
            node.wait(lambda: stat in node.sr_studies(), "the STAT SR")
            arrived = dt.datetime.now(dt.UTC)
            jobs = node.jobs()
        finally:
            node.stop()
        stat_job = next(j for j in jobs if j["study_instance_uid"] == stat)
        routine = [j for j in jobs if j["study_instance_uid"] != stat and j["study_instance_uid"] != warm]
        ran = [j for j in [*routine, stat_job] if j["state"] == "done" and j["started_at"] and j["finished_at"]]
        job_s = statistics.median((_at(j["finished_at"]) - _at(j["started_at"])).total_seconds() for j in ran)
        stat_s = (_at(stat_job["finished_at"]) - _at(stat_job["started_at"])).total_seconds()
        latency = (arrived - _at(stat_job["created_at"])).total_seconds()
        waiting = sum(j["state"] == "queued" for j in routine)
        print(f"routine studies queued:                {args.routine}")
        print(f"{f'one job (median of {len(ran)} jobs):':<39}{job_s:.2f} s (the STAT job itself: {stat_s:.2f} s)")
        print(f"STAT job priority:                     {stat_job['priority']}")
        print(f"STAT queued -> its SR at the PACS:     {latency:.2f} s = {latency / job_s:.2f} x one job")
        print(f"routine jobs still queued then:        {waiting} (without priorities: ~{waiting * job_s:.0f} s more)")
        print(f"target (<= 2x one job):                {'met' if latency <= 2 * job_s else 'MISSED'}")
        return 0 if latency <= 2 * job_s else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
