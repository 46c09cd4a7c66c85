"""Reception benchmark: DCMTK storescu sends 200 CT-sized instances over loopback to five receivers.

  dxnode serve       durable: temporary file, fsync, rename, folder fsync, SQLite row, then 0x0000
                     (concurrent associations share the folder fsync and the commit: group commit)
  Orthanc            the durable anchor (Debian package): SyncStorageArea true, its own SQLite index
                     in the run's temporary folder (which commits with synchronous=NORMAL, a weaker
                     promise than dxnode's synchronous=FULL)
  DCMTK storescp     writes each file, no fsync, no database
  pynetdicom SCP     a minimal pynetdicom receiver that only writes files (no fsync, no database)
  pynetdicom fsync   the same receiver with dxnode's file durability (temporary file, fsync, rename,
                     folder fsync; no database): what the disk alone costs, for scale
  ... + reactor      that fsync writer on the pynetdicom dxnode runs (receive/reactor.py installed:
                     reactors that wait instead of polling, large socket reads): what the disk costs
                     on dxnode's own transport, so dxnode's ratio to it is what dxnode adds

Every peer runs with TCP_NODELAY (DCMTK through the TCP_NODELAY=1 environment variable).
Run: .venv/bin/python -m bench.receive [--count 200] [--rounds 3] [--baseline DIR] [--only NAME...]
[--per-association] (one sender that opens an association per instance, as many modalities do)
[--work DIR] (where the receivers store: on the file system a data_dir would be on; the run says how
much CPU a file creation costs there, as every receiver makes one file per instance).
Every run's received files stay until the bench ends (about 7 x 2 x rounds x count x 0.5 MB, 4.2 GB
by default): ext4 without a journal (this VM's) skips, for each new file, every inode freed in the
last minute, one buffer lookup each. Deleting a run's files just before the next run made the next
receiver pay for them, and by how much depended on where its folders landed (0.6 ms of CPU per
instance for dxnode, 0.05 ms for Orthanc in one perf profile: docs/benchmarks.md).
--baseline adds dxnode run from another source tree (say a main checkout), to compare before and
after in the same run; --only keeps the receivers named by first word (dxnode, baseline, Orthanc,
DCMTK, pynetdicom). Prints instances/s (best of the rounds, each after an untimed warm-up) with
one sender and with 4 concurrent senders (storescu processes, count/4 instances each, their own
studies), the receiver's CPU time per instance (user + system, from /proc: less
sensitive than the rate to other load on the machine), its peak RSS (VmHWM summed over every process
of it, the largest of the rounds) and dxnode's ratio to each reference.
Targets: dxnode at least 0.8 of the pynetdicom fsync writer and at least as fast as Orthanc, with
1 sender and with 4. Orthanc is skipped (and said so) where it is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

from bench.loopback import free_port, wait_port

ENV = dict(os.environ, TCP_NODELAY="1")

PYNETDICOM_SCP = textwrap.dedent(
    """
    import os
    import sys
    from pathlib import Path
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    import threading
    from dxnode.receive.server import NoDelayServer

    out = Path(sys.argv[2])

    durable = sys.argv[3] != "plain"
    if sys.argv[3] == "reactor":
        from dxnode.receive import reactor
        reactor.install()

    def on_store(event):
        path = out / (event.request.AffectedSOPInstanceUID + ".dcm")
        if not durable:
            with open(path, "wb") as f:
                f.write(event.encoded_dataset())
            return 0x0000
        tmp = path.with_name("." + path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(event.encoded_dataset())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
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


def make_instances(folder: Path, count: int, seed: int = 0) -> None:
    """count CT images of 512x512 16-bit in one series (about 0.5 MB each)."""
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(seed)
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


PER_ASSOCIATION = {"on": False}  # --per-association: one storescu, one association, per instance


def send(port: int, folders: list[Path], aec: str) -> float:
    """Seconds for one storescu per folder, all at once, to send every file of its folder in one association
    (with --per-association: one storescu after another, each sending one file)."""
    if PER_ASSOCIATION["on"]:
        start = time.perf_counter()
        for folder in folders:
            for file in sorted(folder.iterdir()):
                subprocess.run(["storescu", "-aec", aec, "127.0.0.1", str(port), str(file)], check=True, env=ENV)
        return time.perf_counter() - start
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", aec, "+sd", "127.0.0.1", str(port), str(folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for folder in folders
    ]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - start
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu to {aec} failed: {err[-500:]}")
    return elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_pids(pid: int) -> list[int]:
    """A process and its live descendants (serve's receiving and commit processes, multiprocessing's tracker)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:  # that thread has ended since the listing
            continue
        for child in children:
            pids += tree_pids(int(child))
    return pids


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and of its live descendants."""
    return sum(cpu_seconds(p) for p in tree_pids(pid))


