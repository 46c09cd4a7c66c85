"""`dxnode db`: the database schema (upgrade, current)."""

from __future__ import annotations

import argparse
from typing import Any

from dxnode.cli.common import add_command, open_store
from dxnode.config import Settings


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    """Apply the Alembic migrations."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.store import current_revision
    from dxnode.store import open_store as open_node_store

    store = open_node_store(settings, migrate=True, create=True)
    print(f"database at revision {current_revision(store)}")
    return 0


def cmd_db_current(args: argparse.Namespace, settings: Settings) -> int:
    """Print the schema revision."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.store import current_revision

    print(current_revision(open_store(settings, migrate=False)) or "empty (run `dxnode db upgrade`)")
    return 0


def add_parsers(sub: Any) -> None:
    """db upgrade and db current."""
    db = add_command(sub, "db", lambda a, s: 2, "database schema")
    dbs = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    dbs.add_parser("upgrade", help="apply migrations").set_defaults(handler=cmd_db_upgrade)
    dbs.add_parser("current", help="print the schema revision").set_defaults(handler=cmd_db_current)
