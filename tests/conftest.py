"""Shared fixtures: free ports, real databases (SQLite files and PostgreSQL), test peers.

Tests that need a Debian test peer (dcmtk, dicom3tools, pixelmed, orthanc, chromium,
postgresql) skip on a machine without it, unless DXNODE_REQUIRE_PEERS=1 (set by .ci/run),
where a missing peer is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRE_PEERS = os.environ.get("DXNODE_REQUIRE_PEERS") == "1"
PG_ADMIN_URL = os.environ.get("DXNODE_TEST_PG_URL", "postgresql+psycopg://dxnode:dxnode@127.0.0.1:5432/postgres")


def need(condition: bool, what: str) -> None:
    """Skip the test when a peer is missing, or fail it when DXNODE_REQUIRE_PEERS=1."""
    if condition:
        return
    if REQUIRE_PEERS:
        pytest.fail(f"test peer missing: {what} (DXNODE_REQUIRE_PEERS=1)")
    pytest.skip(f"test peer missing: {what}")


def need_tool(*names: str) -> None:
    """Require command-line tools on PATH."""
    for name in names:
        need(shutil.which(name) is not None, name)


def _cgroup_root() -> Path | None:
    """The cgroup v1 memory folder this process is in, when a child can be made there."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            root = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            probe = root / f"dxnode-probe-{uuid.uuid4().hex[:8]}"
            try:
                probe.mkdir()
                probe.rmdir()
            except OSError:
                return None
            return root
    return None


@contextlib.contextmanager
def memory_cgroup(limit_mb: int) -> Iterator[Path]:
    """A child of the cgroup v1 memory controller limited to limit_mb (memory and, with swap, memory+swap).

    Put a process in it by writing its pid to cgroup.procs. Skips without a writable controller, or fails
    when DXNODE_REQUIRE_PEERS=1 (CI)."""
    root = _cgroup_root()
    need(root is not None, "a writable cgroup v1 memory controller (/sys/fs/cgroup/memory)")
    assert root is not None
    folder = root / f"dxnode-test-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    try:
        (folder / "memory.limit_in_bytes").write_text(str(limit_mb << 20))
        if (folder / "memory.memsw.limit_in_bytes").exists():  # no swapping out of the limit
            (folder / "memory.memsw.limit_in_bytes").write_text(str(limit_mb << 20))
        yield folder
    finally:
        with contextlib.suppress(OSError):
            folder.rmdir()


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


def _pg_available() -> bool:
    try:
        import sqlalchemy

        eng = sqlalchemy.create_engine(PG_ADMIN_URL)
        with eng.connect() as c:
            c.execute(sqlalchemy.text("select 1"))
        eng.dispose()
        return True
    except Exception:
        return False


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped after the test."""
    need(_pg_available(), f"PostgreSQL at {PG_ADMIN_URL}")
    import sqlalchemy

    name = "dxtest_" + uuid.uuid4().hex[:12]
    admin = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    yield url
    with admin.connect() as c:
        c.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated database URL: a real SQLite file, and a real PostgreSQL database."""
    from dxnode.store import upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'dxnode.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    upgrade(url)
    return url


@pytest.fixture
def store(db_url: str) -> Iterator[object]:
    """A Store on db_url (SQLite and PostgreSQL)."""
    from dxnode.store import Store

    s = Store(db_url)
    yield s
    s.dispose()


def run(cmd: list[str], timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
