"""Building blocks for executor tests: a real local CAS, stager, bubblewrap runner.

``make_farm(staging=...)`` builds the same executor with hardlink or FUSE staging, so one
suite runs over both (``STAGINGS``). FUSE needs root (``/dev/fuse`` and overlay mounts),
``fusermount3`` and one FUSE mount per process: :func:`shared_fuse_mount` opens it once
and every FUSE farm of the session uses it — reopened when a test asks for the other
backend (``FUSE_BACKENDS``; staging ``fuse-pyfuse3``/``fuse-kernel``/``fuse-kernel-passthrough`` name one, plain
``fuse`` takes :data:`fuse_backend`, which suites parametrize).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.duration_pb2 import Duration

from reapi_worker.protos import re_pb2
from reapi_worker.sandbox.bubblewrap import BubblewrapRunner
from reapi_worker.sandbox.request import Bind
from reapi_worker.sandbox.runner import Runner
from reapi_worker.sandbox.uid_pool import UidSource
from reapi_worker.storage.bounded_staging import BoundedStager
from reapi_worker.storage.cached_staging import CachedTreeStager
from reapi_worker.storage.content import LocalContent
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.fuse import FuseMount, FuseStager
from reapi_worker.storage.local_cas import LocalCAS
from reapi_worker.storage.parsed_trees import ParsedTrees
from reapi_worker.storage.staging import HardlinkStager, Owner, Stager, TreeRemover
from reapi_worker.storage.tree_cache import TreeCache
from reapi_worker.worker.executor import Executor, ExecutorConfig, Outcome
from reapi_worker.worker.platform_properties import PlatformPolicy

STAGINGS = ("hardlink", "fuse", "cached")

FUSE_BACKENDS = ("pyfuse3", "kernel", "kernel-passthrough")
#: The backend of plain ``fuse`` staging (storage/fuse/mount.py; ``auto``: as a worker
#: would choose). Suites that run on both set it per module.
fuse_backend = "auto"

_shared_mount: FuseMount | None = None


def shared_fuse_mount(backend: str | None = None, stacked_overlays: int = 1) -> FuseMount:
    """The process's FUSE mount for tests (one per process), serving with ``backend``
    (default :data:`fuse_backend`) under ``stacked_overlays`` (see FuseMount):
    opened on first use, reopened when asked for another, closed at exit."""
    global _shared_mount, _shared_overlays, _atexit_registered
    wanted = backend or fuse_backend
    if _shared_mount is not None and (_shared_mount.backend, _shared_overlays) != (wanted, stacked_overlays):
        _close_shared_mount()
    if _shared_mount is None:
        top = tempfile.mkdtemp(prefix="reapi-worker-test-fuse-", dir="/tmp")
        _shared_mount = FuseMount(os.path.join(top, "mnt"), backend=wanted, stacked_overlays=stacked_overlays).open()
        _shared_overlays = stacked_overlays
        if not _atexit_registered:
            atexit.register(_close_shared_mount)
            _atexit_registered = True
    return _shared_mount


_atexit_registered = False
_shared_overlays = 1


def _close_shared_mount() -> None:
    global _shared_mount
    if _shared_mount is not None:
        _shared_mount.close()
        shutil.rmtree(os.path.dirname(_shared_mount.mount_dir), ignore_errors=True)
        _shared_mount = None


@dataclass
class Farm:
    """One host's worth of executor, with the directories a test wants to look at."""

    top: str
    cache: LocalCAS
    executor: Executor
    remover: TreeRemover
    stager: Stager
    staging: str = "hardlink"
    store: LocalContent | None = None  # what the executor reads from (the cache, or a wrapper)

    @property
    def build_root(self) -> str:
        return os.path.join(self.top, "builds")

    @property
    def cache_dir(self) -> str:
        return os.path.join(self.top, "cache")

    def private_inputs(self) -> bool:
        """Whether this farm's stager makes inputs the action's own (StagedInput.private_inputs),
        asked of an empty root staged and closed at once."""
        root = CasDirectory.from_digest(self.cache, self.cache.write(serialize(re_pb2.Directory())))
        with self.stager.stage(root, os.path.join(self.build_root, "private-inputs-probe"), [], Owner(65534, 65534)) as staged:
            private = staged.private_inputs
        self.remover.drain()
        return private

    def upload_tree(self, files: dict[str, bytes | tuple[bytes, bool] | str]) -> Digest:
        """Store a tree given as {path: bytes | (bytes, executable) | "->target"}."""
        tree = CasDirectory.empty(self.cache)
        for path, content in sorted(files.items()):
            parent = path.rpartition("/")[0]
            if parent:
                tree.mkdir(parent)
            if isinstance(content, str) and content.startswith("->"):
                tree.symlink(path, content[2:])
            elif isinstance(content, tuple):
                tree.write_bytes(path, content[0], executable=content[1])
            elif content is None:
                tree.mkdir(path)
            else:
                tree.write_bytes(path, content)
        return tree.digest()

    def action(
        self,
        arguments: list[str],
        inputs: dict | None = None,
        timeout: float | None = None,
        platform: dict[str, str] | None = None,
        **command_fields,
    ) -> Digest:
        command_fields.setdefault("environment_variables", [re_pb2.Command.EnvironmentVariable(name="PATH", value="/usr/bin:/bin")])
        command = re_pb2.Command(arguments=arguments, **command_fields)
        root = self.upload_tree(inputs or {})
        action = re_pb2.Action(
            command_digest=self.cache.write(serialize(command)).to_proto(),
            input_root_digest=root.to_proto(),
            do_not_cache=True,
        )
        if timeout is not None:
            action.timeout.CopyFrom(Duration(seconds=int(timeout), nanos=int((timeout % 1) * 1e9)))
        if platform:
            action.platform.CopyFrom(re_pb2.Platform(properties=[
                re_pb2.Platform.Property(name=k, value=v) for k, v in sorted(platform.items())]))
        return self.cache.write(serialize(action))

    def run(self, arguments: list[str], inputs: dict | None = None, **kwargs) -> Outcome:
        return self.executor.execute(self.action(arguments, inputs, **kwargs))

    def text(self, digest_proto) -> str:
        return self.cache.read(Digest.from_proto(digest_proto)).decode()

    def close(self) -> None:
        self.remover.drain()
        if isinstance(self.stager, BoundedStager):
            self.stager.close()  # its user namespaces
        if isinstance(self.stager, CachedTreeStager):
            self.stager.close()
            self.stager.cache.close()
        self.cache.close()
        shutil.rmtree(self.top, ignore_errors=True)


