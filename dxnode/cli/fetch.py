"""`dxnode fetch`: ask the node to fetch studies from a [[sources]] entry and analyse them.

The request is recorded in the database; the running node (`dxnode serve`) carries it out. By
default the command follows it, one line per change, until it is done or failed (exit 0 or 1);
--no-wait prints its id and returns at once.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from typing import Any

from pydantic import ValidationError

from dxnode.cli.common import add_command, open_store, print_json
from dxnode.config import Settings
from dxnode.states import Priority, RequestState


def _priority(text: str) -> Priority:
    """argparse type: STAT, HIGH, MEDIUM, LOW (any case; ROUTINE is MEDIUM)."""
    try:
        return Priority.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_fetch(args: argparse.Namespace, settings: Settings) -> int:
    """Record a fetch request and, unless --no-wait, follow it to its end."""
    # start-up time: only this command loads them (`dxnode --help` stays quick)
    from dxnode.schemas import Identifiers
    from dxnode.sources.fetch import request_fetch, request_out

    try:
        ids = Identifiers(
            study_instance_uid=args.study or "",
            accession_number=args.accession or "",
            patient_id=args.patient or "",
            modality=args.modality or "",
            since=args.since or "",
        )
    except ValidationError as exc:
        print(f"dxnode fetch: {exc.errors()[0]['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    store = open_store(settings)
    actor = f"cli:{getpass.getuser()}"
    try:
        request_id = request_fetch(
            store, settings, args.source, ids, args.priority, args.model or "", args.destination or [], actor, "local"
        )
    except ValueError as exc:
        print(f"dxnode fetch: {exc}", file=sys.stderr)
        return 2
    if not args.wait:
        print(f"request {request_id}: fetch {ids.describe()} from {args.source} ({args.priority})")
        return 0
    deadline, last = time.monotonic() + args.timeout, ""
    while True:
        with store.session() as s:
            out = request_out(s, request_id)
        assert out is not None
        line = f"request {request_id}: {out.progress}"
        if line != last and not args.json:
            print(line, flush=True)
            last = line
        if out.state in (RequestState.DONE, RequestState.FAILED):
            break
        if time.monotonic() > deadline:
            print(
                f"dxnode fetch: request {request_id} is still {out.state} after {args.timeout:g} s "
                "(is `dxnode serve` running?); follow it with GET /api/requests/{id}",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.5)
    if args.json:
        print_json(out)
    else:
        for job in out.jobs:
            print(f"  job {job.id} {job.state}: study {job.study_instance_uid}")
    return 0 if out.state == RequestState.DONE else 1


def add_parsers(sub: Any) -> None:
    """fetch."""
    sp = add_command(
        sub,
        "fetch",
        cmd_fetch,
        "fetch studies from a [[sources]] entry and analyse them (the running node carries the request out)",
    )
    sp.add_argument("--source", required=True, metavar="NAME", help="the [[sources]] name")
    what = sp.add_mutually_exclusive_group(required=True)
    what.add_argument("--study", metavar="UID", help="a Study Instance UID")
    what.add_argument("--accession", metavar="N", help="the studies of an accession number")
    what.add_argument("--patient", metavar="ID", help="the studies of a patient (narrow with --modality, --since)")
    sp.add_argument("--modality", metavar="M", help="with --patient: studies with this modality")
    sp.add_argument("--since", metavar="DATE", help="with --patient: studies on or after this date (YYYY-MM-DD)")
    sp.add_argument("--priority", type=_priority, default=Priority.MEDIUM, help="STAT, HIGH, MEDIUM or LOW")
    sp.add_argument("--model", metavar="NAME", help="run this [[models]] entry (default: routed as usual)")
    sp.add_argument("--destination", action="append", metavar="NAME", help="a [[destinations]] name (repeatable)")
    sp.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True, help="follow it to its end")
    sp.add_argument("--timeout", type=float, default=1800, metavar="S", help="stop following after this many seconds")
    sp.add_argument("--json", action="store_true", help="print the request at its end as one JSON object")
