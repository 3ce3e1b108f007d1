"""``CachedTreeStager``: stage an input root seen before in constant time, and a root close
to one seen before in time proportional to the difference.

Per action, one overlayfs mount is the input root the sandbox binds::

    <build_dir>/lower0, lower1   mount points of idmapped clones of the lower layers
                                 (detached once the overlay holds them)
    <build_dir>/delta            this root's difference from a cached base tree, if any
    <build_dir>/upper, work      the action's writable layer: every change lands here
    <build_dir>/root             the merged view — StagedInput.path

The lower layers are read-only trees of the directory cache (:mod:`.tree_cache`):

* **a root seen before** is its own cached tree: one overlay, nothing linked, nothing
  parsed — the executor's stage phase takes 0.4-0.5 ms at 10,000 and at 50,000 files,
  against 47 and 225 ms for hardlink staging of the same seen trees and 51 and 221 ms
  for ``cp -al`` (``bench/bench_tree_cache.py``, medians of 7, /dev/shm, one run);
* **a new root close to a cached one** (at most :data:`DELTA_LIMIT` entries differ from one
  of the :data:`BASES` cached trees sharing most of its top level) is that tree under a
  small *delta* layer built for the action: the new and changed entries (hardlinks from
  the local CAS), and
  overlayfs whiteouts for entries the base has and the root has not. The diff walks only
  subtrees whose digests differ, from parsed nodes kept by digest (:mod:`.parsed_trees`):
  a seen 10,000-file tree plus 100 new files stages in 2.6 ms;
* **any other root** is built into the cache once (hardlinks, like hardlink staging) and
  then used like a root seen before.

Why one overlay over whole trees, and not a bind mount per cached subtree: both are far
inside the 15 ms budget (``bench/bench_tree_cache.py``: mounting and unmounting the
idmapped overlay view of a 10,000-file tree 0.4 ms, a read-only bind 0.1 ms), so
semantics decide. An action may write anywhere in its input root, as with hardlink staging —
a read-only bind would refuse writes below it (in-tree builds write next to their
sources), and a writable mount nested in the root would escape a client's
``SubtreeReadOnly`` (the sandbox remounts a marked subtree read-only without recursing into
mounts below it). One overlay at the root keeps both: every write goes to the upper layer,
and the root is a single mount like the FUSE stager's. What it gives up: a subtree shared
with a cached tree is reused only at the same path (the common case — the same toolchain
or vendored tree in each action); elsewhere it is linked again.

Ownership: in the cache, everything is root's — directories 0755, files the local CAS's
blobs (hardlinks, 0644/0755). Each lower layer is attached through an idmapped mount that
shows root as the sandbox's uid/gid (:mod:`.idmapped_mounts`), so the action owns every
entry of its view, as BuildStream's local sandbox shows a build its inputs: it may create,
replace and delete entries anywhere, and ``touch``, ``chmod``, append to or rewrite an
input file in place — while the
cache stays writable by root alone. Because overlayfs copies an entry up before any
change, nothing the sandbox does — write, chmod, rename, unlink, link — reaches a cached
tree or a CAS blob: unlike hardlink staging, this stager never needs to copy, and a later
action sees the original.

Outputs: an input the action left alone is absent from the upper layer (``redirect_dir=off``
keeps it at its path), so its digest is the tree's: :meth:`StagedInput.known_digest` answers
without reading it.

Needs root (mounts). Thread-safe: one ``stage`` per action from any thread.
"""

from __future__ import annotations

import collections
import logging
import os
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from reapi_worker.protos.errors import Internal, ReapiError

from .content import LocalContent
from .digests import Digest
from .directory.cas import CasDirectory
from .fuse import kernel_mounts
from .idmapped_mounts import OwnerMappings, attach_idmapped
from .parsed_trees import ParsedTrees, TreeNode
from .paths import RelPath
from .staging import Owner, StagedInput, Stager, TreeRemover, make_dirs
from .tree_cache import CachedTree, TreeCache

log = logging.getLogger(__name__)

#: Most entries (files, directories, symlinks, whiteouts) a delta layer may hold. A delta
#: is rebuilt for every action at ~10-15 µs an entry, a tree built into the cache costs
#: ~10 µs a file once: past ~1,000 entries (10-15 ms, the whole-action budget of a root seen
#: before) building the root once is the better bet.
DELTA_LIMIT = 1000
#: How many cached trees are tried as a delta's base (see ``_candidates``).
BASES = 4

_LAYER_NAMES = ("lower0", "lower1")


