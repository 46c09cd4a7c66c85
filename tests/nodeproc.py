"""Run `dxnode serve` as a real subprocess for end-to-end tests, and DCMTK peers beside it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE

DXNODE = str(Path(sys.executable).with_name("dxnode"))
# The demo model declares chest CR/DX; the tests run it on pydicom's CT, MR, US... files, as an
# admin would with an explicit [pipeline] modalities list (see dxnode/worklist/routing.py).
TEST_MODALITIES = ["CR", "DX", "CT", "MR", "US", "OT", "NM", "MG", "XA", "PT", "SC"]


def toml_value(value: Any) -> str:
    """A Python value as a TOML literal (the few types configs need)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_config(path: Path, sections: dict[str, Any]) -> Path:
    """Write a dxnode TOML config: {section: {key: value}} and {"destinations": [{...}]}."""
    lines: list[str] = []
    for name, body in sections.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"[{name}]")
            lines += [
                f"{k} = {toml_value(v)}"
                for k, v in body.items()
                if not isinstance(v, list) or not v or not isinstance(v[0], dict)
            ]
            for k, v in body.items():
                if isinstance(v, list) and v and isinstance(v[0], dict):
                    for item in v:
                        lines.append(f"[[{name}.{k}]]")
                        lines += [f"{kk} = {toml_value(vv)}" for kk, vv in item.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def node_config(tmp: Path, **sections: Any) -> Path:
    """A test config: free ports, data and SQLite under tmp, fast worklist and outbox."""
    base: dict[str, Any] = {
        "node": {"ae_title": "DXNODE", "host": "127.0.0.1", "port": 0, "data_dir": str(tmp / "var"), "min_free_mb": 10},
        "database": {"url": f"sqlite:///{tmp / 'var' / 'dxnode.db'}"},
        "worklist": {"stable_seconds": 1, "sweep_interval_seconds": 0.5, "poll_interval_seconds": 0.5},
        "dispatch": {"interval_seconds": 0.5, "backoff_initial_seconds": 0.5, "backoff_max_seconds": 2},
        "web": {"enabled": False},
        "report": {"heatmap_for": "top1"},
        "pipeline": {"modalities": TEST_MODALITIES},
    }
    for name, body in sections.items():
        if isinstance(body, dict):
            base.setdefault(name, {}).update(body)
        else:
            base[name] = body
    return write_config(tmp / "dxnode.toml", base)


class Node:
    """`dxnode serve` (or another long-running command) in a subprocess, in its own process group
    (with its job processes); its output is collected line by line."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None, command: str = "serve") -> None:
        self.config = config
        self.lines: list[str] = []
        full_env = dict(os.environ, TORCH_HOME=str(config.parent / "torch-home"), **(env or {}))
        self.proc = subprocess.Popen(
            [DXNODE, "--config", str(config), command, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
            cwd=config.parent,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if command == "serve":
            self.port = int(self.wait_for(r"listening on [^:]+:(\d+)").group(1))
        else:
            self.wait_for(r"dxnode worker: ")

    def job_pids(self) -> list[int]:
        """Pids of the job processes this node started so far (the newest last)."""
        return [
            int(m.group(1))
            for line in list(self.lines)
            if (m := re.search(r"started job process \d+ \(pid (\d+)\)", line))
        ]

    def kill_all(self) -> None:
        """SIGKILL the node and its job processes at once (a crash of the whole node)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 90) -> re.Match[str]:
        """Wait for an output line matching pattern; fail with the log if the node exits."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := rx.search(line):
                    return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r}; node output:\n" + "\n".join(self.lines[-80:]))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run another dxnode command against the same config."""
        return subprocess.run(
            [DXNODE, "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.config.parent,
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # job processes left behind by a killed node


class InProcessNode:
    """dxnode's StorageSCP in this process on a free port, over a database URL (default: a new SQLite file)."""

    def __init__(self, tmp: Path, url: str | None = None, busy_timeout_s: float = 30, **node: Any) -> None:
        from dxnode.config import Settings
        from dxnode.receive.ingest import Ingest
        from dxnode.scp import StorageSCP
        from dxnode.store import Store, upgrade

        if url is None:
            url = f"sqlite:///{tmp / 'dxnode.db'}"
            upgrade(url)
        self.settings = Settings(
            node={"host": "127.0.0.1", "port": 0, "data_dir": tmp / "var", "min_free_mb": 10, **node},
            database={"url": url},
            pipeline={"modalities": TEST_MODALITIES},
        )
        self.store = Store(url, busy_timeout_s=busy_timeout_s)
        self.ingest = Ingest(self.settings, self.store)
        self.scp = StorageSCP(self.settings, self.ingest)
        self.scp.start()
        self.port = self.scp.port

    def instances(self) -> dict[str, Any]:
        """Stored Instance rows by SOP Instance UID."""
        from sqlalchemy import select

        from dxnode.store import Instance

        with self.store.session() as s:
            return {i.sop_instance_uid: i for i in s.scalars(select(Instance))}

    def stop(self) -> None:
        self.scp.stop()
        self.store.dispose()


class StoreSCP:
    """DCMTK storescp standing in for a PACS: every received object lands in a folder."""

    def __init__(self, folder: Path, port: int, aet: str = "PACS", args: tuple[str, ...] = ()) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.port = folder, port
        env = dict(os.environ, TCP_NODELAY="1")
        self.proc = subprocess.Popen(
            ["storescp", "-aet", aet, "+xa", *args, "-od", str(folder), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        wait_port(port)

    def datasets(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.folder.iterdir()) if p.is_file()]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def wait_port(port: int, timeout: float = 20) -> None:
    """Wait until something listens on 127.0.0.1:port."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listening on port {port}")


def wait_until(check: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    """Poll check() until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def make_study(
    folder: Path, n: int = 3, source: str = "CT_small.dcm", patient_id: str = "PAT-E2E"
) -> tuple[str, list[Path]]:
    """n instances of a bundled pydicom image in one new study; returns (study UID, files)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for i in range(n):
        ds = pydicom.dcmread(get_testdata_file(source))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.PatientName, ds.AccessionNumber = patient_id, "Test^Patient", "ACC123"
        ds.InstanceNumber = i + 1
        path = folder / f"img{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study_uid, files


def storescu(port: int, files: list[Path], aet: str = "MODALITY") -> None:
    """Send files to the node with DCMTK storescu; every one must be acknowledged."""
    out = subprocess.run(
        ["storescu", "-aet", aet, "-aec", "DXNODE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def c_store(port: int, ds: pydicom.Dataset, aet: str = "MODALITY", max_pdu: int | None = None) -> int:
    """Send ds to the node with pynetdicom on an association of its own; the C-STORE status."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    if max_pdu is not None:
        ae.maximum_pdu_size = max_pdu
    assoc = ae.associate("127.0.0.1", port, ae_title="DXNODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()
