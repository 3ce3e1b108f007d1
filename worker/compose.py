"""Build the executor's object graph from settings: the one place concrete classes meet.

Layers stack here, bottom up: gRPC channel -> RemoteCAS -> LocalCAS -> FetchThroughStore ->
stager (hardlink, FUSE, or auto choosing between them: :func:`make_stager`), wrapped in a
BoundedStager when actions' writes are bounded -> bubblewrap runner -> Executor. Build
directories live in this worker's part of the build root (storage/build_root.py).
Everything else receives these through constructors.
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
from reapi_worker.storage.auto_staging import AutoStager, StagingRule
from reapi_worker.storage.bounded_staging import BoundedStager
from reapi_worker.storage.build_root import BuildRoot
from reapi_worker.storage.content import LocalContent
from reapi_worker.storage.fetch_through import FetchThroughStore
from reapi_worker.storage.fuse import FuseMount, FuseStager
from reapi_worker.storage.local_cas import LocalCAS
from reapi_worker.storage.remote_cas import RemoteCAS, RemoteOptions
from reapi_worker.storage.staging import HardlinkStager, Owner, Stager, TreeRemover
from reapi_worker.storage.tree_facts import TreeFacts

from .executor import Executor, ExecutorConfig

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

#: The stagers ``ExecutorSettings.staging`` may name (see :func:`make_stager`).
STAGINGS = ("hardlink", "fuse", "auto")


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
    cache_dir: str = "/var/lib/reapi-worker/cache"
    cache_bytes: int = 10 * 2**30
    #: Free space the cache keeps on its file system by evicting (storage/local_cas.py).
    cache_keep_free_bytes: int = 0
    build_root: str = "/var/lib/reapi-worker/builds"
    #: Bytes each action may write, on a tmpfs of its own (storage/bounded_staging.py);
    #: None: no bound.
    build_dir_bytes: int | None = None
    max_action_timeout: float = 3600.0
    sandbox_uid: int = 65534
    sandbox_gid: int = 65534
    worker_name: str = field(default_factory=socket.gethostname)
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    #: How input roots are staged: ``hardlink`` (every blob fetched and linked before the
    #: command), ``fuse`` (lazily, through a FUSE mount under a per-action overlay; root
    #: only) or ``auto`` (per action: FUSE for big trees, see storage/auto_staging.py).
    staging: str = "hardlink"


@contextlib.contextmanager
def open_executor(settings: ExecutorSettings) -> Iterator[tuple[Executor, FetchThroughStore]]:
    """The executor and its store; everything is closed when the context ends."""
    os.makedirs(settings.cache_dir, mode=0o700, exist_ok=True)
    os.makedirs(settings.build_root, mode=0o755, exist_ok=True)
    run_as = RunAs(settings.sandbox_uid, settings.sandbox_gid)
    channel = open_channel(settings.cas)
    try:
        remote = RemoteCAS(channel, RemoteOptions(instance_name=settings.instance_name))
        with LocalCAS(
            settings.cache_dir, max_bytes=settings.cache_bytes, keep_free_bytes=settings.cache_keep_free_bytes
        ) as local, _claimed(settings.build_root) as part:
            store = FetchThroughStore(local, remote)
            remover = TreeRemover(part.trash)
            runner = BubblewrapRunner(run_as=run_as)
            # Hardlinks are the cache's own inodes: only safe when the sandbox's uid does
            # not own them (MEASURED.md's uid-0 trap); otherwise stage copies.
            link = sandbox_can_protect_hardlinks(run_as)
            with make_stager(settings.staging, store, remover, part.path, link=link) as stager:
                if settings.build_dir_bytes is not None:
                    if os.geteuid() != 0:
                        raise InvalidArgument("build_dir_size mounts a tmpfs per action and needs a worker running as root")
                    stager = BoundedStager(stager, settings.build_dir_bytes)
                config = ExecutorConfig(
                    build_root=part.path,
                    worker_name=settings.worker_name,
                    max_action_timeout=settings.max_action_timeout,
                    owner=Owner(runner.run_as.uid, runner.run_as.gid) if runner.run_as else None,
                    limits=settings.limits,
                )
                yield Executor(store, stager, runner, config), store
                remover.drain()
    finally:
        channel.close()


@contextlib.contextmanager
def _claimed(build_root: str) -> Iterator[BuildRoot]:
    """This worker's part of ``build_root``, dead workers' parts swept (storage/build_root.py)."""
    part = BuildRoot.claim(build_root)
    try:
        yield part
    finally:
        part.close()


@contextlib.contextmanager
def make_stager(
    staging: str, store: LocalContent, remover: TreeRemover, build_root: str, *, link: bool = True
) -> Iterator[Stager]:
    """The stager ``staging`` names (one of :data:`STAGINGS`), open for the context.

    ``hardlink``: :class:`HardlinkStager` (copies instead of links unless ``link``).
    ``fuse``: a :class:`FuseStager` on the worker's FUSE mount at ``<build_root>/.fuse``
    (mounted here, after unmounting whatever a killed worker left under ``build_root``;
    unmounted when the context ends — after the last staged input is closed).
    ``auto``: both, chosen per action by :class:`StagingRule`.
    FUSE staging needs root (``/dev/fuse`` and overlay mounts). Raises InvalidArgument for
    an unknown name or a non-root worker, Internal if the mount cannot be made.
    """
    if staging not in STAGINGS:
        raise InvalidArgument(f"staging {staging!r}: expected one of {', '.join(STAGINGS)}")
    eager = HardlinkStager(store, remover, link=link)
    if staging == "hardlink":
        yield eager
        return
    if os.geteuid() != 0:
        raise InvalidArgument(f"staging {staging!r} mounts file systems and needs a worker running as root")
    with FuseMount(os.path.join(build_root, ".fuse")) as mount:
        facts = TreeFacts()
        lazy = FuseStager(store, remover, mount, build_root, facts=facts)
        yield lazy if staging == "fuse" else AutoStager(eager, lazy, StagingRule(), facts)
