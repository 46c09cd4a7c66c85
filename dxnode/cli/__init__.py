"""The ``dxnode`` command: run the node, query the store, predict, train and evaluate models.

One module per command group (node, db, config, reads, admin, models, fetch, purge); this one assembles the
parser and runs a command, turning every error into one line and an exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from dxnode import __version__
from dxnode.cli import admin, config, db, fetch, models, node, purge, reads
from dxnode.cli.common import HelpFormatter, Parser
from dxnode.config import ConfigError, Settings, load_settings
from dxnode.logs import setup_logging

log = logging.getLogger("dxnode")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand, each group adding its own."""
    p = Parser(prog="dxnode", description="dxnode: a DICOM AI node beside your PACS.", formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"dxnode {__version__}")
    p.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $DXNODE_CONFIG, else the bundled dxnode/resources/dxnode.toml)",
    )
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override [logging] level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    node.add_parsers(sub)
    db.add_parsers(sub)
    config.add_parsers(sub)
    outbox = reads.add_parsers(sub)
    admin.add_outbox_actions(outbox)
    admin.add_parsers(sub)
    models.add_parsers(sub)
    fetch.add_parsers(sub)
    purge.add_parsers(sub)
    return p


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what `seq 100000 | head` reports for seq


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dxnode`` console script.

    Exit status: 0 ok, 1 failure (one line on stderr), 2 usage or configuration error, 130 on
    Ctrl-C, 141 when the reader of stdout went away (``dxnode outbox | head``), quietly.
    """
    try:
        return _run(argv)
    except BrokenPipeError:
        # Nothing more can be written to the pipe; point stdout at /dev/null so that the
        # interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _run(argv: Sequence[str] | None) -> int:
    """Parse, load the configuration and run the command; every error becomes one line and a status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # `config check` reads the file it is given itself: a broken default must not stop it
        settings = Settings.model_construct() if getattr(args, "own_settings", False) else load_settings(args.config)
    except ConfigError as exc:
        print(f"dxnode: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or settings.logging.level)
    try:
        status = int(args.handler(args, settings))
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except ConfigError as exc:
        print(f"dxnode: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise
    except Exception as exc:  # an admin gets one line and an exit status, not a traceback
        log.debug("traceback", exc_info=True)
        message = str(exc.args[0]) if isinstance(exc, LookupError) and exc.args else str(exc)
        actions = (getattr(args, f"{args.command}_command", None),)  # db current, model info, ...
        command = " ".join([args.command, *(a for a in actions if a)])
        print(f"dxnode {command}: {message or type(exc).__name__}".splitlines()[0], file=sys.stderr)
        return 1
