"""Reception benchmark: DCMTK storescu sends 200 CT-sized instances over loopback to three receivers.

  dxnode serve       durable: temporary file, fsync, rename, folder fsync, SQLite row, then 0x0000
  DCMTK storescp     the reference: writes each file, no fsync, no database
  pynetdicom SCP     a minimal pynetdicom receiver that only writes files (no fsync, no database)

Every peer runs with TCP_NODELAY (DCMTK through the TCP_NODELAY=1 environment variable).
Run: .venv/bin/python -m bench.receive [--count 200] [--rounds 3]. Prints instances/s (best of
the rounds) and dxnode's ratio to each reference.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ENV = dict(os.environ, TCP_NODELAY="1")

PYNETDICOM_SCP = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    import threading
    from dxnode.scp import NoDelayServer

    out = Path(sys.argv[2])

    def on_store(event):
        with open(out / (event.request.AffectedSOPInstanceUID + ".dcm"), "wb") as f:
            f.write(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title="PYNETDICOM")
    ae.maximum_pdu_size = 262144
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.make_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, on_store)], server_class=NoDelayServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
    server.shutdown()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def make_instances(folder: Path, count: int) -> None:
    """count CT images of 512x512 16-bit in one series (about 0.5 MB each)."""
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, (512, 512), dtype=np.uint16).tobytes()
    for i in range(count):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
            ds.SOPClassUID,
            ds.SOPInstanceUID,
        )
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientID, ds.InstanceNumber = (
            study,
            series,
            "CT",
            "BENCH",
            i + 1,
        )
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = pixels
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)


def send(port: int, folder: Path, aec: str) -> float:
    """Seconds for storescu to send every file of the folder in one association."""
    start = time.perf_counter()
    out = subprocess.run(
        ["storescu", "-aec", aec, "+sd", "127.0.0.1", str(port), str(folder)], capture_output=True, text=True, env=ENV
    )
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"storescu to {aec} failed: {out.stderr[-500:]}")
    return elapsed


def run_dxnode(folder: Path, work: Path) -> float:
    port = free_port()
    cfg = work / "dxnode.toml"
    cfg.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{work / "var"}"\nmin_free_mb = 100\n'
        f'[database]\nurl = "sqlite:///{work / "var" / "dxnode.db"}"\n[worklist]\nrun_jobs = false\nstable_seconds = 3600\n[web]\nenabled = false\n'
    )
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("dxnode")),
            "--config",
            str(cfg),
            "--log-level",
            "WARNING",
            "serve",
            "--no-web",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    try:
        wait_port(port)
        return send(port, folder, "DXNODE")
    finally:
        proc.terminate()
        proc.wait(30)


def run_storescp(folder: Path, work: Path) -> float:
    port, out = free_port(), work / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "-od", str(out), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
    )
    try:
        wait_port(port)
        return send(port, folder, "STORESCP")
    finally:
        proc.terminate()
        proc.wait(30)


def run_pynetdicom(folder: Path, work: Path) -> float:
    port, out = free_port(), work / "pynetdicom"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", PYNETDICOM_SCP, str(port), str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return send(port, folder, "PYNETDICOM")
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not shutil.which("storescu") or not shutil.which("storescp"):
        print("bench.receive needs DCMTK (apt-get install dcmtk)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dxnode-bench-") as tmp:
        src = Path(tmp) / "instances"
        src.mkdir()
        make_instances(src, args.count)
        peers = {
            "dxnode serve (durable)": run_dxnode,
            "DCMTK storescp": run_storescp,
            "pynetdicom write-only SCP": run_pynetdicom,
        }
        best: dict[str, float] = {}
        for r in range(args.rounds):
            for name, runner in peers.items():
                work = Path(tmp) / f"{r}-{name.split()[0]}"
                work.mkdir()
                best[name] = min(best.get(name, float("inf")), runner(src, work))
                shutil.rmtree(work)
        rate = {name: args.count / seconds for name, seconds in best.items()}
        size_mb = sum(p.stat().st_size for p in src.iterdir()) / 2**20
        print(
            f"{args.count} instances of 512x512x16 bit ({size_mb:.0f} MB), storescu over loopback, best of {args.rounds} rounds"
        )
        print(f"{'receiver':<28} {'instances/s':>12} {'MB/s':>8}")
        for name, value in rate.items():
            print(f"{name:<28} {value:12.1f} {value * size_mb / args.count:8.1f}")
        dx = rate["dxnode serve (durable)"]
        print(f"dxnode / DCMTK storescp     = {dx / rate['DCMTK storescp']:.2f}  (target >= 0.50)")
        print(f"dxnode / pynetdicom writer  = {dx / rate['pynetdicom write-only SCP']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