def make_farm(
    max_action_timeout: float = 60.0,
    staging: str = "hardlink",
    wrap_cache: Callable[[LocalCAS], LocalContent] | None = None,
    extra_ro_binds: tuple[Bind, ...] = (),
    fetch_timeout: float = 60.0,
    cache_recency: float = 60.0,
    parent: str = "/tmp",
    wrap_runner: Callable[[Runner], Runner] | None = None,
    platform: PlatformPolicy = PlatformPolicy(),
    max_output_bytes: int | None = None,
    bound_bytes: int | None = None,
    identities: UidSource | None = None,
    tree_cache_bytes: int = 1 << 30,
) -> Farm:
    """An executor over a fresh local cache in /tmp, staging with ``staging``.
    ``wrap_cache`` makes what the executor reads from out of the cache (e.g. a
    FetchThroughStore in front of a remote); the caller closes what it opened for it.
    ``cache_recency`` is the cache's LRU ``recency_interval``. ``parent``: where the farm's
    directory goes (benchmarks use tmpfs). ``wrap_runner`` wraps the bubblewrap runner
    (e.g. to look at the build directory while the action runs). ``platform`` and
    ``max_output_bytes`` are the executor's (default root mode, accepted keys and network;
    the output bound). ``bound_bytes``: each action's writes on a tmpfs of that size
    (storage/bounded_staging.py; root only). ``identities``: where each action gets its
    host uid (e.g. a UidPool); default: all share the runner's (65534 as root). ``tree_cache_bytes`` bounds
    the directory cache of ``cached`` staging."""
    # Not pytest's tmp_path: bubblewrap runs as an unprivileged uid and must be able to
    # reach the build directory, so every parent must be searchable by it (0755).
    top = tempfile.mkdtemp(prefix="reapi-worker-test-", dir=parent)
    os.chmod(top, 0o755)
    cache_dir = os.path.join(top, "cache")
    os.makedirs(cache_dir, mode=0o700)
    cache = LocalCAS(cache_dir, max_bytes=1 << 30, recency_interval=cache_recency)
    remover = TreeRemover(os.path.join(top, "builds", ".trash"))
    os.chmod(os.path.join(top, "builds"), 0o755)
    source = wrap_cache(cache) if wrap_cache is not None else cache
    stager: Stager
    if staging == "hardlink":
        stager = HardlinkStager(source, remover, parsed=ParsedTrees())
    elif staging in ("fuse", "fuse-pyfuse3", "fuse-kernel", "fuse-kernel-passthrough"):
        mount = shared_fuse_mount(staging.partition("-")[2] or None)
        # Under a bound, as a worker does: bare FUSE views, the bound's overlay on them.
        stager = FuseStager(source, remover, mount, os.path.join(top, "builds"), fetch_timeout=fetch_timeout,
                            overlay=bound_bytes is None)
    elif staging == "cached":
        stager = CachedTreeStager(source, remover, TreeCache(os.path.join(cache_dir, "trees"), tree_cache_bytes),
                                  os.path.join(top, "builds"))
    else:
        raise ValueError(f"unknown staging {staging!r}")
    if bound_bytes is not None:
        stager = BoundedStager(stager, bound_bytes)
    config = ExecutorConfig(
        build_root=os.path.join(top, "builds"),
        worker_name="test-worker",
        max_action_timeout=max_action_timeout,
        extra_ro_binds=extra_ro_binds,
        platform=platform,
        max_output_bytes=max_output_bytes,
    )
    runner: Runner = BubblewrapRunner()
    if wrap_runner is not None:
        runner = wrap_runner(runner)
    executor = Executor(source, stager, runner, config, identities=identities)
    return Farm(top, cache, executor, remover, stager, staging, source)
