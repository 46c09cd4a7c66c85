"""The read commands: studies, jobs, results and outbox lists (the queries of GET /api/...)."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Any

from dxnode.cli.common import add_command, print_list
from dxnode.config import Settings
from dxnode.schemas import DeliveryOut, JobOut, ResultOut, StudyOut
from dxnode.states import DeliveryState, JobState


def cmd_studies(args: argparse.Namespace, settings: Settings) -> int:
    """List received studies."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.queries import StudyFilter, list_studies

    return print_list(settings, StudyOut, lambda s: list_studies(s, StudyFilter(limit=args.limit)), args.json)


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    """List jobs."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.queries import JobFilter, list_jobs

    f = JobFilter(state=JobState(args.state) if args.state else None, limit=args.limit)
    return print_list(settings, JobOut, lambda s: list_jobs(s, f), args.json)


def cmd_results(args: argparse.Namespace, settings: Settings) -> int:
    """List study-level findings (the same query as GET /api/results)."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.queries import ResultFilter, list_results, results_csv

    since = None
    if args.since:
        try:
            since = dt.datetime.fromisoformat(args.since).replace(tzinfo=dt.UTC)
        except ValueError:
            print(f"dxnode: --since {args.since!r} is not a date (YYYY-MM-DD)", file=sys.stderr)
            return 2
    if args.min_prob is not None and not 0 <= args.min_prob <= 1:
        print(f"dxnode: --min-prob {args.min_prob} is not a probability (0 to 1)", file=sys.stderr)
        return 2
    if args.limit < 1:
        print("dxnode: --limit must be at least 1", file=sys.stderr)
        return 2
    f = ResultFilter(
        label=args.label, min_probability=args.min_prob, positive_only=args.positive, since=since, limit=args.limit
    )
    return print_list(
        settings,
        ResultOut,
        lambda s: list_results(s, f),
        args.json,
        audit_action="cli.results.read",  # results carry patient IDs
        text=results_csv if args.csv else None,
    )


def cmd_outbox(args: argparse.Namespace, settings: Settings) -> int:
    """List outbox deliveries, each with the address its destination has in this configuration."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.queries import list_deliveries

    if args.limit < 1:
        print("dxnode outbox: --limit must be at least 1", file=sys.stderr)
        return 2
    return print_list(
        settings,
        DeliveryOut,
        lambda s: list_deliveries(
            s,
            state=DeliveryState(args.state) if args.state else None,
            destination=args.destination,
            limit=args.limit,
            study_instance_uid=args.study,
            destinations=settings.destinations,
        ),
        args.json,
        cells=lambda r: r.model_dump() | {"address": r.address or "(not configured)"},
    )


def _json_and_limit(sp: argparse.ArgumentParser, limit: int) -> None:
    sp.add_argument("--json", action="store_true", help="print one JSON array")
    sp.add_argument("--limit", type=int, default=limit, help="most rows printed")


def add_parsers(sub: Any) -> argparse.ArgumentParser:
    """studies, jobs, results and outbox; returns the outbox parser (its actions are admin commands)."""
    sp = add_command(sub, "studies", cmd_studies, "list received studies")
    _json_and_limit(sp, 100)

    sp = add_command(
        sub,
        "jobs",
        cmd_jobs,
        "list jobs (the [[models]] entry each was routed to, why one failed or was skipped; --json adds every routing line)",
    )
    sp.add_argument("--state", choices=[str(s) for s in JobState], help="only jobs in this state")
    _json_and_limit(sp, 100)

    sp = add_command(sub, "results", cmd_results, "list study-level findings")
    sp.add_argument("--label", help="only this label")
    sp.add_argument("--min-prob", type=float, help="only probabilities at or above this (0 to 1)")
    sp.add_argument("--positive", action="store_true", help="positive findings only")
    sp.add_argument("--since", help="date YYYY-MM-DD (UTC)")
    sp.add_argument("--limit", type=int, default=1000, help="most rows printed")
    fmt = sp.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print one JSON array")
    fmt.add_argument("--csv", action="store_true", help="print CSV (the columns of /api/results.csv)")

    sp = add_command(
        sub,
        "outbox",
        cmd_outbox,
        "list deliveries of results to destinations (with the address each goes to now); cancel or retry some",
    )
    sp.add_argument("--state", choices=[str(s) for s in DeliveryState], help="only deliveries in this state")
    sp.add_argument("--destination", metavar="NAME", help="only deliveries to this [[destinations]] name")
    sp.add_argument("--study", metavar="UID", help="only deliveries of this Study Instance UID")
    _json_and_limit(sp, 100)
    return sp
