"""`dxnode purge`: retention on demand (what [retention] asks for now), a dry run, or the reconcile."""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from dxnode.cli.common import add_command, open_store, print_json
from dxnode.config import Settings

MB = 1024 * 1024


def _mb(n: int) -> str:
    return f"{n / MB:.1f} MB"


def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    """Purge finished studies as [retention] says; --dry-run lists them; --reconcile checks files and rows."""
    if args.reconcile:
        return _reconcile(args, settings)
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.lifecycle.purge import purge, retention_on

    if not retention_on(settings):
        print("retention is off ([retention] keep_days, max_storage_mb and results_keep_days are 0): nothing purged")
        return 0
    actor = f"cli:{getpass.getuser()}"
    run = purge(open_store(settings), settings, actor, dry_run=args.dry_run)
    if args.json:
        print_json(
            {
                "dry_run": run.dry_run,
                "purged": [vars(p) for p in run.purged],
                "audit_rows": run.audit_rows,
                "stored_before": run.stored_before,
                "stored_after": run.stored_after,
            }
        )
        return 0
    verb = "would purge" if run.dry_run else "purged"
    for p in run.purged:
        what = "instances and results" if p.results else "instances"
        print(f"{verb} {p.study_uid} ({p.reason}): {p.instances} {what}, {_mb(p.bytes)}")
    quota = settings.retention.max_storage_mb
    print(
        f"{verb} {len(run.purged)} stud{'y' if len(run.purged) == 1 else 'ies'}, {_mb(run.stored_before - run.stored_after)};"
        f" received instances {_mb(run.stored_after)}"
        + (f" of a {quota} MB quota" if quota else "")
        + (f"; {run.audit_rows} audit rows past results_keep_days removed" if run.audit_rows else "")
    )
    return 0


def _reconcile(args: argparse.Namespace, settings: Settings) -> int:
    """Finish interrupted purges, then report files without rows and rows without files (exit 1 if any)."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.lifecycle.reconcile import reconcile

    out = reconcile(open_store(settings), settings, f"cli:{getpass.getuser()}", min_age_s=args.min_age)
    if args.json:
        print_json(
            {
                "finished": [vars(p) for p in out.finished],
                "expired": out.expired,
                "files_without_rows": out.files_without_rows,
                "rows_without_files": out.rows_without_files,
            }
        )
        return 0 if out.consistent else 1
    for p in out.finished:
        print(f"finished an interrupted purge of {p.study_uid}: {p.instances} instances, {_mb(p.bytes)}")
    if out.expired:
        print(f"finished {out.expired} interrupted results removal(s)")
    for path in out.files_without_rows:
        print(f"file without a row: {path}")
    for path in out.rows_without_files:
        print(f"row without a file: {path}")
    print(
        f"reconcile: {len(out.finished)} interrupted purge(s) finished, {len(out.files_without_rows)} file(s) without a row,"
        f" {len(out.rows_without_files)} row(s) without a file"
    )
    return 0 if out.consistent else 1


def add_parsers(sub: Any) -> None:
    """purge [--dry-run | --reconcile]."""
    p = add_command(sub, "purge", cmd_purge, "purge finished studies as [retention] says (audited)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="list what would be purged; change nothing")
    mode.add_argument(
        "--reconcile",
        action="store_true",
        help="finish purges a crash interrupted, then list files without rows and rows without files (exit 1 if any)",
    )
    p.add_argument(
        "--min-age",
        type=float,
        default=None,
        metavar="SECONDS",
        help="--reconcile: skip files younger than this (default: [node] dimse_timeout + [database] busy_timeout_s)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
