"""Running the node: serve, worker, web, and echo (a C-ECHO to another node)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dxnode.cli.common import add_command, open_store, port_number
from dxnode.config import Settings


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the node: SCP, worklist, job processes, dispatcher and web server."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.daemon import serve

    return serve(settings, web=not args.no_web, log_level=args.log_level or settings.logging.level)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run only job processes and the outbox (scale-out beside a receiving node)."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.daemon import work

    return work(settings, log_level=args.log_level or settings.logging.level)


def cmd_web(args: argparse.Namespace, settings: Settings) -> int:
    """Run only the REST API and web pages (on a database that serve or db upgrade made)."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.daemon import serve_web_only

    open_store(settings, migrate=False).dispose()
    return serve_web_only(settings)


def cmd_echo(args: argparse.Namespace, settings: Settings) -> int:
    """C-ECHO a remote node."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.scp import echo

    ok, message = echo(args.host, args.port, args.aet or settings.node.ae_title, args.aec, timeout=args.timeout)
    if not ok:
        hint = "; give its AE title with --aec" if "called AE title not recognised" in message else ""
        print(f"dxnode echo: {message}{hint}", file=sys.stderr)
        return 1
    print(message)
    return 0


def add_parsers(sub: Any) -> None:
    """serve, worker, web and echo."""
    sp = add_command(sub, "serve", cmd_serve, "run the node: DICOM SCP, worklist, job processes, outbox and web server")
    sp.add_argument("--no-web", action="store_true", help="do not start the web server")
    add_command(
        sub,
        "worker",
        cmd_worker,
        "run only job processes and the outbox, on the configured (shared PostgreSQL) database and data dir",
    )
    add_command(sub, "web", cmd_web, "run only the REST API and web pages")

    sp = add_command(sub, "echo", cmd_echo, "C-ECHO a DICOM node (verification)")
    sp.add_argument("host")
    sp.add_argument("port", type=port_number, help="TCP port (1-65535)")
    sp.add_argument("--aec", default="ANY-SCP", help="called AE title")
    sp.add_argument("--aet", help="calling AE title (default: [node] ae_title)")
    sp.add_argument("--timeout", type=float, default=10, help="seconds")