class CachedTreeStager(Stager):
    """Stage through the directory cache ``cache`` (module docstring).

    ``store`` holds the blobs (pinned and fetched while a tree or a delta is built);
    ``build_root`` is where the executor makes build directories: overlays a dead worker
    left there are unmounted now. ``parsed`` keeps parsed Directory nodes (may be shared).
    ``delta_limit``: the most entries of a delta layer (0: never a delta, every new root is
    built into the cache). The caller closes the stager after the last staged input (it
    holds user namespaces).
    """

    def __init__(
        self,
        store: LocalContent,
        remover: TreeRemover,
        cache: TreeCache,
        build_root: str,
        *,
        parsed: ParsedTrees | None = None,
        mappings: OwnerMappings | None = None,
        delta_limit: int = DELTA_LIMIT,
    ) -> None:
        self._store = store
        self.delta_limit = delta_limit
        self._remover = remover
        self.cache = cache
        self.parsed = parsed or ParsedTrees()
        self._mappings = mappings or OwnerMappings()
        build_root = kernel_mounts.check_mountable_path(os.path.abspath(build_root), "build root")
        for point in kernel_mounts.mounts_under(build_root):
            # Only what this stager mounts: <build_root>/<action>/{root,lower*}.
            if os.path.dirname(os.path.dirname(point)) == build_root and os.path.basename(point) in (
                "root", *_LAYER_NAMES
            ):
                while kernel_mounts.detach(point):
                    pass
                log.warning("unmounted stale overlay %s", point)

    def stage(
        self, root: CasDirectory, build_dir: str, directories: Iterable[RelPath] = (), owner: Owner | None = None
    ) -> StagedInput:
        digest = root.digest()
        staged = _CachedView(build_dir, digest, self._store, self.parsed, self._remover)
        try:
            # Private to the action's uid, which must pass through it to its view: no other
            # uid reaches the inputs, the outputs, or anything the action left.
            os.mkdir(build_dir, 0o700)
            if owner is not None:
                os.chown(build_dir, owner.uid, owner.gid)
            else:
                os.chmod(build_dir, 0o755)  # whoever the sandbox is, it must get through
            base = self.cache.get(digest)
            if base is not None:
                layers = [base.path]
            else:
                delta = self._closest_delta(digest)
                if delta is not None:
                    base, ops = delta
                    delta_dir = os.path.join(build_dir, "delta")
                    staged.hold(base)
                    _write_delta(self._store, self.parsed, ops, delta_dir)
                    layers = [delta_dir, base.path]
                else:
                    base = self.cache.add(digest, lambda path: _materialise(root, path))
                    layers = [base.path]
            staged.hold(base)
            ids = (owner.uid, owner.gid) if owner is not None else (os.geteuid(), os.getegid())
            staged.mount(layers, ids, self._mappings)
            for parts in directories:
                make_dirs(staged.path, parts, owner)
        except BaseException as error:
            staged.close()
            if isinstance(error, ReapiError):
                raise error.within("staging input root") from None
            if isinstance(error, OSError):
                raise Internal(f"staging input root into {build_dir}: {error}") from None
            raise
        return staged

    def close(self) -> None:
        self._mappings.close()

    def __enter__(self) -> "CachedTreeStager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _closest_delta(self, digest: Digest) -> tuple[CachedTree, list[_Op]] | None:
        """The cached base needing the smallest delta to become ``digest``'s tree, held,
        with that delta; None if every candidate needs more than ``delta_limit`` entries."""
        best: tuple[CachedTree, list[_Op]] | None = None
        if self.delta_limit <= 0:
            return None
        best_cost = self.delta_limit + 1
        for candidate in self._candidates(digest):
            held = self.cache.get(candidate, touch=False)  # trying it is not using it
            if held is None:
                continue
            try:
                found = _Diff(self._store, self.parsed, best_cost - 1).run(digest, candidate)
            except ReapiError as error:
                # A Directory of the base the store no longer has (a cached tree outlives its
                # protos), or of the new root (then building it reports that properly).
                log.debug("no delta from %s to %s: %s", candidate, digest, error)
                found = None
            if found is None:
                held.release()
                continue
            if best is not None:
                best[0].release()
            best, best_cost = (held, found[0]), found[1]
        if best is not None:
            self.cache.touch(best[0].digest)  # used now: most recent
        return best

    def _candidates(self, digest: Digest) -> list[Digest]:
        """The bases worth a diff, best first: the BASES cached trees sharing most top-level
        entries (name and digest) with ``digest``'s root — its delta is most likely the
        smallest, and every later candidate is given up as soon as it is not smaller — or,
        when none shares any, the most recently used one. Why not more: a diff against an
        unrelated tree walks ``delta_limit`` entries for nothing (~15 ms at 1,000), and a
        root's first sight pays it for every candidate tried."""
        wanted = self._top_entries(digest)
        recent = self.cache.recent()
        shared = [(len(wanted & self._top_entries(c)), order, c) for order, c in enumerate(recent)]
        best = sorted((s for s in shared if s[0] > 0), key=lambda s: (-s[0], s[1]))[:BASES]
        return [c for _, _, c in best] or recent[:1]

    def _top_entries(self, digest: Digest) -> set[tuple[str, tuple[object, ...]]]:
        try:
            return set(_entries(self.parsed.node(self._store, digest)).items())
        except ReapiError:
            return set()


