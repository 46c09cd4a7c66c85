"""A node starts whole or exits: taken or impossible addresses end `dxnode serve` at once with one line
naming the part (status 2); a part that dies while running makes the node exit (status 1).

Every node here is a real `dxnode` subprocess (tests/nodeproc.py); the addresses are taken by real
sockets and real nodes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from conftest import free_port, need_tool
from nodeproc import DXNODE, Node, node_config, wait_until

from dxnode.listen import EXIT_PART_DIED, EXIT_START

TRACEBACK_OR_SPAM = re.compile(r"Traceback|cannot schedule new futures")


def run_node(cfg: Path, *args: str, timeout: float = 60, prefix: tuple[str, ...] = ()) -> tuple[int, str, str, float]:
    """Run `dxnode serve` (or args) to its end, under prefix (a command such as setpriv): (status, stdout, stderr, seconds)."""
    started = time.monotonic()
    out = subprocess.run(
        [*prefix, DXNODE, "--config", str(cfg), *(args or ("serve",))],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cfg.parent,
        env=dict(os.environ, TORCH_HOME=str(cfg.parent / "torch-home")),
    )
    return out.returncode, out.stdout, out.stderr, time.monotonic() - started


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


def test_taken_web_port_ends_the_node_at_once_naming_it(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    dicom = free_port()
    cfg = node_config(tmp_path, node={"port": dicom}, web={"enabled": True, "host": "127.0.0.1", "port": port})
    try:
        code, out, err, seconds = run_node(cfg)
    finally:
        taken.close()
    assert code == EXIT_START, out + err
    assert err.strip() == f"dxnode serve: web: 127.0.0.1:{port} is in use (another dxnode?)", err
    assert seconds < 10, f"took {seconds:.1f} s: the addresses must be checked before the model loads"
    assert "listening on" not in out and not TRACEBACK_OR_SPAM.search(out + err)
    with socket.socket() as probe:  # the DICOM port was never opened, and nothing runs on
        assert probe.connect_ex(("127.0.0.1", dicom)) != 0


def test_a_worker_whose_metrics_port_is_taken_exits_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = node_config(tmp_path, web={"enabled": True, "host": "127.0.0.1", "port": port})
        code, out, err, seconds = run_node(cfg, "worker")
    assert code == EXIT_START, out + err
    assert err.strip() == f"dxnode worker: web: 127.0.0.1:{port} is in use (another dxnode?)", err
    assert seconds < 10 and "job process" not in out + err  # nothing was started


def test_second_node_on_the_same_dicom_port_is_refused_at_once(tmp_path: Path) -> None:
    need_tool("echoscu")
    port = free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Node(node_config(tmp_path / "a", node={"port": port}), "--no-web")
    try:
        code, out, err, seconds = run_node(node_config(tmp_path / "b", node={"port": port}), "serve", "--no-web")
        assert code == EXIT_START, out + err
        assert last_line(err) == f"dxnode serve: dicom: 127.0.0.1:{port} is in use (another dxnode?)", err
        assert seconds < 10 and not TRACEBACK_OR_SPAM.search(out + err)
        echo = subprocess.run(["echoscu", "-aec", "DXNODE", "127.0.0.1", str(port)], capture_output=True, timeout=30)
        assert echo.returncode == 0, echo  # the first node is untouched
    finally:
        first.stop()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("tls_same_port", "dicom-tls: 127.0.0.1:{dicom} is also the address of dicom"),
        ("web_same_port", "web: 127.0.0.1:{dicom} is also the address of dicom"),
        ("foreign_address", "dicom: 192.0.2.1:{dicom}: cannot assign this address (not an address of this host?)"),
        (
            "privileged_port",
            "dicom: 127.0.0.1:104: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        ),
    ],
)
def test_impossible_addresses_are_named(tmp_path: Path, case: str, expected: str) -> None:
    dicom = free_port()
    node: dict[str, object] = {"port": dicom}
    web: dict[str, object] = {"enabled": False}
    if case == "tls_same_port":
        node["tls_port"] = dicom
    elif case == "web_same_port":
        web = {"enabled": True, "host": "127.0.0.1", "port": dicom}
    elif case == "foreign_address":
        node["host"] = "192.0.2.1"  # TEST-NET-1: never an address of this host
    elif case == "privileged_port":
        node["port"] = 104
    # Root binds ports below 1024 through CAP_NET_BIND_SERVICE: drop it, as an unprivileged service runs.
    prefix = ("setpriv", "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service")
    code, out, err, _ = run_node(
        node_config(tmp_path, node=node, web=web),
        prefix=prefix if case == "privileged_port" and os.geteuid() == 0 else (),
    )
    assert code == EXIT_START, out + err
    assert last_line(err) == "dxnode serve: " + expected.format(dicom=dicom), err
    assert not TRACEBACK_OR_SPAM.search(out + err)


@pytest.mark.parametrize("part", ["dicom-tls", "database", "model"])
def test_a_part_that_cannot_start_is_named_and_nothing_keeps_running(tmp_path: Path, part: str) -> None:
    dicom = free_port()
    sections: dict[str, dict[str, object]] = {"node": {"port": dicom}}
    if part == "dicom-tls":
        (tmp_path / "cert.pem").write_text("not a certificate\n")
        sections["node"].update(
            tls_port=free_port(), tls_cert=str(tmp_path / "cert.pem"), tls_key=str(tmp_path / "cert.pem")
        )
    elif part == "database":
        sections["database"] = {"url": f"postgresql+psycopg://dxnode@127.0.0.1:{free_port()}/dxnode"}  # nobody listens
    else:
        sections["web"] = {"enabled": True, "host": "127.0.0.1", "port": free_port()}
        sections["model"] = {"bundle": str(tmp_path / "no-such-bundle")}
    code, out, err, _ = run_node(node_config(tmp_path, **sections), "serve")
    assert code == EXIT_START, out + err
    assert last_line(err).startswith(f"dxnode serve: {part}: "), err
    assert not TRACEBACK_OR_SPAM.search(out + err)
    with socket.socket() as probe:  # a listener started before the failing part was closed again
        assert probe.connect_ex(("127.0.0.1", dicom)) != 0


def test_job_processes_that_never_start_end_the_node(tmp_path: Path) -> None:
    """Every job process killed before it is ready (a memory limit below any interpreter's size): the
    node must not go on receiving studies it will never analyse."""
    node = Node(node_config(tmp_path, worklist={"worker_max_rss_mb": 1, "workers": 2}), "--no-web")
    try:
        code = node.proc.wait(90)
        wait_until(lambda: any("dxnode serve: jobs:" in line for line in node.lines), 10, "the last line")
        assert code == EXIT_PART_DIED, "\n".join(node.lines[-30:])
        line = next(line for line in node.lines if line.startswith("dxnode serve: jobs:"))
        assert re.fullmatch(
            r"dxnode serve: jobs: every job process failed to start 3 times in a row "
            r"\(last: stopped for using \d+ MB, over worker_max_rss_mb = 1\)",
            line,
        ), line
        assert len(node.job_pids()) >= 6  # each of the 2 slots was tried 3 times
        assert not TRACEBACK_OR_SPAM.search("\n".join(node.lines))
        for pid in node.job_pids():
            wait_until(lambda pid=pid: not _running(pid), 10, f"job process {pid} gone")
    finally:
        node.stop()


def test_a_model_the_job_processes_cannot_load_ends_the_node(tmp_path: Path) -> None:
    node = Node(node_config(tmp_path, model={"bundle": str(tmp_path / "no-such-bundle")}), "--no-web")
    try:
        code = node.proc.wait(90)
        wait_until(lambda: any("dxnode serve: jobs:" in line for line in node.lines), 10, "the last line")
        assert code == EXIT_PART_DIED, "\n".join(node.lines[-30:])
        line = next(line for line in node.lines if line.startswith("dxnode serve: jobs:"))
        assert line.startswith("dxnode serve: jobs: a job process cannot load the model: ") and "no-such-bundle" in line
    finally:
        node.stop()


def test_a_started_node_stops_cleanly_and_prints_a_pasteable_token_hint(tmp_path: Path) -> None:
    web = free_port()
    cfg = node_config(tmp_path, web={"enabled": True, "host": "127.0.0.1", "port": web})
    node = Node(cfg)
    try:
        node.wait_for(r"dxnode web: http://127\.0\.0\.1:\d+/")
        node.wait_for(r"^role = ")
        metrics_dirs = list((tmp_path / "var" / "metrics").iterdir())
        assert [d.name for d in metrics_dirs] == [f"{socket.gethostname()}-{node.proc.pid}"]
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(60) == 0
    finally:
        node.stop()
    text = "\n".join(node.lines)
    assert not TRACEBACK_OR_SPAM.search(text), text
    hint = text[text.index("and add to the config:") :].splitlines()[1:]
    toml = "\n".join(hint[: next(i for i, line in enumerate(hint) if line.startswith("(or set"))])
    assert tomllib.loads(toml) == {"web": {"tokens": [{"name": "admin", "token": "...", "role": "admin"}]}}
    assert not metrics_dirs[0].exists()  # a clean stop leaves no multiprocess files behind


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_a_web_server_that_stops_is_reported_by_the_watch(tmp_path: Path) -> None:
    """The watch of `dxnode serve` names the web part when uvicorn's thread ends without stop()."""
    from fastapi import FastAPI

    from dxnode.daemon import _part_checks, _watch
    from dxnode.web.server import WebServer

    server = WebServer(FastAPI(), "127.0.0.1", 0)
    server.start()
    assert server.failure() is None
    server.server.should_exit = True  # uvicorn ends its loop: the thread exits as if it had crashed
    failed = _watch(_part_checks(None, None, None, server))
    assert failed is not None and str(failed) == f"web: the web server on 127.0.0.1:{server.port} stopped"
    server.stop()
    assert server.failure() is None  # stopped on purpose: no failure


def test_a_scheduler_that_stops_is_reported_by_the_watch() -> None:
    from apscheduler.schedulers.background import BackgroundScheduler

    from dxnode.daemon import _part_checks, _watch

    scheduler = BackgroundScheduler()
    scheduler.start()
    assert all(check() is None for check in _part_checks(None, scheduler, None, None))
    scheduler.shutdown(wait=True)
    failed = _watch(_part_checks(None, scheduler, None, None))
    assert failed is not None and str(failed).startswith("scheduler: the background scheduler")


def test_an_address_taken_between_the_check_and_the_start_is_still_named(tmp_path: Path) -> None:
    """WebServer binds the socket itself: a port taken after the check gives the same line."""
    from fastapi import FastAPI

    from dxnode.listen import StartError
    from dxnode.web.server import WebServer

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartError, match=rf"^web: 127\.0\.0\.1:{port} is in use \(another dxnode\?\)$"):
            WebServer(FastAPI(), "127.0.0.1", port).start()
