"""The store's readiness check: a boolean for /readyz, the reason logged once per change."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import free_port

from dxnode.store import Store, upgrade


def test_ping_logs_why_the_database_does_not_answer_once_per_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = Store(f"postgresql+psycopg://dxnode:pg-password@127.0.0.1:{free_port()}/dxnode")
    url = f"sqlite:///{tmp_path / 'dxnode.db'}"
    upgrade(url)
    up = Store(url)
    try:
        with caplog.at_level(logging.INFO, logger="dxnode.store"):
            assert [down.ping(), down.ping(), down.ping()] == [False, False, False]
            assert up.ping() and up.ping()
        lines = [r.getMessage() for r in caplog.records if r.name == "dxnode.store"]
        assert len(lines) == 1, lines
        assert "does not answer" in lines[0] and "127.0.0.1" in lines[0] and "pg-password" not in lines[0]
        assert "refused" in lines[0].lower() or "connect" in lines[0].lower(), lines[0]
    finally:
        down.dispose()
        up.dispose()


@pytest.mark.postgres
def test_ping_logs_when_the_database_answers_again(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A database dropped while the node runs, then made again: one line each way."""
    import sqlalchemy
    from conftest import PG_ADMIN_URL

    name = pg_url.rsplit("/", 1)[1]
    store = Store(pg_url)
    admin = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with caplog.at_level(logging.INFO, logger="dxnode.store"):
            assert store.ping()
            store.dispose()
            with admin.connect() as c:
                c.execute(sqlalchemy.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            assert not store.ping() and not store.ping()
            with admin.connect() as c:
                c.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
            assert store.ping() and store.ping()
        lines = [r.getMessage() for r in caplog.records if r.name == "dxnode.store"]
        assert len(lines) == 2 and "does not answer" in lines[0] and name in lines[0], lines
        assert "answers again" in lines[1], lines
    finally:
        store.dispose()
        admin.dispose()
