"""``reapi-worker``: the one command and its subcommands' flags.

The subcommands themselves are in :mod:`.commands`; the concrete classes they run (which
CAS, which stager, which sandbox runner) are chosen and wired in :mod:`.compose` only.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from reapi_worker.protos.errors import ReapiError

from . import commands, config
from .logs import configure_logging

log = logging.getLogger("reapi_worker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reapi-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    caps = sub.add_parser("capabilities", help="print what this host supports (bwrap, namespaces, cgroups, FUSE)")
    caps.add_argument("--json", action="store_true", help="machine-readable output")
    caps.set_defaults(run=commands.capabilities)

    bot = sub.add_parser(
        "bot", help="run the worker daemon: take leases from the scheduler's Bots service and execute them",
    )
    config.add_arguments(bot, [config.SERVER, config.EXECUTOR, config.BOT, config.LOGGING])
    bot.set_defaults(run=commands.bot)

    show = sub.add_parser("config", help="print the effective configuration (defaults < --config FILE < flags) as TOML")
    show.add_argument("--dump", action="store_true", help="print it (the default and only action)")
    config.add_arguments(show, [config.SERVER, config.EXECUTOR, config.BOT, config.LOGGING])
    show.set_defaults(run=commands.dump_config)

    run = sub.add_parser("run-action", help="execute one Action from a CAS on this host and print its ActionResult")
    config.add_arguments(run, [config.SERVER, config.EXECUTOR])
    run.add_argument("--action", required=True, metavar="HASH/SIZE", help="digest of the Action in the CAS")
    run.add_argument("--json", action="store_true", help="print the ActionResult as JSON")
    run.set_defaults(run=commands.run_action)

    execute = sub.add_parser(
        "execute",
        help="upload a local input directory and a command, run it through the scheduler "
        "(or on this host with --local), print the result, download the outputs",
    )
    config.add_arguments(execute, [config.SERVER, config.EXECUTOR])
    execute.add_argument(
        "--local", action="store_true",
        help="run on this host's executor instead of submitting to the scheduler's Execution service",
    )
    execute.add_argument("--input-root", default=None, metavar="DIR", help="local directory uploaded as the input root")
    execute.add_argument("--working-directory", default="", help="relative to the input root")
    execute.add_argument("--output-path", action="append", default=[], metavar="PATH", help="repeatable")
    execute.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="repeatable")
    execute.add_argument(
        "--platform", action="append", default=[], metavar="KEY=VALUE",
        help="the Action's platform properties (repeatable); the scheduler matches them to bots",
    )
    execute.add_argument("--timeout", type=float, default=None, help="Action.timeout in seconds")
    execute.add_argument(
        "--cacheable", action="store_true",
        help="let the scheduler answer from, and store into, its action cache (default: always run)",
    )
    execute.add_argument("--download", default=None, metavar="DIR", help="write the outputs here")
    execute.add_argument("--json", action="store_true", help="print the ExecuteResponse as JSON")
    execute.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    execute.set_defaults(run=commands.execute)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        return int(args.run(args) or 0)
    except ReapiError as error:
        print(f"reapi-worker: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
