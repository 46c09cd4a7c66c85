"""`dxnode config`: show the effective configuration, or check a file."""

from __future__ import annotations

import argparse
from typing import Any

from dxnode.cli.common import add_command, print_json
from dxnode.config import Settings, load_settings


def cmd_config_show(args: argparse.Namespace, settings: Settings) -> int:
    """Print the effective configuration (file + environment), secrets masked."""
    # start-up time: only this command loads it (`dxnode --help` stays quick)
    from dxnode.config import SECRET, has_secrets, masked, to_toml

    data = masked(settings)
    if args.json:
        print_json(data)
    else:
        print(f"# effective configuration: {settings.source} + DXNODE_* environment")
        if has_secrets(data):
            print(f"# secrets are shown as {SECRET} (tokens, session secret) or *** (database password):")
            print("# this output is refused as a configuration until the real values are put back")
        print(to_toml(data), end="")
    return 0


def cmd_config_check(args: argparse.Namespace, settings: Settings) -> int:
    """Validate a config file (and the environment); exit 2 naming the bad key."""
    checked = load_settings(args.path or args.config)  # ConfigError is reported by main()
    print(f"{checked.source}: ok")
    return 0


def add_parsers(sub: Any) -> None:
    """config show and config check."""
    cfg = add_command(sub, "config", lambda a, s: 2, "show or check the configuration")
    cfs = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    cs = cfs.add_parser("show", help="print the effective configuration (file + environment), secrets masked")
    cs.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    cs.set_defaults(handler=cmd_config_show)
    cc = cfs.add_parser("check", help="validate a config file and the DXNODE_* environment; exit 2 naming the bad key")
    cc.add_argument(
        "path", nargs="?", metavar="PATH", help="config file (default: --config, $DXNODE_CONFIG or bundled)"
    )
    cc.set_defaults(handler=cmd_config_check, own_settings=True)