@dataclass(frozen=True, slots=True)
class _Op:
    """One entry of a delta layer at ``parts``: ``kind`` is ``dir`` (a directory merged
    with the base's), ``tree`` (a whole new directory, ``digest``), ``file`` (``digest``,
    ``executable``), ``link`` (``target``) or ``whiteout`` (hides the base's entry)."""

    kind: str
    parts: RelPath
    digest: Digest | None = None
    executable: bool = False
    target: str = ""


def _entries(node: TreeNode) -> dict[str, tuple[object, ...]]:
    found: dict[str, tuple[object, ...]] = {name: ("file", d, x) for name, d, x in node.files}
    found.update((name, ("dir", d)) for name, d in node.dirs)
    found.update((name, ("link", t)) for name, t in node.links)
    return found


class _Diff:
    """The delta that turns a base tree into a new one, within ``limit`` entries."""

    def __init__(self, store: LocalContent, parsed: ParsedTrees, limit: int) -> None:
        self._store = store
        self._parsed = parsed
        self._limit = limit
        self._ops: list[_Op] = []
        self._cost = 0

    def run(self, new: Digest, base: Digest) -> tuple[list[_Op], int] | None:
        """The delta's entries and their cost (entries written), or None past the limit.
        Raises what parsing a node raises."""
        try:
            self._directory(new, base, ())
        except _OverLimit:
            return None
        return self._ops, self._cost

    def _add(self, op: _Op, cost: int = 1) -> None:
        self._cost += cost
        if self._cost > self._limit:
            raise _OverLimit
        self._ops.append(op)

    def _directory(self, new: Digest, base: Digest, parts: RelPath) -> None:
        if new == base:
            return
        new_entries = _entries(self._parsed.node(self._store, new))
        base_entries = _entries(self._parsed.node(self._store, base))
        for name in sorted(new_entries.keys() | base_entries.keys()):
            wanted, there = new_entries.get(name), base_entries.get(name)
            if wanted == there:
                continue
            path = parts + (name,)
            if wanted is None:
                self._add(_Op("whiteout", path))
            elif wanted[0] == "dir" and there is not None and there[0] == "dir":
                self._add(_Op("dir", path))
                self._directory(wanted[1], there[1], path)  # type: ignore[arg-type]
            elif wanted[0] == "dir":
                # A directory over a base file or symlink hides it: overlayfs merges only
                # directories with directories.
                self._add(_Op("tree", path, wanted[1]), self._size(wanted[1]))  # type: ignore[arg-type]
            elif wanted[0] == "file":
                self._add(_Op("file", path, wanted[1], bool(wanted[2])))  # type: ignore[arg-type]
            else:
                self._add(_Op("link", path, target=str(wanted[1])))

    def _size(self, digest: Digest) -> int:
        size = 0
        for _, node in self._parsed.walk(self._store, digest):
            size += 1 + len(node.files) + len(node.links)
            if self._cost + size > self._limit:
                raise _OverLimit
        return size


class _OverLimit(Exception):
    pass


def _write_delta(store: LocalContent, parsed: ParsedTrees, ops: list[_Op], dest: str) -> None:
    """Write the delta layer ``ops`` into the new directory ``dest``: directories 0755 (root's),
    files hardlinked from ``store`` (pinned and fetched first: MissingBlobs
    names every absent one), whiteouts as overlayfs's 0/0 character devices — like the
    cached trees, as the layer is idmapped like them."""
    entries: list[tuple[RelPath, str, Digest | None, bool, str]] = []
    for op in ops:
        if op.kind == "tree":
            assert op.digest is not None
            for parts, node in parsed.walk(store, op.digest):
                entries.append((op.parts + parts, "dir", None, False, ""))
                entries.extend((op.parts + parts + (n,), "file", d, x, "") for n, d, x in node.files)
                entries.extend((op.parts + parts + (n,), "link", None, False, t) for n, t in node.links)
        else:
            entries.append((op.parts, op.kind, op.digest, op.executable, op.target))
    blobs = {digest for _, kind, digest, _, _ in entries if kind == "file" and digest is not None}
    pins = store.pin_set()
    try:
        pins.add(blobs)
        store.fetch(blobs)
        os.mkdir(dest, 0o755)
        for parts, kind, digest, executable, target in entries:
            path = os.path.join(dest, *parts)
            if kind == "dir":
                os.mkdir(path, 0o755)
            elif kind == "file":
                assert digest is not None
                os.link(store.path(digest, executable), path, follow_symlinks=False)
            elif kind == "link":
                os.symlink(target, path)
            else:
                os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    finally:
        pins.release()


