"""``reapi-worker``: the one command, and the composition root.

This is the only module that picks concrete classes (which CAS, which stager, which
sandbox runner) and wires them together; everything below it takes its collaborators
through constructors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from reapi_worker.protos.errors import ReapiError

from . import commands

log = logging.getLogger("reapi_worker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reapi-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    caps = sub.add_parser("capabilities", help="print what this host supports (bwrap, namespaces, cgroups, FUSE)")
    caps.add_argument("--json", action="store_true", help="machine-readable output")
    caps.set_defaults(run=commands.capabilities)

    run = sub.add_parser("run-action", help="execute one Action from a CAS and print its ActionResult")
    _remote_args(run)
    run.add_argument("--action", required=True, metavar="HASH/SIZE", help="digest of the Action in the CAS")
    _executor_args(run)
    run.add_argument("--json", action="store_true", help="print the ActionResult as JSON")
    run.set_defaults(run=commands.run_action)

    execute = sub.add_parser(
        "execute",
        help="upload a local input directory and a command, run it on this host's executor, download outputs",
    )
    _remote_args(execute)
    execute.add_argument("--input-root", default=None, metavar="DIR", help="local directory uploaded as the input root")
    execute.add_argument("--working-directory", default="", help="relative to the input root")
    execute.add_argument("--output-path", action="append", default=[], metavar="PATH", help="repeatable")
    execute.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="repeatable")
    execute.add_argument("--platform", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    execute.add_argument("--timeout", type=float, default=None, help="Action.timeout in seconds")
    execute.add_argument("--download", default=None, metavar="DIR", help="write the outputs here")
    _executor_args(execute)
    execute.add_argument("--json", action="store_true", help="print the ActionResult as JSON")
    execute.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    execute.set_defaults(run=commands.execute)
    return parser


def _remote_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--remote", required=True, metavar="URL", help="CAS endpoint, e.g. grpc://127.0.0.1:50051")
    parser.add_argument("--instance-name", default="", metavar="NAME")


def _executor_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", default="/var/cache/reapi-worker", metavar="DIR")
    parser.add_argument("--cache-size", default="10G", metavar="SIZE", help="e.g. 500M, 10G (default 10G)")
    parser.add_argument("--build-root", default="/var/lib/reapi-worker/builds", metavar="DIR")
    parser.add_argument("--max-action-timeout", type=float, default=3600.0, metavar="SECONDS")
    parser.add_argument("--sandbox-uid", type=int, default=65534, help="unprivileged uid the action runs as")
    parser.add_argument("--sandbox-gid", type=int, default=65534)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.run(args) or 0)
    except ReapiError as error:
        print(f"reapi-worker: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
