"""The admin commands that change the store: requeue, complete, resend, outbox cancel and retry (audited)."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import TYPE_CHECKING, Any

from dxnode.cli.common import add_command, open_store, print_json
from dxnode.config import Settings

if TYPE_CHECKING:
    from dxnode.outbox.dispatch import Selection


def cmd_requeue(args: argparse.Namespace, settings: Settings) -> int:
    """Queue a study again (re-run its analysis)."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.worklist.queue import requeue_study

    with open_store(settings).session() as session:
        job_id = requeue_study(session, args.study, actor="cli")
    print(f"queued job {job_id}")
    return 0


def cmd_complete(args: argparse.Namespace, settings: Settings) -> int:
    """Force a study complete now instead of waiting for stable_seconds."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.worklist.queue import requeue_study

    with open_store(settings).session() as session:
        job_id = requeue_study(session, args.study, actor="cli", action="study.force_complete")
    print(f"queued job {job_id}")
    return 0


def cmd_resend(args: argparse.Namespace, settings: Settings) -> int:
    """Re-queue deliveries of an output or a study."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.outbox.dispatch import resend

    with open_store(settings).session() as session:
        n = resend(session, args.target, actor="cli")
    if not n:
        print(
            f"dxnode: no delivery for {args.target!r} (give an output SOP Instance UID, a Study Instance UID or a delivery id)",
            file=sys.stderr,
        )
        return 1
    print(f"re-queued {n} deliver{'y' if n == 1 else 'ies'}")
    return 0


def _outbox_selection(args: argparse.Namespace) -> Selection | None:
    """The dispatch.Selection of `outbox cancel|retry`, or None after saying that one is needed."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.outbox.dispatch import Selection

    sel = Selection(tuple(args.delivery or ()), args.study or "", args.destination or "")
    if sel.empty:
        print(
            f"dxnode outbox {args.outbox_command}: give --delivery ID, --study UID or --destination NAME",
            file=sys.stderr,
        )
        return None
    return sel


def _outbox_change(args: argparse.Namespace, settings: Settings, done: str) -> int:
    """Run `outbox cancel` or `outbox retry` and report it; exit 1 if nothing matched or changed."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.outbox import dispatch

    sel = _outbox_selection(args)
    if sel is None:
        return 2
    with open_store(settings).session() as session:
        if args.outbox_command == "cancel":
            change = dispatch.cancel(session, sel, actor="cli", source="local", user=getpass.getuser())
        else:
            change = dispatch.retry(session, sel, settings, actor="cli", source="local", user=getpass.getuser())
    if args.json:
        print_json(change)
    elif change.matched:
        n = len(change.changed)
        print(f"{done} {n} deliver{'y' if n == 1 else 'ies'}" + (f" ({_ids(change.changed)})" if n else ""))
        for reason, ids in change.skipped.items():
            print(f"left {len(ids)} as they were, {reason} ({_ids(ids)})")
    if not change.matched:
        print(f"dxnode outbox {args.outbox_command}: no delivery matches {change.selection}", file=sys.stderr)
        return 1
    # Success: something changed, or every row was cancelled already (cancel twice is no error).
    return 0 if change.changed or set(change.skipped) <= {"already cancelled"} else 1


def _ids(ids: list[int], most: int = 20) -> str:
    """'ids 1, 2, 3' (the first 20, then how many more)."""
    text = ", ".join(map(str, ids[:most]))
    return f"id{'s' if len(ids) > 1 else ''} {text}" + (f" and {len(ids) - most} more" if len(ids) > most else "")


def cmd_outbox_cancel(args: argparse.Namespace, settings: Settings) -> int:
    """Cancel unsent deliveries: they are never sent (audited)."""
    return _outbox_change(args, settings, "cancelled")


def cmd_outbox_retry(args: argparse.Namespace, settings: Settings) -> int:
    """Send unsent deliveries at once, to their destination as configured now (audited)."""
    return _outbox_change(args, settings, "re-queued")


def add_parsers(sub: Any) -> None:
    """requeue, complete and resend."""
    sp = add_command(sub, "requeue", cmd_requeue, "queue a study's analysis again (routing rules are applied anew)")
    sp.add_argument("study", help="Study Instance UID")
    sp = add_command(sub, "complete", cmd_complete, "force a study complete now (do not wait for stable_seconds)")
    sp.add_argument("study", help="Study Instance UID")
    sp = add_command(
        sub, "resend", cmd_resend, "re-queue delivery of an output (SOP Instance UID) or of a study's outputs"
    )
    sp.add_argument("target", metavar="OUTPUT_OR_STUDY")


def add_outbox_actions(outbox: argparse.ArgumentParser) -> None:
    """outbox cancel and outbox retry, under the outbox list command."""
    obs = outbox.add_subparsers(dest="outbox_command", metavar="[ACTION]")
    for name, handler, text in (
        ("cancel", cmd_outbox_cancel, "cancel unsent deliveries (pending, failed, orphaned): never sent; audited"),
        (
            "retry",
            cmd_outbox_retry,
            "send unsent deliveries (pending, failed, cancelled, orphaned) at once, to the address configured now; "
            "audited",
        ),
    ):
        op = obs.add_parser(name, help=text, description=text + ". Rows must match every option given.")
        op.add_argument("--delivery", type=int, action="append", metavar="ID", help="a delivery id (repeatable)")
        op.add_argument("--study", metavar="UID", help="the deliveries of this Study Instance UID")
        op.add_argument("--destination", metavar="NAME", help="the deliveries to this [[destinations]] name")
        op.add_argument("--json", action="store_true", help="print what changed as one JSON object")
        op.set_defaults(handler=handler)