def peak_rss_mb(pid: int) -> float:
    """Peak RSS (VmHWM) of a process and of its live descendants, summed, in MB."""
    total = 0
    for p in tree_pids(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024


WARM_UP: list[Path] = []  # 4 folders of 2 instances, each its own study (main makes them)


def timed_send(pid: int, port: int, folders: list[Path], aec: str) -> tuple[float, float, float]:
    """(seconds, receiver CPU seconds, its peak RSS in MB) of one send, every process of the receiver.

    The receiver is warmed up first, untimed, by 4 concurrent senders of 2 instances each (studies of
    their own, so the timed send still starts new studies): a node runs for months, and what its
    first association pays once (in dxnode: each process's first statements compiled, its pools and
    connections opened) is not its rate. The page cache is then flushed (sync): otherwise the files
    an earlier non-durable receiver left dirty are written back during this send, and slow down
    whichever receiver fsyncs."""
    if WARM_UP:
        send(port, WARM_UP, aec)
    os.sync()
    before = tree_cpu_seconds(pid)
    elapsed = send(port, folders, aec)
    return elapsed, tree_cpu_seconds(pid) - before, peak_rss_mb(pid)


def run_dxnode(
    folders: list[Path], work: Path, source: Path | None = None, processes: int = 1
) -> tuple[float, float, float]:
    """dxnode serve from this tree, or from the source tree source (PYTHONPATH: a baseline in the same run),
    with processes receiving processes ([node] receive_processes)."""
    port = free_port()
    cfg = work / "dxnode.toml"
    cfg.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{work / "var"}"\nmin_free_mb = 100\n'
        + (f"receive_processes = {processes}\n" if processes > 1 else "")
        + f'[database]\nurl = "sqlite:///{work / "var" / "dxnode.db"}"\n[worklist]\nrun_jobs = false\nstable_seconds = 3600\n[web]\nenabled = false\n'
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
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV if source is None else dict(ENV, PYTHONPATH=str(source)),
    )
    try:
        assert proc.stdout is not None
        # serve prints this once every receiving process runs (the port opens before the others start)
        while "dxnode DICOM:" not in (line := proc.stdout.readline()):
            if not line:
                raise RuntimeError("dxnode serve exited before listening")
        return timed_send(proc.pid, port, folders, "DXNODE")
    finally:
        proc.terminate()
        proc.wait(30)


def run_storescp(folders: list[Path], work: Path) -> tuple[float, float, float]:
    port, out = free_port(), work / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "-od", str(out), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
    )
    try:
        wait_port(port)
        return timed_send(proc.pid, port, folders, "STORESCP")
    finally:
        proc.terminate()
        proc.wait(30)


def orthanc_binary() -> str | None:
    """The Orthanc server of the Debian package (in /usr/sbin, often not on a user's PATH)."""
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if Path(p).exists()), None)


def run_orthanc(folders: list[Path], work: Path) -> tuple[float, float, float]:
    port, binary = free_port(), orthanc_binary()
    assert binary is not None
    cfg = {
        "Name": "bench",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
        "SyncStorageArea": True,
        "StorageCompression": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "HttpServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SaveJobs": False,
        "Plugins": [],
    }
    (work / "orthanc.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        [binary, str(work / "orthanc.json")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
    )
    try:
        wait_port(port, timeout=60)
        return timed_send(proc.pid, port, folders, "ORTHANC")
    finally:
        proc.terminate()
        proc.wait(30)


def run_pynetdicom(folders: list[Path], work: Path, mode: str = "plain") -> tuple[float, float, float]:
    port, out = free_port(), work / "pynetdicom"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", PYNETDICOM_SCP, str(port), str(out), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return timed_send(proc.pid, port, folders, "PYNETDICOM")
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)


