"""The CLI's subcommands (the parser lives in :mod:`.cli`): each reads its config, asks the
composition root (:mod:`.compose`) for what it needs, uses it and prints the result."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from google.protobuf import json_format

from reapi_worker.protos import code_pb2, operations_pb2, re_pb2, status_pb2
from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.sandbox.probe import probe_host
from reapi_worker.storage.digests import Digest

from .client import CommandSpec, ExecutionClient, build_action, download_outputs
from .compose import open_bot, open_client_store, open_executor
from .config import config_from_args, dump_toml
from .logs import configure_logging

log = logging.getLogger("reapi_worker")


def capabilities(args: argparse.Namespace) -> int:
    caps = probe_host()
    facts = {
        key: sorted(value) if isinstance(value, frozenset) else value
        for key, value in dataclasses.asdict(caps).items()
    }
    facts["root_modes"] = [mode.value for mode in caps.root_modes]
    if args.json:
        print(json.dumps(facts, indent=2, sort_keys=True))
    else:
        width = max(len(key) for key in facts)
        for key, value in facts.items():
            print(f"{key:<{width}}  {value}")
    return 0 if caps.bwrap_path and caps.user_namespaces else 1


def run_action(args: argparse.Namespace) -> int:
    digest = Digest.parse(args.action)
    with open_executor(config_from_args(args)) as graph:
        outcome = graph.executor.execute(digest)
    _print_outcome(outcome.status, outcome.result, args.json)
    return 0 if outcome.ok else 1


def execute(args: argparse.Namespace) -> int:
    """Upload a local input root and a Command, run it (through the scheduler, or here with
    ``--local``), print the result and download the outputs."""
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise InvalidArgument("give the command after --")
    spec = CommandSpec(
        arguments=tuple(argv),
        environment=tuple(sorted(_pairs(args.env, "--env").items())),
        output_paths=tuple(args.output_path),
        working_directory=args.working_directory,
        platform=tuple(sorted(_pairs(args.platform, "--platform").items())),
        timeout=args.timeout,
        do_not_cache=not args.cacheable,
    )
    cfg = config_from_args(args)
    if args.local:
        with open_executor(cfg) as graph:
            action_digest, blobs = build_action(graph.store, spec, args.input_root)
            graph.store.upload_missing(blobs)
            outcome = graph.executor.execute(action_digest)
            if args.download and outcome.ok:
                download_outputs(graph.store, outcome.result, args.download)
        status, result = outcome.status, outcome.result
    else:
        with open_client_store(cfg) as (store, channel):
            action_digest, blobs = build_action(store, spec, args.input_root)
            uploaded = store.upload_missing(blobs)
            log.info("action %s: uploaded %d of %d blob(s)", action_digest, len(uploaded), len(blobs))

            def show(operation: operations_pb2.Operation) -> None:
                metadata = re_pb2.ExecuteOperationMetadata()
                operation.metadata.Unpack(metadata)
                stage = re_pb2.ExecutionStage.Value.Name(metadata.stage)
                log.info("operation %s: %s", operation.name, stage)

            client = ExecutionClient(channel, cfg.instance_name)
            execution = client.execute(action_digest, skip_cache_lookup=not args.cacheable, on_operation=show)
            status, result = execution.response.status, execution.response.result
            if args.download and execution.ok:
                for path in download_outputs(store, result, args.download):
                    log.info("downloaded %s", os.path.join(args.download, path))
    _print_outcome(status, result, args.json)
    return 0 if status.code == code_pb2.OK and result.exit_code == 0 else 1


def bot(args: argparse.Namespace) -> int:
    """The daemon: register with the scheduler and execute its leases until SIGTERM."""
    cfg = config_from_args(args)
    configure_logging(args.log_level, cfg.log_format)
    with open_bot(cfg) as daemon, _stop_on_signals(daemon.request_stop):
        return daemon.run()


@contextlib.contextmanager
def _stop_on_signals(request_stop: Callable[[], None]) -> Iterator[None]:
    """SIGTERM and SIGINT ask the bot to stop (the second one: to abort). The request is
    made from a fresh thread: a handler runs between two bytecodes of the main thread,
    which may be holding the very lock the request takes."""

    def handler(signum: int, _frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        threading.Thread(target=request_stop, name="stop-request", daemon=True).start()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def dump_config(args: argparse.Namespace) -> int:
    """``reapi-worker config --dump``: the effective configuration as TOML."""
    sys.stdout.write(dump_toml(config_from_args(args)))
    return 0


def _print_outcome(status: status_pb2.Status, result: re_pb2.ActionResult, as_json: bool) -> None:
    response = re_pb2.ExecuteResponse(status=status, result=result)
    if as_json:
        print(json.dumps(json_format.MessageToDict(response, preserving_proto_field_name=True), indent=2, sort_keys=True))
    else:
        print(response)
    if status.code != code_pb2.OK:
        print(f"reapi-worker: action failed: {code_pb2.Code.Name(status.code)}: {status.message}", file=sys.stderr)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InvalidArgument(f"{flag} {item!r}: expected NAME=VALUE")
        pairs[name] = value
    return pairs
