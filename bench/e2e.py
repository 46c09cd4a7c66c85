"""End-to-end benchmark: a real `dxnode serve` between DCMTK storescu (the modality) and storescp (the PACS).

  (a) K single-image CR studies (a real 1955x1841 CR chest from pydicom-data, new UIDs each):
      studies per minute from the first C-STORE until every study's SR and SC are at the PACS;
  (b) one CT study of N slices (a real 512x512 CT slice from pydicom-data, repeated): the job's
      queued-to-done time and its per-stage breakdown (Job.timings, read with `dxnode jobs --json`);
  (c) the serve process's peak RSS (VmHWM, every node process) after a one-image study and after the CT;
  (d) in the same run, the floor of the CT job: decode-only time of the same N slices (read, LUT,
      window, resize, one thread) plus a bare model forward over N inputs at the same batch size,
      and the CT job's time as a ratio of it.

The node runs the default model of a fresh install (the untrained demo: TORCH_HOME points at an
empty folder), SQLite, stable_seconds 2, heatmap_for top1. Run:
  .venv/bin/python -m bench.e2e [--cr 40] [--ct 300 | --ct 1000] [--threads 0] [--batch-size 8]
On a shared machine the absolute figures are noisy; the ratio to the floor is measured in the
same run, so contention affects both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import data_store
import pydicom
from pydicom.uid import generate_uid

from bench.loopback import free_port, wait_port

DATA = Path(data_store.__file__).parent / "data"
CR_TEMPLATE, CT_TEMPLATE = DATA / "RG1_UNCR.dcm", DATA / "693_UNCR.dcm"
DXNODE = str(Path(sys.executable).with_name("dxnode"))
ENV = dict(os.environ, TCP_NODELAY="1")


def make_study(template: Path, folder: Path, count: int, patient: str) -> str:
    """count instances of one new study (new study/series/SOP UIDs) from a template file; returns the study UID."""
    ds = pydicom.dcmread(template)
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.PatientName, ds.InstanceNumber = patient, f"BENCH^{patient}", i + 1
        if "ImagePositionPatient" in ds:
            ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1]), float(i)]
        ds.save_as(folder / f"{i:05d}.dcm", enforce_file_format=True)
    return study


def send(port: int, folder: Path) -> None:
    """All files of a folder (and below) in one association, with DCMTK storescu."""
    out = subprocess.run(
        ["storescu", "-aec", "DXNODE", "-aet", "MODALITY", "+sd", "+r", "127.0.0.1", str(port), str(folder)],
        capture_output=True,
        text=True,
        env=ENV,
    )
    if out.returncode != 0:
        raise RuntimeError(f"storescu failed: {out.stderr[-800:]}")


def node_processes(pid: int) -> list[int]:
    """The serve process and all its descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def peak_rss_mb(pid: int) -> dict[int, float]:
    """VmHWM (peak resident set) in MB of the serve process and each of its children."""
    peaks = {}
    for p in node_processes(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks[p] = int(line.split()[1]) / 1024
        except OSError:
            pass
    return peaks


class Node:
    """`dxnode serve` with a storescp PACS, both on loopback."""

    def __init__(self, work: Path, threads: int, batch_size: int, pythonpath: str | None) -> None:
        self.work, self.port, self.pacs_port = work, free_port(), free_port()
        self.pacs_dir = work / "pacs"
        self.pacs_dir.mkdir(parents=True)
        self.db = work / "var" / "dxnode.db"
        (work / "torch-home").mkdir()
        self.config = work / "dxnode.toml"
        self.config.write_text(
            f'[node]\nae_title = "DXNODE"\nhost = "127.0.0.1"\nport = {self.port}\ndata_dir = "{work / "var"}"\n'
            f"min_free_mb = 100\n"
            f'[database]\nurl = "sqlite:///{self.db}"\n'
            f"[worklist]\nstable_seconds = 2\nsweep_interval_seconds = 0.5\npoll_interval_seconds = 0.5\n"
            # The demo model declares CR/DX chest radiographs: the CT is named here, as an admin would, to
            # time a large study (a warning at start says the filter goes beyond the declaration).
            f'[pipeline]\nmodalities = ["CR", "DX", "CT"]\n'
            f"[model]\nthreads = {threads}\nbatch_size = {batch_size}\n"
            f'[report]\nheatmap_for = "top1"\n'
            f"[dispatch]\ninterval_seconds = 0.5\n"
            f"[web]\nenabled = false\n"
            f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {self.pacs_port}\n'
        )
        self.env = dict(ENV, TORCH_HOME=str(work / "torch-home"))
        if pythonpath is not None:
            self.env["PYTHONPATH"] = pythonpath
        self.pacs = subprocess.Popen(
            ["storescp", "-aet", "PACS", "-od", str(self.pacs_dir), str(self.pacs_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=ENV,
        )
        self.log = open(work / "serve.log", "w")  # noqa: SIM115 (closed in stop)
        self.serve = subprocess.Popen(
            [DXNODE, "--config", str(self.config), "--log-level", "WARNING", "serve", "--no-web"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        wait_port(self.pacs_port)
        wait_port(self.port)

    def jobs(self) -> list[dict[str, Any]]:
        """Job rows straight from the SQLite file (read-only)."""
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("select * from job order by id")]

    def wait_done(self, jobs: int, at_pacs: int, timeout: float = 3600) -> float:
        """Wait until `jobs` jobs ended and `at_pacs` objects reached the PACS; returns the time it happened."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.serve.poll() is not None:
                raise RuntimeError(f"dxnode serve exited: see {self.log.name}")
            rows = self.jobs()
            ended = [r for r in rows if r["state"] in ("done", "failed", "skipped")]
            bad = [r for r in ended if r["state"] != "done"]
            if bad:  # a skipped or failed job sends nothing: the PACS count would never be reached
                raise RuntimeError(f"job(s) did not end done: {bad[:2]}")
            if len(ended) >= jobs and len(list(self.pacs_dir.iterdir())) >= at_pacs:
                return time.monotonic()
            time.sleep(0.1)
        raise TimeoutError(f"{jobs} jobs / {at_pacs} objects at the PACS not reached in {timeout} s")

    def cli_jobs(self) -> list[dict[str, Any]]:
        """`dxnode jobs --json`, as an admin would read it."""
        out = subprocess.run(
            [DXNODE, "--config", str(self.config), "jobs", "--json", "--limit", "1000"],
            capture_output=True,
            text=True,
            env=self.env,
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-800:])
        return list(json.loads(out.stdout))

    def stop(self) -> None:
        self.serve.terminate()
        self.serve.wait(120)
        self.pacs.terminate()
        self.pacs.wait(30)
        self.log.close()


def floor_seconds(folder: Path, threads: int, batch_size: int) -> tuple[float, float]:
    """(decode-only seconds of every file in folder, bare forward seconds over as many inputs) in this process."""
    import numpy as np

    from dxnode.config import Settings
    from dxnode.model import load_classifier
    from dxnode.pipeline import read_frames, to_tensor

    settings = Settings()
    model = settings.model.model_copy(update={"threads": threads, "batch_size": batch_size})
    # The same model and engine as the node's ([model] engine = auto: ONNX Runtime on CPU).
    clf = load_classifier(model, data_dir=folder.parent / "floor-cache")
    print(f"floor engine: {clf.engine.name} ({clf.engine_reason})")
    prep = clf.manifest.preprocessing
    files = sorted(folder.iterdir())
    start = time.perf_counter()
    inputs = [to_tensor(f, prep) for path in files for f in read_frames(path, settings.pipeline, prep)]
    decode = time.perf_counter() - start
    clf.forward(np.stack(inputs[:batch_size]), cams=False)  # warm-up
    start = time.perf_counter()
    for i in range(0, len(inputs), batch_size):
        clf.forward(np.stack(inputs[i : i + batch_size]), cams=False)
    return decode, time.perf_counter() - start


def seconds_between(a: str | None, b: str | None) -> float:
    """Seconds between two ISO timestamps of the jobs listing."""
    import datetime as dt

    if not a or not b:
        return float("nan")
    return (
        dt.datetime.fromisoformat(b.replace("Z", "+00:00")) - dt.datetime.fromisoformat(a.replace("Z", "+00:00"))
    ).total_seconds()


def main() -> int:  # noqa: PLR0915  a bench script read top to bottom: arguments, runs, one report
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cr", type=int, default=40, help="single-image CR studies (default 40)")
    parser.add_argument("--ct", type=int, default=300, help="slices of the CT study (default 300; try 1000)")
    parser.add_argument(
        "--threads", type=int, default=0, help="[model] threads of the node and the floor (0: torch's default)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="[model] batch_size of the node and the floor")
    parser.add_argument(
        "--pythonpath", help="run the node from this source tree (e.g. an older checkout, for a baseline)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if not shutil.which("storescu") or not shutil.which("storescp"):
        print("bench.e2e needs DCMTK (apt-get install dcmtk)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="dxnode-e2e-"))
    try:
        print(f"making {args.cr + 1} CR studies and a CT of {args.ct} slices under {work} ...", flush=True)
        one = work / "send" / "one"
        make_study(CR_TEMPLATE, one, 1, "ONE")
        for k in range(args.cr):
            make_study(CR_TEMPLATE, work / "send" / "cr" / f"{k:03d}", 1, f"CR{k:03d}")
        ct = work / "send" / "ct"
        make_study(CT_TEMPLATE, ct, args.ct, "CT")

        node = Node(work / "node", args.threads, args.batch_size, args.pythonpath)
        try:
            send(node.port, one)
            node.wait_done(1, 2)
            rss_one = peak_rss_mb(node.serve.pid)

            start = time.monotonic()
            send(node.port, work / "send" / "cr")
            end = node.wait_done(1 + args.cr, 2 + 2 * args.cr)
            cr_rate = args.cr / (end - start) * 60
            rss_cr = peak_rss_mb(node.serve.pid)

            send(node.port, ct)
            node.wait_done(2 + args.cr, 4 + 2 * args.cr)
            rss_ct = peak_rss_mb(node.serve.pid)
            jobs = node.cli_jobs()
        finally:
            node.stop()
        ct_job = max(jobs, key=lambda j: j["id"])
        cr_jobs = sorted(jobs, key=lambda j: j["id"])[1:-1]
        timings = ct_job.get("timings") or {}
        ct_total = timings.get("queued_to_done", seconds_between(ct_job["created_at"], ct_job["finished_at"]))
        ct_run = seconds_between(ct_job["started_at"], ct_job["finished_at"])

        print("measuring the floor (same slices, same batch size, this process) ...", flush=True)
        decode, forward = floor_seconds(ct, args.threads, args.batch_size)
        floor = decode + forward

        print(
            f"\ndxnode e2e, {os.cpu_count()} CPUs, torch threads {args.threads or 'default'}, batch {args.batch_size}"
        )
        print(
            f"CR: {args.cr} single-image studies (1955x1841), send -> all SR+SC at the PACS: {cr_rate:.1f} studies/min"
        )
        cr_run = [seconds_between(j["started_at"], j["finished_at"]) for j in cr_jobs]
        if cr_run:
            print(f"    job run time per CR study: median {sorted(cr_run)[len(cr_run) // 2]:.2f} s")
        print(f"CT: {args.ct} slices 512x512, queued -> done {ct_total:.1f} s (job running {ct_run:.1f} s)")
        for stage, seconds in timings.items():
            print(f"    {stage:<15} {seconds:8.2f} s")
        print(f"floor: decode-only {decode:.1f} s + bare forward {forward:.1f} s = {floor:.1f} s")
        print(f"CT job / floor: queued->done {ct_total / floor:.2f}x, running {ct_run / floor:.2f}x  (target <= 1.2x)")
        print("peak RSS (VmHWM) of the node's processes, MB:")
        for pid, mb in rss_ct.items():
            print(
                f"    pid {pid}: after one CR study {rss_one.get(pid, float('nan')):.0f}, "
                f"after {args.cr} CR {rss_cr.get(pid, float('nan')):.0f}, after the CT {mb:.0f}"
            )
        growth = sum(rss_ct.values()) - sum(rss_one.values())
        print(f"    growth {growth:.0f} MB (target <= 500 MB)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
