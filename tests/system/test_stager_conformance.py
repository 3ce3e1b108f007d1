"""One suite over every Stager (storage/staging.py's contract): hardlink (walking the tree,
or from parsed trees), FUSE, auto choosing either, and cached (the directory cache); hardlink,
FUSE and cached under a BoundedStager, hardlink under a FreeSpaceGuard. Real FUSE and
overlayfs mounts: root and /dev/fuse, like the worker."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from conftest import require, require_tool
from executor_fixtures import shared_fuse_mount
from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import InvalidArgument, MissingBlobs
from reapi_worker.sandbox.identity import NOBODY
from reapi_worker.storage.auto_staging import AutoStager, StagingRule
from reapi_worker.storage.bounded_staging import BoundedStager
from reapi_worker.storage.cached_staging import CachedTreeStager
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.free_space_guard import FreeSpaceGuard
from reapi_worker.storage.fuse import FuseStager
from reapi_worker.storage.local_cas import LocalCAS
from reapi_worker.storage.parsed_trees import ParsedTrees
from reapi_worker.storage.tree_cache import TreeCache
from reapi_worker.storage.staging import HardlinkStager, Owner, Stager, TreeRemover
from reapi_worker.storage.tree_facts import TreeFacts

OWNER = Owner(NOBODY.uid, NOBODY.gid)
STAGERS = (
    "hardlink", "hardlink-parsed", "fuse", "fuse-kernel", "fuse-kernel-passthrough", "auto-eager", "auto-lazy", "cached",
    "hardlink+bound", "fuse+bound", "fuse-kernel+bound", "cached+bound", "hardlink+guard",
)


@dataclass
class Rig:
    stager: Stager
    cache: LocalCAS
    remover: TreeRemover
    build_root: str
    source: str
    lazy: bool  # reads nothing before the command but the root (storage/staging.py)

    def build_dir(self, name: str = "action") -> str:
        return os.path.join(self.build_root, name)


@pytest.fixture(params=STAGERS)
def rig(request) -> Iterator[Rig]:
    """``+bound``: under a BoundedStager (storage/bounded_staging.py); ``+guard``: under a
    FreeSpaceGuard (storage/free_space_guard.py)."""
    kind, _, wrapper = request.param.partition("+")
    if wrapper == "bound":
        require(os.geteuid() == 0, "a bounded build directory mounts a tmpfs: root only")
    if kind == "cached":
        require_tool("unshare")
        require(os.geteuid() == 0, "cached staging mounts overlays and needs root")
    elif not kind.startswith("hardlink"):
        require_tool("fusermount3")
        require(os.geteuid() == 0 and os.path.exists("/dev/fuse"), "FUSE staging needs root and /dev/fuse")
    # Not pytest's tmp_path: the sandbox's uid must be able to reach the build directories.
    top = tempfile.mkdtemp(prefix="reapi-worker-stager-")
    os.chmod(top, 0o755)
    build_root = os.path.join(top, "builds")
    os.makedirs(build_root, mode=0o755)
    remover = TreeRemover(os.path.join(build_root, ".trash"))
    with LocalCAS(os.path.join(top, "cache"), max_bytes=1 << 30) as cache, contextlib.ExitStack() as stack:
        eager = HardlinkStager(cache, remover, parsed=ParsedTrees() if kind == "hardlink-parsed" else None)
        stager: Stager = eager
        if kind == "cached":
            trees = stack.enter_context(TreeCache(os.path.join(top, "cache", "trees"), 1 << 30))
            stager = stack.enter_context(CachedTreeStager(cache, remover, trees, build_root))
        elif not kind.startswith("hardlink"):
            facts = TreeFacts()
            # "fuse" (and auto) on pyfuse3, "fuse-kernel[-passthrough]" on the /dev/fuse
            # backend. Under a bound, as a worker does: bare FUSE views, the bound's overlay on them.
            mount = shared_fuse_mount(kind.removeprefix("fuse-") if kind.startswith("fuse-") else "pyfuse3")
            lazy = FuseStager(cache, remover, mount, build_root, facts=facts, overlay=wrapper != "bound")
            stager = lazy
            if kind.startswith("auto"):
                rule = StagingRule(lazy_min_files=0 if kind == "auto-lazy" else 1_000_000)
                stager = AutoStager(eager, lazy, rule, facts)
        if wrapper == "bound":
            stager = BoundedStager(stager, 16 << 20)
        elif wrapper == "guard":
            stager = FreeSpaceGuard(stager, reserve_bytes=0)
        lazy = kind in ("fuse", "fuse-kernel", "fuse-kernel-passthrough", "auto-lazy")
        yield Rig(stager, cache, remover, build_root, os.path.join(top, "source"), lazy)
        remover.drain()
    shutil.rmtree(top, ignore_errors=True)


def input_tree(rig: Rig) -> CasDirectory:
    """``a.txt``, an executable ``bin/tool``, ``sub/deep/f``, ``link -> a.txt``, in the cache."""
    os.makedirs(os.path.join(rig.source, "bin"))
    os.makedirs(os.path.join(rig.source, "sub", "deep"))
    for name, data, mode in (("a.txt", b"alpha", 0o644), ("bin/tool", b"#!/bin/sh\n", 0o755), ("sub/deep/f", b"deep", 0o644)):
        path = os.path.join(rig.source, name)
        with open(path, "wb") as stream:
            stream.write(data)
        os.chmod(path, mode)
    os.symlink("a.txt", os.path.join(rig.source, "link"))
    root = CasDirectory.empty(rig.cache)
    root.import_files(rig.source)
    return CasDirectory.from_digest(rig.cache, root.digest())


def read(path: str) -> bytes:
    with open(path, "rb") as stream:
        return stream.read()


def test_the_staged_path_shows_the_input_tree(rig):
    with rig.stager.stage(input_tree(rig), rig.build_dir(), [], OWNER) as staged:
        assert read(os.path.join(staged.path, "a.txt")) == b"alpha"
        assert read(os.path.join(staged.path, "sub", "deep", "f")) == b"deep"
        assert os.readlink(os.path.join(staged.path, "link")) == "a.txt"
        tool = os.lstat(os.path.join(staged.path, "bin", "tool"))
        assert stat.S_ISREG(tool.st_mode) and tool.st_mode & stat.S_IXUSR
        assert not os.lstat(os.path.join(staged.path, "a.txt")).st_mode & stat.S_IXUSR


def test_requested_directories_exist_owned_by_the_sandbox_uid(rig):
    with rig.stager.stage(input_tree(rig), rig.build_dir(), [("out", "objs"), ("sub",)], OWNER) as staged:
        made = os.lstat(os.path.join(staged.path, "out", "objs"))
        assert stat.S_ISDIR(made.st_mode)
        assert (made.st_uid, made.st_gid) == (OWNER.uid, OWNER.gid)
        assert os.path.isdir(os.path.join(staged.path, "sub", "deep"))  # an input directory stays


def test_inputs_cannot_be_written_through_to_the_cache(rig):
    tree = input_tree(rig)
    digest = Digest.of_bytes(b"alpha")
    with rig.stager.stage(tree, rig.build_dir(), [], OWNER) as staged:
        mode = stat.S_IMODE(os.stat(os.path.join(staged.path, "a.txt")).st_mode)
        # Nobody but the file's owner may write it, whatever the stager: a cache inode's owner
        # is the worker; where the view shows it as the action's, an overlay keeps writes.
        assert not mode & 0o022
    assert read(rig.cache.path(digest)) == b"alpha"


def test_missing_blobs_are_all_named_and_nothing_is_left_staged(rig):
    """Eager stagers name every missing blob before the command; a lazy one names every
    missing blob the command touched, from ``check`` after it (the reader got EIO)."""
    gone = [Digest.of_bytes(b"gone 1"), Digest.of_bytes(b"gone 2")]
    directory = re_pb2.Directory(files=[
        re_pb2.FileNode(name=f"f{i}", digest=digest.to_proto()) for i, digest in enumerate(gone)
    ])
    root = CasDirectory.from_digest(rig.cache, rig.cache.write(serialize(directory)))
    if not rig.lazy:
        with pytest.raises(MissingBlobs) as raised:
            rig.stager.stage(root, rig.build_dir(), [], OWNER)
    else:
        with rig.stager.stage(root, rig.build_dir(), [], OWNER) as staged:
            staged.check()  # nothing touched yet: nothing to report
            for i in range(len(gone)):
                with pytest.raises(OSError) as unreadable:
                    read(os.path.join(staged.path, f"f{i}"))
                assert unreadable.value.errno == errno.EIO
            with pytest.raises(MissingBlobs) as raised:
                staged.check()
    assert set(raised.value.digests) == set(gone)
    rig.remover.drain()
    assert not os.path.lexists(rig.build_dir())


def test_a_hostile_tree_is_refused(rig):
    blob = rig.cache.write(b"x")
    directory = re_pb2.Directory(files=[re_pb2.FileNode(name="..", digest=blob.to_proto())])
    root = CasDirectory.from_digest(rig.cache, rig.cache.write(serialize(directory)))
    with pytest.raises(InvalidArgument):
        rig.stager.stage(root, rig.build_dir(), [], OWNER)
    rig.remover.drain()
    assert not os.path.lexists(rig.build_dir())


def test_closing_hands_the_tree_to_the_remover_and_may_be_repeated(rig):
    staged = rig.stager.stage(input_tree(rig), rig.build_dir(), [("out",)], OWNER)
    with open(os.path.join(staged.path, "out", "made"), "wb") as stream:
        stream.write(b"output")
    staged.close()
    staged.close()
    rig.remover.drain()
    assert not os.path.lexists(rig.build_dir())
    # The cache is untouched by what the action did.
    assert rig.cache.find_missing([Digest.of_bytes(b"alpha")]) == set()
