"""What the command groups share: the parser classes, printing JSON or tables, opening the store, listing."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from dxnode.config import Settings
from dxnode.schemas import TableRow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from dxnode.store import Store

Handler = Callable[[argparse.Namespace, Settings], int]
Row = TypeVar("Row", bound=TableRow)


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> Any:  # argparse's own signature returns NoReturn
        self.exit(2, f"{self.prog}: {message}; see `{self.prog} --help`\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, unless it is empty or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def add_command(sub: Any, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
    """A subcommand of `dxnode` run by handler (sub: the subparsers of the top-level parser)."""
    sp: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    sp.set_defaults(handler=handler)
    return sp


def _plain(value: Any) -> Any:
    """JSON-ready data: pydantic models (the contracts of dxnode.schemas) as the API serialises them."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def print_json(value: Any) -> None:
    """Print one JSON document to stdout."""
    json.dump(_plain(value), sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_table(items: Sequence[BaseModel] | Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Print rows as a plain aligned text table."""
    rows: list[dict[str, Any]] = [_plain(r) for r in items]
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "") if r.get(c) is not None else "").ljust(widths[c]) for c in columns))


def open_store(settings: Settings, migrate: bool = True) -> Store:
    """Open the configured database for a command that reads or edits it: a missing SQLite file is
    refused (DatabaseUnavailable naming its path), never created; only serve, worker and db upgrade create it."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.store import open_store as open_node_store

    return open_node_store(settings, migrate, create=False)


def port_number(text: str) -> int:
    """argparse type: a TCP port from 1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port number (1-65535)")
    return value


def print_list(
    settings: Settings,
    model: type[Row],
    query: Callable[[Session], list[Row]],
    as_json: bool,
    audit_action: str = "",
    text: Callable[[list[Row]], str] | None = None,
    cells: Callable[[Row], dict[str, Any]] | None = None,
) -> int:
    """Open the store, run a read query of dxnode.queries and print its rows: one JSON array, the
    text that `text` makes of them (e.g. CSV), or a table of the model's ``table_columns``
    (each row as `cells` shows it, if given). audit_action: audit the read (rows with patient data)."""
    with open_store(settings).session() as session:
        rows = query(session)
        if audit_action:
            # start-up time: only this command loads it (`dxnode --help` stays quick)
            from dxnode.store import audit

            audit(session, "cli", audit_action, source="local", user=getpass.getuser(), rows=len(rows))
    if as_json:
        print_json(rows)
    elif text is not None:
        sys.stdout.write(text(rows))
    else:
        print_table([cells(r) for r in rows] if cells else rows, model.table_columns)
    return 0