def _materialise(root: CasDirectory, dest: str) -> int:
    """Write ``root`` into ``dest`` by hardlinks (blobs pinned and fetched first); return
    the bytes of its files. Links are safe here whatever the sandbox's uid: the tree is
    only ever seen through an overlay."""
    root.export_files(dest, can_link=True)  # root's: the idmapped view shows it as the action's
    return sum(digest.size_bytes for digest, _ in root.file_digests())


class _CachedView(StagedInput):
    """One action's overlay over cached trees. ``close`` unmounts it, lets go of the cached
    trees and hands the build directory to the remover."""

    def __init__(
        self, build_dir: str, digest: Digest, store: LocalContent, parsed: ParsedTrees, remover: TreeRemover
    ) -> None:
        self._build_dir = build_dir
        self._upper = os.path.join(build_dir, "upper")
        self.path = os.path.join(build_dir, "root")
        self._digest = digest
        self._store = store
        self._parsed = parsed
        self._remover = remover
        self._held: list[CachedTree] = []
        self.private_inputs = True  # the idmapped overlay (module docstring: Ownership)
        self._mounted = False
        self._closed = False

    def hold(self, tree: CachedTree) -> None:
        if tree not in self._held:
            self._held.append(tree)

    def mount(self, layers: list[str], ids: tuple[int, int], mappings: OwnerMappings) -> None:
        work = os.path.join(self._build_dir, "work")
        os.mkdir(self._upper, 0o755)
        os.chown(self._upper, *ids)  # the upper dir's root is the merged root's inode
        os.mkdir(work, 0o700)
        os.mkdir(self.path, 0o755)
        userns = mappings.userns_fd(*ids)
        points = [os.path.join(self._build_dir, name) for name in _LAYER_NAMES[: len(layers)]]
        attached: list[str] = []
        try:
            for layer, point in zip(layers, points):
                os.mkdir(point, 0o700)
                attach_idmapped(layer, point, userns)
                attached.append(point)
            kernel_mounts.mount_overlay(points, self._upper, work, self.path)
            self._mounted = True
        finally:
            # The overlay holds its layers; their mount points are not needed any more.
            for point in attached:
                kernel_mounts.detach(point)

    def known_digest(self, parts: RelPath, st: os.stat_result) -> Digest | None:
        """An input the command did not touch: absent from the upper layer, so the lower
        entry at the same path, whose digest the tree knows. None if the blob is no longer
        in the store (its bytes must then be read and stored)."""
        if not parts or not stat.S_ISREG(st.st_mode):
            return None
        if not kernel_mounts.untouched_in_overlay(self._upper, parts):
            return None  # created or changed by the command: read it
        try:
            found = self._parsed.lookup(self._store, self._digest, parts)
        except ReapiError:
            return None
        if found is None:
            return None
        digest, executable = found
        if digest.size_bytes != st.st_size or executable != bool(st.st_mode & stat.S_IXUSR):
            return None  # not what the tree says: do not trust it, read it
        if self._store.find_missing([digest]):
            return None
        return digest

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        unmounted = kernel_mounts.unmount_before_removal([self.path] if self._mounted else [], self._build_dir)
        for tree in self._held:
            tree.release()
        if unmounted and os.path.lexists(self._build_dir):
            self._remover.remove(self._build_dir)


class PreferCached(Stager):
    """Stage with ``cached`` every root its directory cache holds (whatever its size: a held
    root costs about nothing) or that ``other`` staged before (a root that comes back is
    worth building once: lazy staging pays for every read, every time), and everything
    else as ``other`` decides (an :class:`~.auto_staging.AutoStager` whose eager half is
    ``cached``). Remembers the last ``remember`` roots ``other`` staged. Thread-safe if the
    two stagers are. Closes nothing."""

    def __init__(self, cached: CachedTreeStager, other: Stager, remember: int = 4096) -> None:
        self._cached = cached
        self._other = other
        self._remember = remember
        self._lock = threading.Lock()
        self._seen: collections.OrderedDict[Digest, None] = collections.OrderedDict()

    def stage(
        self, root: CasDirectory, build_dir: str, directories: Iterable[RelPath] = (), owner: Owner | None = None
    ) -> StagedInput:
        digest = root.digest()
        with self._lock:
            again = self._seen.pop(digest, 0) is None
            if not again:
                self._seen[digest] = None
                while len(self._seen) > self._remember:
                    self._seen.popitem(last=False)
        if again or self._cached.cache.contains(digest):
            return self._cached.stage(root, build_dir, directories, owner)
        return self._other.stage(root, build_dir, directories, owner)
