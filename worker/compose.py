"""Build the executor's object graph from settings: the one place concrete classes meet.

Layers stack here, bottom up: gRPC channel -> RemoteCAS -> LocalCAS -> FetchThroughStore ->
stager -> bubblewrap runner -> Executor. Everything else receives these through
constructors.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.sandbox.bubblewrap import BubblewrapRunner
from reapi_worker.sandbox.identity import RunAs, sandbox_can_protect_hardlinks
from reapi_worker.sandbox.request import ResourceLimits
from reapi_worker.storage.channels import ConnectionOptions, open_channel
from reapi_worker.storage.fetch_through import FetchThroughStore
from reapi_worker.storage.local_cas import LocalCAS
from reapi_worker.storage.remote_cas import RemoteCAS, RemoteOptions
from reapi_worker.storage.staging import HardlinkStager, Owner, TreeRemover

from .executor import Executor, ExecutorConfig

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """``500M``, ``10G``, ``1.5T``, ``4096`` -> bytes (binary units)."""
    value = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _UNITS and value[-1:] != "" else ""
    number = value[: len(value) - len(unit)]
    try:
        size = int(float(number) * _UNITS[unit])
    except ValueError:
        raise InvalidArgument(f"invalid size {text!r}: expected e.g. 500M or 10G") from None
    if size <= 0:
        raise InvalidArgument(f"invalid size {text!r}: must be positive")
    return size


@dataclass(frozen=True, slots=True)
class ExecutorSettings:
    """What an operator chooses for running actions on this host."""

    cas: ConnectionOptions
    instance_name: str = ""
    cache_dir: str = "/var/cache/reapi-worker"
    cache_bytes: int = 10 * 2**30
    build_root: str = "/var/lib/reapi-worker/builds"
    max_action_timeout: float = 3600.0
    sandbox_uid: int = 65534
    sandbox_gid: int = 65534
    worker_name: str = field(default_factory=socket.gethostname)
    limits: ResourceLimits = field(default_factory=ResourceLimits)


@contextlib.contextmanager
def open_executor(settings: ExecutorSettings) -> Iterator[tuple[Executor, FetchThroughStore]]:
    """The executor and its store; everything is closed when the context ends."""
    os.makedirs(settings.cache_dir, mode=0o700, exist_ok=True)
    os.makedirs(settings.build_root, mode=0o755, exist_ok=True)
    run_as = RunAs(settings.sandbox_uid, settings.sandbox_gid)
    channel = open_channel(settings.cas)
    try:
        remote = RemoteCAS(channel, RemoteOptions(instance_name=settings.instance_name))
        with LocalCAS(settings.cache_dir, max_bytes=settings.cache_bytes) as local:
            store = FetchThroughStore(local, remote)
            remover = TreeRemover(os.path.join(settings.build_root, ".trash"))
            runner = BubblewrapRunner(run_as=run_as)
            # Hardlinks are the cache's own inodes: only safe when the sandbox's uid does
            # not own them (MEASURED.md's uid-0 trap); otherwise stage copies.
            stager = HardlinkStager(store, remover, link=sandbox_can_protect_hardlinks(run_as))
            config = ExecutorConfig(
                build_root=settings.build_root,
                worker_name=settings.worker_name,
                max_action_timeout=settings.max_action_timeout,
                owner=Owner(runner.run_as.uid, runner.run_as.gid) if runner.run_as else None,
                limits=settings.limits,
            )
            yield Executor(store, stager, runner, config), store
            remover.drain()
    finally:
        channel.close()