def create_ms(folder: Path, count: int = 200) -> float:
    """CPU milliseconds to create one empty file in a new subfolder of folder: every receiver creates one
    per instance, and where a file system's inode allocation is slow it is a large part of their cost
    (docs/benchmarks.md)."""
    probe = folder / "create-probe"
    probe.mkdir()
    start = time.thread_time()
    for i in range(count):
        os.close(os.open(probe / f"{i}.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    spent = time.thread_time() - start
    shutil.rmtree(probe)
    return 1e3 * spent / count


def free_memory_gb() -> float:
    """MemFree from /proc/meminfo: memory the page cache has not taken (Linux)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemFree:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def print_ratios(rate: dict[tuple[str, int], float], counts: tuple[int, ...]) -> None:
    """dxnode's ratios to each reference that ran, per number of senders (--only may leave some out)."""
    references = (
        ("DCMTK storescp", "DCMTK storescp", ""),
        ("pynetdicom writer", "pynetdicom write-only SCP", ""),
        ("pynetdicom fsync writer", "pynetdicom fsync writer", " (target >= 0.8)"),
        ("fsync writer on dxnode's reactor", "pynetdicom fsync + reactor", ""),
        ("Orthanc", "Orthanc (SyncStorageArea)", " (target >= 1)"),
    )
    for senders in counts:
        for label, name in (("dxnode", "dxnode serve (durable)"), ("dxnode x2", "dxnode serve, 2 processes")):
            if (name, senders) not in rate:
                continue
            ratios = [
                f"{label} / {ref} = {rate[name, senders] / rate[ref_name, senders]:.2f}{target}"
                for ref, ref_name, target in references
                if (ref_name, senders) in rate
            ]
            if ratios:
                print(f"{senders} sender(s): " + ", ".join(ratios))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="also run dxnode from this source tree (e.g. a main checkout)")
    parser.add_argument(
        "--only", nargs="*", default=None, help="receivers to run, by first word (dxnode, Orthanc, ...)"
    )
    parser.add_argument(
        "--per-association", action="store_true", help="one sender, one association per instance (use --count 50)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder to run the receivers in (default: the system's temporary folder); use one on the disk"
        " and file system a node's data_dir would be on",
    )
    args = parser.parse_args()
    PER_ASSOCIATION["on"] = args.per_association
    if not shutil.which("storescu") or not shutil.which("storescp"):
        print("bench.receive needs DCMTK (apt-get install dcmtk)", file=sys.stderr)
        return 2
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    need = (args.rounds * 2 * 8 + 2) * args.count * 525_000  # every run's files, and the senders'
    free = shutil.disk_usage(args.work or tempfile.gettempdir()).free
    if free < need:
        print(
            f"bench.receive keeps every run's files until it ends: needs {need / 1e9:.1f} GB, has {free / 1e9:.1f}",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="dxnode-bench-", dir=args.work) as tmp:
        print(f"work folder {tmp}: {create_ms(Path(tmp)):.3f} ms of CPU to create a file", file=sys.stderr)
        cache_free = free_memory_gb()
        # less free than the run writes: its file writes pay for reclaim (docs/benchmarks.md, "The page cache")
        short = " (less than this run writes: file writes will pay for reclaim)" if cache_free * 2**30 < need else ""
        print(f"memory free of page cache: {cache_free:.1f} GB{short}", file=sys.stderr)
        one = [Path(tmp) / "instances"]
        four = [Path(tmp) / f"sender{k}" for k in range(4)]
        for k, folder in enumerate(one + four):
            folder.mkdir()
            make_instances(folder, args.count if k == 0 else args.count // 4, seed=k)
        for k in range(4):
            WARM_UP.append(Path(tmp) / f"warm-up{k}")
            WARM_UP[-1].mkdir()
            make_instances(WARM_UP[-1], 2, seed=10 + k)
        peers = {
            "dxnode serve (durable)": run_dxnode,
            "dxnode serve, 2 processes": lambda folders, work: run_dxnode(folders, work, processes=2),
            "Orthanc (SyncStorageArea)": run_orthanc,
            "DCMTK storescp": run_storescp,
            "pynetdicom write-only SCP": run_pynetdicom,
            "pynetdicom fsync writer": lambda folders, work: run_pynetdicom(folders, work, "durable"),
            "pynetdicom fsync + reactor": lambda folders, work: run_pynetdicom(folders, work, "reactor"),
        }
        if args.baseline is not None:
            baseline = args.baseline.resolve()
            peers["baseline dxnode"] = lambda folders, work: run_dxnode(folders, work, baseline)
        if orthanc_binary() is None:
            print("Orthanc not installed (apt-get install orthanc): left out", file=sys.stderr)
            del peers["Orthanc (SyncStorageArea)"]
        if args.only is not None:
            peers = {name: run for name, run in peers.items() if name.split()[0] in args.only}
        best: dict[tuple[str, int], tuple[float, float, float]] = {}
        peak: dict[tuple[str, int], float] = {}
        for r in range(args.rounds):
            for senders, folders in ((1, one),) if args.per_association else ((1, one), (4, four)):
                for k, (name, runner) in enumerate(peers.items()):
                    work = Path(tmp) / f"{r}-{senders}-{k}"
                    work.mkdir()
                    result = runner(folders, work)
                    best[name, senders] = min(best.get((name, senders), result), result)
                    peak[name, senders] = max(peak.get((name, senders), 0.0), result[2])
        size_mb = sum(p.stat().st_size for p in one[0].iterdir()) / 2**20
        print(
            f"{args.count} instances of 512x512x16 bit ({size_mb:.0f} MB), storescu over loopback, best of {args.rounds} rounds"
        )
        print(
            f"{'receiver':<28} {'senders':>7} {'instances/s':>12} {'MB/s':>8} {'CPU ms/instance':>16}"
            f" {'peak RSS MB':>12}"
        )
        rate: dict[tuple[str, int], float] = {}
        for (name, senders), (seconds, cpu, _) in best.items():
            n = args.count if senders == 1 else 4 * (args.count // 4)
            rate[name, senders] = n / seconds
            print(
                f"{name:<28} {senders:>7} {n / seconds:12.1f} {n / seconds * size_mb / args.count:8.1f}"
                f" {1e3 * cpu / n:16.2f} {peak[name, senders]:12.0f}"
            )
        print_ratios(rate, (1,) if args.per_association else (1, 4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
