"""The CLI's subcommands (the parser lives in :mod:`.cli`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator

import grpc
from google.protobuf import json_format

from reapi_worker.protos import bots_pb2_grpc, code_pb2, operations_pb2, re_pb2
from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.sandbox.probe import probe_host
from reapi_worker.storage.channels import open_channel
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.fetch_through import FetchThroughStore
from reapi_worker.storage.local_cas import LocalCAS
from reapi_worker.storage.remote_cas import RemoteCAS, RemoteOptions, RetryPolicy

from .bot import Bot, BotSettings
from .client import CommandSpec, ExecutionClient, build_action, download_outputs
from .compose import ExecutorSettings, open_executor
from .config import WorkerConfig, config_from_args, dump_toml
from .health import HealthMonitor, HealthRecordingExecutor, HealthSettings, standard_checks
from .logs import configure_logging
from .metrics import InstrumentedExecutor, MetricsServer, WorkerMetrics
from .session import BotIdentity, SessionClient

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


def executor_settings(cfg: WorkerConfig) -> ExecutorSettings:
    """The executor's settings from the worker's config (the bot id names the worker in
    every ActionResult)."""
    return ExecutorSettings(
        cas=cfg.cas_connection,
        instance_name=cfg.instance_name,
        cache_dir=cfg.cache_dir,
        cache_bytes=cfg.cache_bytes,
        cache_keep_free_bytes=cfg.cache_keep_free_bytes(),
        build_root=cfg.build_root,
        build_dir_bytes=cfg.build_dir_bytes,
        max_action_timeout=cfg.max_action_timeout,
        sandbox_uid=cfg.sandbox_uid,
        sandbox_gid=cfg.sandbox_gid,
        worker_name=cfg.effective_bot_id,
        staging=cfg.staging,
    )


def run_action(args: argparse.Namespace) -> int:
    digest = Digest.parse(args.action)
    with open_executor(executor_settings(config_from_args(args))) as (executor, _store):
        outcome = executor.execute(digest)
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
        with open_executor(executor_settings(cfg)) as (executor, store):
            action_digest, blobs = build_action(store, spec, args.input_root)
            store.upload_missing(blobs)
            outcome = executor.execute(action_digest)
            if args.download and outcome.ok:
                download_outputs(store, outcome.result, args.download)
        status, result = outcome.status, outcome.result
    else:
        with _client_store(cfg) as (store, channel):
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


@contextlib.contextmanager
def _client_store(cfg: WorkerConfig) -> Iterator[tuple[FetchThroughStore, grpc.Channel]]:
    """A store for a client: a throw-away local cache in front of the scheduler's CAS,
    and the channel to the scheduler (the CAS gets its own when it lives elsewhere)."""
    channel = open_channel(cfg.bots_connection)
    cas_channel = open_channel(cfg.cas_connection) if cfg.cas_remote else channel
    try:
        with tempfile.TemporaryDirectory(prefix="reapi-client-") as cache_dir:
            remote = RemoteCAS(cas_channel, RemoteOptions(instance_name=cfg.instance_name))
            try:
                with LocalCAS(cache_dir, max_bytes=cfg.cache_bytes) as local:
                    yield FetchThroughStore(local, remote), channel
            finally:
                remote.close()
    finally:
        if cas_channel is not channel:
            cas_channel.close()
        channel.close()


def bot(args: argparse.Namespace) -> int:
    """The daemon: register with the scheduler and execute its leases until SIGTERM.

    Wrappers stack here, inside out: the executor, then health recording (a sandbox that
    cannot be set up turns the worker UNHEALTHY at once), then metrics."""
    cfg = config_from_args(args)
    configure_logging(args.log_level, cfg.log_format)
    identity = BotIdentity(
        instance_name=cfg.instance_name,
        bot_id=cfg.effective_bot_id,
        capacity=cfg.concurrency,
        properties=cfg.platform,
    )
    settings = BotSettings(
        heartbeat_seconds=cfg.heartbeat_seconds,
        poll_deadline_seconds=cfg.poll_deadline_seconds,
        backoff=RetryPolicy(initial_backoff=min(0.25, cfg.max_backoff_seconds), max_backoff=cfg.max_backoff_seconds),
        shutdown_grace_seconds=cfg.shutdown_grace_seconds,
    )
    health_settings = HealthSettings(
        interval_seconds=cfg.health_interval_seconds,
        scheduler_grace_seconds=cfg.scheduler_grace_seconds,
        disk=cfg.disk_watermarks,
    )
    channel = open_channel(cfg.bots_connection)
    try:
        with open_executor(executor_settings(cfg)) as (executor, store), contextlib.ExitStack() as stack:
            cache = store.local if isinstance(store.local, LocalCAS) else None
            monitor = HealthMonitor(standard_checks(
                health_settings, cache_dir=cfg.cache_dir, build_root=cfg.build_root,
                cache=cache, probe=executor.sandbox_probe(),
            ))
            metrics = WorkerMetrics(
                cache=cache, transfers=store, health=monitor,
            )
            stack.enter_context(monitor.start(health_settings.interval_seconds))
            if cfg.metrics_port is not None:
                stack.enter_context(MetricsServer(metrics, monitor, cfg.metrics_port, cfg.metrics_host))
            instrumented = InstrumentedExecutor(HealthRecordingExecutor(executor, monitor), metrics)
            daemon = Bot(
                SessionClient(bots_pb2_grpc.BotsStub(channel), identity), instrumented, settings,
                health=monitor, events=metrics,
            )
            with _stop_on_signals(daemon.request_stop):
                return daemon.run()
    finally:
        channel.close()


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


def _print_outcome(status, result: re_pb2.ActionResult, as_json: bool) -> None:  # type: ignore[no-untyped-def]
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
