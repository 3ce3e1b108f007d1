"""The composition root: the one place concrete classes are chosen and wired together.

Everything is built from one :class:`~.config.WorkerConfig`; everything below this module
receives its collaborators through constructors and never reads the config. The graph,
bottom up (each line is built from the lines above it)::

    channel to the CAS -> RemoteCAS
    LocalCAS (the cache) -> FetchThroughStore (cache in front of the remote)  the store
    HardlinkStager | FuseStager | CachedTreeStager | AutoStager (``staging``) make_stager
    BoundedStager around it (``build_dir_size``; FreeSpaceGuard if off)       open_executor
    BubblewrapRunner (the sandbox; ``host_etc``; slirp4netns NAT when        the runner
      ``network_on = "nat"``)
    UidPool (``sandbox_uid_range``: one host uid per action; a non-root      open_executor
      worker: SharedUid, itself)
    Executor (ExecutorConfig, the runner, the stager, the uid pool)          open_executor
    HealthRecordingExecutor, then InstrumentedExecutor around it              open_bot
    HealthMonitor (its checks), WorkerMetrics, MetricsServer                  open_bot
    Bot (a session with the scheduler, over its own channel)                  open_bot

Build directories live in this worker's part of the build root (storage/build_root.py,
which sweeps dead workers' parts at start).

Adding a setting for one component: a field of ``WorkerConfig`` (its documentation comes
with it), and a line here handing the value to the constructor of the component that uses
it. Nothing else copies it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from reapi_worker.protos import bots_pb2_grpc
from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.sandbox.bubblewrap import BubblewrapRunner
from reapi_worker.sandbox.bwrap_args import HostLayout
from reapi_worker.sandbox.errors import SandboxSetupError
from reapi_worker.sandbox.identity import default_run_as
from reapi_worker.sandbox.network import SlirpNat
from reapi_worker.sandbox.probe import Probe, runner_probe
from reapi_worker.sandbox.uid_pool import SharedUid, UidPool, UidSource
from reapi_worker.storage.auto_staging import AutoStager, StagingRule
from reapi_worker.storage.bounded_staging import BoundedStager
from reapi_worker.storage.build_root import BuildRoot
from reapi_worker.storage.cached_staging import CachedTreeStager, PreferCached
from reapi_worker.storage.channels import open_channel
from reapi_worker.storage.content import LocalContent
from reapi_worker.storage.fetch_through import FetchThroughStore
from reapi_worker.storage.free_space_guard import FreeSpaceGuard
from reapi_worker.storage.fuse import FuseMount, FuseStager
from reapi_worker.storage.idmapped_overlay_probe import idmapped_overlay_refusal
from reapi_worker.storage.local_cas import LocalCAS
from reapi_worker.storage.parsed_trees import ParsedTrees
from reapi_worker.storage.remote_cas import RemoteCAS, RemoteOptions
from reapi_worker.storage.retry import RetryPolicy
from reapi_worker.storage.staging import HardlinkStager, Stager, TreeRemover
from reapi_worker.storage.tree_cache import open_tree_cache
from reapi_worker.storage.tree_facts import TreeFacts

from .bot import Bot, BotConfig
from .bounds import raise_open_files_limit
from .config import STAGINGS, WorkerConfig
from .executor import Executor, ExecutorConfig
from .health import HealthConfig, HealthMonitor, HealthRecordingExecutor, standard_checks
from .metrics import InstrumentedExecutor, MetricsServer, WorkerMetrics
from .session import BotIdentity, SessionClient


log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ExecutorGraph:
    """What :func:`open_executor` built: the executor, the store it reads and writes (whose
    transfer counts the metrics show), the local cache under it (evicted by the disk
    checks), and a probe that runs a trivial sandbox the way the executor runs actions."""

    executor: Executor
    store: FetchThroughStore
    cache: LocalCAS
    sandbox_probe: Probe


@contextlib.contextmanager
def open_executor(cfg: WorkerConfig) -> Iterator[ExecutorGraph]:
    """The executor and what it stands on, from ``cfg``; everything is closed when the
    context ends (the FUSE mount after the last staged input, staged trees deleted)."""
    os.makedirs(cfg.cache_dir, mode=0o700, exist_ok=True)
    os.makedirs(cfg.build_root, mode=0o755, exist_ok=True)
    # The FUSE mount holds a descriptor per open input blob: the worker's own limit goes up
    # to its hard limit; action_open_files is derived below it, so all actions together
    # cannot exhaust it.
    raise_open_files_limit()
    bounds = cfg.action_bounds
    channel = open_channel(cfg.cas_connection)
    try:
        remote = RemoteCAS(channel, RemoteOptions(instance_name=cfg.instance_name))
        with LocalCAS(
            cfg.cache_dir, max_bytes=cfg.cache_bytes, keep_free_bytes=cfg.cache_keep_free_bytes()
        ) as local, _claimed(cfg.build_root) as part, _identities(cfg) as identities:
            store = FetchThroughStore(local, remote)
            remover = TreeRemover(part.trash)
            # Its own identity (65534 when root) is the health probe's; actions run as theirs.
            runner = BubblewrapRunner(
                layout=HostLayout.probe(etc_allow=cfg.host_etc),
                nat=SlirpNat() if cfg.network_on == "nat" else None,
            )
            # Hardlinks are the cache's own inodes: only safe when no sandbox uid owns
            # them (docs/measured.md's uid-0 trap); otherwise stage copies.
            link = identities.protects_hardlinks
            with make_stager(
                cfg.staging, store, remover, part.path, link=link,
                open_files_per_action=bounds.limits.open_files, fuse_backend=cfg.fuse_backend,
                # A BoundedStager's overlay is the one writable layer over FUSE views.
                writable_layer_above=cfg.build_dir_bytes is not None,
                tree_cache_dir=os.path.join(cfg.cache_dir, "trees"), tree_cache_bytes=cfg.tree_cache_bytes,
            ) as stager:
                stager = _bounded(stager, cfg, part.path)
                config = ExecutorConfig(
                    build_root=part.path,
                    # The bot id names the worker in every ActionResult.
                    worker_name=cfg.effective_bot_id,
                    max_action_timeout=cfg.max_action_timeout,
                    limits=bounds.limits,
                    capture_timeout=bounds.capture_timeout,
                    platform=cfg.platform_policy,
                    max_output_bytes=cfg.output_bytes_limit,
                )
                probe = runner_probe(
                    runner, config.build_root, limits=config.limits, extra_ro_binds=config.extra_ro_binds,
                )
                executor = Executor(store, stager, runner, config, identities=identities)
                yield ExecutorGraph(executor, store, local, probe)
                remover.drain()
    finally:
        channel.close()


def _bounded(stager: Stager, cfg: WorkerConfig, build_root: str) -> Stager:
    """Each action's writes bounded on a tmpfs of its own (exact: worker/faults.py), or,
    when ``build_dir_size`` is off, the racy free-space check after each run."""
    bound = cfg.build_dir_bytes
    if bound is not None:
        if os.geteuid() != 0:
            raise InvalidArgument("build_dir_size mounts a tmpfs per action and needs a worker running as root")
        return BoundedStager(stager, bound)
    st = os.statvfs(build_root)
    return FreeSpaceGuard(stager, cfg.disk_watermarks.critical.of(st.f_blocks * st.f_frsize))


@contextlib.contextmanager
def _identities(cfg: WorkerConfig) -> Iterator[UidSource]:
    """One host uid per action from ``sandbox_uid_range``, claimed against the host's other
    workers; a worker that is not root cannot switch uids: its actions run as itself."""
    if os.geteuid() != 0:
        yield SharedUid(default_run_as())
        return
    try:
        pool = UidPool.claim(cfg.sandbox_uid_candidates)
    except SandboxSetupError as error:
        raise InvalidArgument(f"sandbox_uid_range: {error.reason}") from None
    with pool:
        yield pool


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
    staging: str,
    store: LocalContent,
    remover: TreeRemover,
    build_root: str,
    *,
    link: bool = True,
    open_files_per_action: int | None = None,
    fuse_backend: str = "auto",
    writable_layer_above: bool = False,
    tree_cache_dir: str | None = None,
    tree_cache_bytes: int = 4 << 30,
) -> Iterator[Stager]:
    """The stager ``staging`` names (one of :data:`~.config.STAGINGS`), open for the context.

    ``hardlink``: :class:`HardlinkStager` (copies instead of links unless ``link``), keeping
    parsed trees (:class:`ParsedTrees`) so a root staged before is not parsed again.
    ``fuse``: a :class:`FuseStager` on the worker's FUSE mount at ``<build_root>/.fuse``
    (mounted here, after unmounting whatever a killed worker left under ``build_root``;
    unmounted when the context ends — after the last staged input is closed).
    ``cached``: a :class:`CachedTreeStager` over the directory cache at ``tree_cache_dir``
    (on the local CAS's file system; the first free ``.N`` sibling if another worker holds
    it) holding at most ``tree_cache_bytes``.
    ``auto``: a root the directory cache holds, or staged before, is staged from it; any
    other is staged lazily (FUSE) or through the directory cache, per action by
    :class:`StagingRule` (:class:`PreferCached`).
    ``open_files_per_action``: the FUSE mount's quota of inputs one action holds open;
    ``fuse_backend``: what serves it (:class:`FuseMount`). ``writable_layer_above``: the
    caller puts a writable overlay over each staged root (a :class:`BoundedStager`), so
    FUSE staging gives bare read-only views, one overlay deep (``FuseStager(overlay=False)``).
    The directory cache needs overlays over idmapped mounts, probed once here
    (:mod:`~reapi_worker.storage.idmapped_overlay_probe`): where the kernel refuses them,
    ``cached`` is refused with its reason and ``auto`` chooses between hardlinks and FUSE.
    FUSE and cached staging need root (``/dev/fuse``, overlay and idmapped mounts). Raises
    InvalidArgument for an unknown name or a non-root worker, Internal if a mount cannot
    be made.
    """
    if staging not in STAGINGS:
        raise InvalidArgument(f"staging {staging!r}: expected one of {', '.join(STAGINGS)}")
    if staging == "hardlink":
        yield HardlinkStager(store, remover, link=link, parsed=ParsedTrees())
        return
    if os.geteuid() != 0:
        raise InvalidArgument(f"staging {staging!r} mounts file systems and needs a worker running as root")
    with contextlib.ExitStack() as stack:
        cached = None
        refusal = None
        if staging in ("cached", "auto"):
            if tree_cache_dir is None:
                raise InvalidArgument(f"staging {staging!r} needs a directory for its tree cache")
            refusal = idmapped_overlay_refusal(build_root)
            if refusal is not None and staging == "cached":
                raise InvalidArgument(
                    "staging 'cached' shows cached trees through overlays over idmapped mounts "
                    f"(Linux >= 5.19), which this host refuses: {refusal}"
                )
            if refusal is None:
                tree_cache = stack.enter_context(open_tree_cache(tree_cache_dir, tree_cache_bytes))
                cached = stack.enter_context(CachedTreeStager(store, remover, tree_cache, build_root))
                if staging == "cached":
                    yield cached
                    return
        mount = stack.enter_context(FuseMount(
            os.path.join(build_root, ".fuse"), open_files_per_action=open_files_per_action, backend=fuse_backend))
        facts = TreeFacts()
        lazy = FuseStager(store, remover, mount, build_root, facts=facts, overlay=not writable_layer_above)
        if staging == "fuse":
            yield lazy
            return
        if cached is None:
            log.warning("staging 'auto' without the directory cache, which needs overlays over idmapped "
                        "mounts: %s; roots are hard-linked or FUSE-mounted by size", refusal)
            yield AutoStager(HardlinkStager(store, remover, link=link, parsed=ParsedTrees()), lazy, StagingRule(), facts)
            return
        yield PreferCached(cached, AutoStager(cached, lazy, StagingRule(), facts))


@contextlib.contextmanager
def open_bot(cfg: WorkerConfig) -> Iterator[Bot]:
    """The daemon, ready to :meth:`~.bot.Bot.run`: the executor wrapped (inside out) by
    health recording — a sandbox that cannot be set up turns the worker UNHEALTHY at once —
    and by metrics; the health monitor checking on its thread; the metrics endpoint serving
    when ``metrics_port`` is set. Everything is closed when the context ends."""
    identity = BotIdentity(
        instance_name=cfg.instance_name,
        bot_id=cfg.effective_bot_id,
        capacity=cfg.concurrency,
        properties=cfg.platform,
    )
    bot_config = BotConfig(
        heartbeat_seconds=cfg.heartbeat_seconds,
        poll_deadline_seconds=cfg.poll_deadline_seconds,
        backoff=RetryPolicy(initial_backoff=min(0.25, cfg.max_backoff_seconds), max_backoff=cfg.max_backoff_seconds),
        shutdown_grace_seconds=cfg.shutdown_grace_seconds,
    )
    health_config = HealthConfig(
        interval_seconds=cfg.health_interval_seconds,
        scheduler_grace_seconds=cfg.scheduler_grace_seconds,
        disk=cfg.disk_watermarks,
    )
    channel = open_channel(cfg.bots_connection)
    try:
        with open_executor(cfg) as graph, contextlib.ExitStack() as stack:
            monitor = HealthMonitor(standard_checks(
                health_config, cache_dir=cfg.cache_dir, build_root=cfg.build_root,
                cache=graph.cache, probe=graph.sandbox_probe,
            ))
            metrics = WorkerMetrics(cache=graph.cache, transfers=graph.store, health=monitor)
            stack.enter_context(monitor.start(health_config.interval_seconds))
            if cfg.metrics_port is not None:
                stack.enter_context(MetricsServer(metrics, monitor, cfg.metrics_port, cfg.metrics_host))
            executor = InstrumentedExecutor(HealthRecordingExecutor(graph.executor, monitor), metrics)
            session = SessionClient(bots_pb2_grpc.BotsStub(channel), identity)
            yield Bot(session, executor, bot_config, health=monitor, events=metrics)
    finally:
        channel.close()


@contextlib.contextmanager
def open_client_store(cfg: WorkerConfig) -> Iterator[tuple[FetchThroughStore, grpc.Channel]]:
    """A store for a client (``reapi-worker execute``): a throw-away local cache in front of
    the scheduler's CAS, and the channel to the scheduler (the CAS gets its own when it
    lives elsewhere)."""
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
