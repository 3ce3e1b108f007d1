"""Cached staging beyond the shared executor suite: reuse, isolation of the cache from the
sandbox, deltas over a cached tree, eviction while in use, outputs.

Real overlayfs and idmapped mounts, real bubblewrap (as uid 65534), a real local CAS."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator

import pytest

from conftest import require, require_tool
from executor_fixtures import Farm, make_farm

from reapi_worker.protos import code_pb2
from reapi_worker.sandbox.bubblewrap import BubblewrapRunner
from reapi_worker.sandbox.uid_pool import SharedUid
from reapi_worker.sandbox.identity import RunAs
from reapi_worker.storage.cached_staging import CachedTreeStager, PreferCached
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.fuse import kernel_mounts
from reapi_worker.storage.staging import HardlinkStager, Owner, Stager
from reapi_worker.worker.compose import make_stager
from reapi_worker.worker.executor import Executor, ExecutorConfig


def require_cached() -> None:
    require_tool("bwrap")
    require_tool("unshare")
    require(os.geteuid() == 0, "cached staging mounts overlays and needs root")


@pytest.fixture
def farm() -> Iterator[Farm]:
    require_cached()
    farm = make_farm(max_action_timeout=30, staging="cached")
    yield farm
    farm.close()
    assert kernel_mounts.mounts_under(farm.top) == []


def stager(farm: Farm) -> CachedTreeStager:
    assert isinstance(farm.stager, CachedTreeStager)
    return farm.stager


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def snapshot(path: str) -> dict[str, tuple]:
    """Everything about a tree that staging must never change: per entry its type, mode,
    owner, inode, link target, and the hash of a file's bytes."""
    found: dict[str, tuple] = {}
    for parent, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(parent, name)
            st = os.lstat(full)
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as data:
                    extra = hashlib.sha256(data.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(full)
            found[os.path.relpath(full, path)] = (st.st_mode, st.st_uid, st.st_gid, st.st_ino, st.st_nlink > 0, extra)
    return found


INPUTS = {
    "src/a.txt": b"alpha\n",
    "src/run.sh": (b"#!/bin/sh\necho ran\n", True),
    "src/sub/b.txt": b"beta\n",
    "src/link": "->a.txt",
    "top.txt": b"top\n",
}


def test_a_root_seen_before_is_the_same_cached_inodes_with_nothing_parsed_or_linked(farm):
    root = farm.upload_tree(INPUTS)
    blob = Digest.of_bytes(b"alpha\n")
    script = "stat -c %i src/a.txt; stat -c %u:%g src/sub; cat src/a.txt"
    first = farm.run(sh(script), INPUTS)
    assert first.status.code == code_pb2.OK and first.result.exit_code == 0
    cached = stager(farm).cache.get(root)
    assert cached is not None
    cached.release()
    parsed = stager(farm).parsed.parsed
    second = farm.run(sh(script), INPUTS)
    lines = [farm.text(o.result.stdout_digest).split("\n") for o in (first, second)]
    # The sandbox sees the cached tree's own inode (the local CAS blob's: hardlinked once,
    # when the tree was built), in both actions; its directories as its own uid.
    assert lines[0][0] == lines[1][0] == str(os.stat(farm.cache.path(blob)).st_ino)
    assert lines[1][1] == "0:0"  # the sandbox's uid 65534 is uid 0 inside bubblewrap
    assert lines[1][2] == "alpha"
    assert stager(farm).parsed.parsed == parsed  # a root seen before: not one proto parsed


def test_hostile_actions_never_change_the_cache_or_the_next_action_s_view(farm):
    root = farm.upload_tree(INPUTS)
    farm.run(sh("true"), INPUTS)
    held = stager(farm).cache.get(root)
    assert held is not None
    before = snapshot(held.path)
    held.release()
    hostile = "; ".join([
        "chmod u+w src/a.txt; echo corrupted >> src/a.txt",     # write through the inode
        "chmod 0777 src/run.sh top.txt",                          # chmod an input
        "ln src/sub/b.txt hard; chmod u+w hard; echo x >> hard",  # a hardlink of an input
        "mv src/sub src/moved; rm -f top.txt",                    # rename a directory, unlink
        "rm -rf src/moved; mkdir -p src/sub; echo fake > src/sub/b.txt",
        "ln -sf /etc/passwd src/link; chmod 0777 src .",          # retarget a symlink, chmod dirs
        "touch -d 2000-01-01 src/a.txt; truncate -s 0 src/run.sh",
        "true",
    ])
    outcome = farm.run(sh(hostile), INPUTS)
    assert outcome.status.code == code_pb2.OK
    held = stager(farm).cache.get(root)
    assert held is not None
    assert snapshot(held.path) == before
    held.release()
    for data in (b"alpha\n", b"beta\n", b"top\n", b"#!/bin/sh\necho ran\n"):  # every blob intact
        with open(farm.cache.path(Digest.of_bytes(data)), "rb") as blob:
            assert blob.read() == data
    check = farm.run(sh("cat src/a.txt src/sub/b.txt top.txt; src/run.sh; readlink src/link"), INPUTS)
    assert farm.text(check.result.stdout_digest) == "alpha\nbeta\ntop\nran\na.txt\n"


def test_a_root_close_to_a_cached_one_is_exactly_that_root_through_a_delta(farm):
    base = {**INPUTS, "gone/x": b"x", "swap": b"file then dir", "tree/deep/d.txt": b"d"}
    near = {
        "src/a.txt": b"alpha changed\n",                 # a changed file
        "src/run.sh": (b"#!/bin/sh\necho ran\n", False),  # an executable bit dropped
        "src/sub/b.txt": b"beta\n",
        "src/sub/new.txt": b"new\n",                     # a new file in a shared directory
        "src/link": "->sub/b.txt",                       # a retargeted symlink
        "swap/inside": b"now a directory",               # a file that became a directory
        "tree": "->src",                                  # a directory that became a symlink
        "fresh/one/two.txt": b"2",                       # a new subtree
    }                                                     # top.txt and gone/ removed
    farm.run(sh("true"), base)
    base_digest = farm.upload_tree(base)
    near_digest = farm.upload_tree(near)
    expected = os.path.join(farm.top, "expected")
    CasDirectory.from_digest(farm.cache, near_digest).export_files(expected)
    staged = farm.stager.stage(CasDirectory.from_digest(farm.cache, near_digest),
                               os.path.join(farm.build_root, "near"), [()], Owner(65534, 65534))
    try:
        assert not stager(farm).cache.contains(near_digest)  # not built: a delta over the base
        assert stager(farm).cache.contains(base_digest)

        def shape(tree: str) -> dict[str, tuple]:
            return {path: (stat.S_IFMT(mode), mode & 0o111, extra) for path, (mode, _, _, _, _, extra)
                    in snapshot(tree).items()}

        assert shape(staged.path) == shape(expected)
    finally:
        staged.close()


def test_a_shared_subtree_plus_new_files_runs_and_captures_like_any_root(farm):
    base = {f"lib/p{i // 20}/f{i}.h": b"%d\n" % i for i in range(200)}
    farm.run(sh("true"), base)
    near = {**base, **{f"new/n{i}.c": b"n%d\n" % i for i in range(100)}}
    outcome = farm.run(sh("cat lib/p3/f61.h new/n42.c > out.txt"), near, output_paths=["out.txt"])
    assert outcome.status.code == code_pb2.OK, outcome.status
    assert [farm.cache.read(Digest.from_proto(f.digest)) for f in outcome.result.output_files] == [b"61\nn42\n"]
    assert not stager(farm).cache.contains(farm.upload_tree(near))


def test_outputs_are_captured_and_an_unmodified_input_is_known_without_reading_it(farm):
    root = farm.upload_tree(INPUTS)
    farm.run(sh("true"), INPUTS)
    staged = farm.stager.stage(CasDirectory.from_digest(farm.cache, root), os.path.join(farm.build_root, "b"),
                               [()], Owner(65534, 65534))
    try:
        changed = os.path.join(staged.path, "src/sub/b.txt")
        os.unlink(changed)  # what a command may do: replace an input (copied up, in the upper layer)
        with open(changed, "wb") as out:
            out.write(b"beta\n")  # even with the same bytes: it is the action's file now
        untouched = os.path.join(staged.path, "src/a.txt")
        assert staged.known_digest(("src", "a.txt"), os.lstat(untouched)) == Digest.of_bytes(b"alpha\n")
        assert staged.known_digest(("src", "sub", "b.txt"), os.lstat(changed)) is None
        assert staged.known_digest(("src", "link"), os.lstat(os.path.join(staged.path, "src/link"))) is None
    finally:
        staged.close()
    # An input is not writable (as with hardlinks) but may be replaced.
    outcome = farm.run(sh("echo made > src/made.txt; { cat top.txt; echo more; } > t; mv -f t top.txt"), INPUTS,
                       output_paths=["src/a.txt", "src/made.txt", "top.txt", "src"])
    assert outcome.status.code == code_pb2.OK, outcome.status
    files = {f.path: farm.cache.read(Digest.from_proto(f.digest)) for f in outcome.result.output_files}
    assert files == {"src/a.txt": b"alpha\n", "src/made.txt": b"made\n", "top.txt": b"top\nmore\n"}
    [tree] = outcome.result.output_directories
    assert tree.path == "src"


def test_eviction_under_the_bound_never_takes_a_tree_an_action_is_using(tmp_path):
    require_cached()
    farm = make_farm(max_action_timeout=30, staging="cached", tree_cache_bytes=3000)
    stager(farm).delta_limit = 0  # every root built into the cache
    try:
        first = farm.upload_tree({"f": b"1" * 2000})
        second = farm.upload_tree({"f": b"2" * 2000})
        in_use = farm.stager.stage(CasDirectory.from_digest(farm.cache, first), os.path.join(farm.build_root, "a"))
        try:
            outcome = farm.run(sh("wc -c < f"), {"f": b"2" * 2000})  # 4000 bytes of trees > 3000
            assert farm.text(outcome.result.stdout_digest).strip() == "2000"
            cache = stager(farm).cache
            assert cache.contains(first) and not cache.contains(second)  # the unused one went
            with open(os.path.join(in_use.path, "f"), "rb") as data:
                assert data.read() == b"1" * 2000
        finally:
            in_use.close()
        assert stager(farm).cache.evictions == 1
    finally:
        farm.close()


def test_a_view_left_mounted_by_a_killed_worker_is_unmounted_by_the_next_stager(farm):
    root = farm.upload_tree(INPUTS)
    left = farm.stager.stage(CasDirectory.from_digest(farm.cache, root), os.path.join(farm.build_root, "left"))
    assert kernel_mounts.mounts_under(farm.build_root) == [left.path]
    # What the next start of a worker does (this one "died" without closing its view).
    CachedTreeStager(farm.cache, farm.remover, stager(farm).cache, farm.build_root).close()
    assert kernel_mounts.mounts_under(farm.build_root) == []
    left.close()  # nothing mounted any more: only the directory goes


def test_the_composition_root_builds_a_stager_that_reuses_the_tree_cache_across_restarts(tmp_path):
    # (auto is built the same way around a FUSE mount, of which a process has one: the FUSE
    # tests' shared one. PreferCached is tested below.)
    require_cached()
    staging = "cached"
    farm = make_farm(max_action_timeout=30, staging="hardlink")  # for its cache and directories
    trees = os.path.join(farm.cache_dir, "trees")
    try:
        root = farm.upload_tree(INPUTS)
        for _ in range(2):  # a second worker start finds the first one's tree
            with make_stager(staging, farm.cache, farm.remover, farm.build_root,
                             tree_cache_dir=trees, tree_cache_bytes=1 << 20) as made:
                staged = made.stage(CasDirectory.from_digest(farm.cache, root), os.path.join(farm.build_root, "x"))
                try:
                    with open(os.path.join(staged.path, "src/a.txt"), "rb") as data:
                        assert data.read() == b"alpha\n"
                finally:
                    staged.close()
                farm.remover.drain()
            assert [n for n in os.listdir(trees) if n.startswith(root.hash)] == [f"{root.hash}-{root.size_bytes}"]
        assert kernel_mounts.mounts_under(farm.build_root) == []
    finally:
        farm.close()


class RecordingStager(Stager):
    """Stands for auto's per-action choice: records the roots it is asked to stage."""

    def __init__(self, inner: Stager) -> None:
        self.inner = inner
        self.roots: list[Digest] = []

    def stage(self, root, build_dir, directories=(), owner=None):  # type: ignore[no-untyped-def]
        self.roots.append(root.digest())
        return self.inner.stage(root, build_dir, directories, owner)


def test_auto_stages_a_root_held_or_seen_before_from_the_directory_cache_and_asks_the_rule_otherwise(farm):
    held, new = farm.upload_tree(INPUTS), farm.upload_tree({"other": b"other"})
    farm.run(sh("true"), INPUTS)
    other = RecordingStager(HardlinkStager(farm.cache, farm.remover))  # stands for FUSE: caches nothing
    auto = PreferCached(stager(farm), other)
    for n, digest in enumerate((held, new, new)):
        build_dir = os.path.join(farm.build_root, f"{n}")
        auto.stage(CasDirectory.from_digest(farm.cache, digest), build_dir).close()
    assert other.roots == [new]  # the held root never, the new one the first time only


def test_even_a_sandbox_running_as_the_cache_s_owner_cannot_change_the_cache(farm):
    # MEASURED.md's trap: with hardlinks, a sandbox running as the cache's owner (root here)
    # could chmod and write a cached blob. Through the overlay nothing reaches the lower layer.
    executor = Executor(farm.cache, farm.stager, BubblewrapRunner(run_as=RunAs(0, 0)),
                        ExecutorConfig(build_root=farm.build_root), identities=SharedUid(RunAs(0, 0)))
    root = farm.upload_tree(INPUTS)
    farm.run(sh("true"), INPUTS)
    held = stager(farm).cache.get(root)
    assert held is not None
    before = snapshot(held.path)
    held.release()
    script = ("chmod u+w src/a.txt; echo corrupted >> src/a.txt; chmod 0777 src/sub top.txt; "
              "ln src/sub/b.txt h; echo x >> h; rm -rf src/sub; cat src/a.txt; test -e src/sub || echo gone")
    outcome = executor.execute(farm.action(sh(script), INPUTS))
    assert outcome.status.code == code_pb2.OK and outcome.result.exit_code == 0, farm.text(outcome.result.stderr_digest)
    # The files show as the sandbox's own: it may chmod and write them in its view (as
    # BuildStream's local sandbox lets a build), and delete entries; all of it is copied
    # up into its upper layer, nothing reaches the cached tree.
    assert farm.text(outcome.result.stdout_digest) == "alpha\ncorrupted\ngone\n"
    held = stager(farm).cache.get(root)
    assert held is not None and snapshot(held.path) == before
    held.release()
    with open(farm.cache.path(Digest.of_bytes(b"alpha\n")), "rb") as blob:
        assert blob.read() == b"alpha\n"
