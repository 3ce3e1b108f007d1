"""``SubtreeReadOnly``: which parts of an input root the command may not write.

A client marks a Directory of the input root with the node property
``SubtreeReadOnly=true`` or ``false`` (BuildStream marks its sysroot ``true`` and the build
directory, the install root, ``dev``, ``proc`` and ``tmp`` ``false``). A marking covers the
whole subtree below it down to the next marking: the nearest marked ancestor wins. An
unmarked tree is writable everywhere, as if the property did not exist.

This module only *reads* the markings; enforcing them is the sandbox's job (read-only
mounts, see :mod:`reapi_worker.sandbox.bwrap_args`). It gives the marked places reduced to
where the answer changes — ``true`` on the root and ``false`` on ``tmp`` is two changes; a
``false`` below an unmarked root is none — so the sandbox makes one mount per change.

Why the markings are remembered by Directory digest: a digest names an immutable subtree,
so what it holds is a fact about the digest. Finding every marking means visiting every
Directory node; :class:`MarkingsMemo` makes that once per distinct subtree, and a subtree
without markings (most of a sysroot, every Bazel tree) is remembered as such, so a tree
seen before — or sharing its toolchain with one seen before — costs one lookup per new
node.

Why a node not loaded yet is read shallowly — its proto parsed for its own properties and
its subdirectories, no file entry built — rather than loaded: the walk needs nothing
else, and a lazy stager (FUSE) must not pay before the command for every file of a tree
it may never open. Measured here (warm cache, /dev/shm, trees never seen): loading every
node costs 48 ms for 10k files, 398 ms for 50k; the shallow read 11 and 79 ms. A
hardlink stager then loads every node once more for the export (the shallow reads are
the extra). The shallow read checks what the markings' paths are made of (each
subdirectory's name and digest); the rest of a node is checked when it is loaded.
"""

from __future__ import annotations

import collections
import threading

from google.protobuf.message import DecodeError

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import InvalidArgument, ReapiError

from .content import ContentStore
from .digests import Digest
from .directory.cas import CasDirectory
from .paths import RelPath, check_name, join

#: The Directory node property this module reads.
READ_ONLY_PROPERTY = "SubtreeReadOnly"

#: (path relative to the subtree's root, read-only?) for every marked directory of a subtree.
Markings = tuple[tuple[RelPath, bool], ...]

_VALUES = {"true": True, "false": False}


class MarkingsMemo:
    """The markings of subtrees by Directory digest, at most ``max_entries`` (least recently
    used forgotten first). Thread-safe."""

    def __init__(self, max_entries: int = 1 << 16) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._known: collections.OrderedDict[Digest, Markings] = collections.OrderedDict()

    def get(self, digest: Digest) -> Markings | None:
        with self._lock:
            markings = self._known.get(digest)
            if markings is not None:
                self._known.move_to_end(digest)
            return markings

    def put(self, digest: Digest, markings: Markings) -> None:
        with self._lock:
            self._known[digest] = markings
            while len(self._known) > self._max:
                self._known.popitem(last=False)


def read_only_markings(root: CasDirectory, memo: MarkingsMemo | None = None) -> Markings:
    """Every directory of ``root``'s tree that carries ``SubtreeReadOnly``, parents before
    children, siblings by name.

    Raises InvalidArgument naming the directory whose value is neither ``true`` nor
    ``false`` or whose subdirectory has an invalid name or digest, MissingBlobs for an
    absent Directory. Nodes already loaded are read as they are, the others shallowly
    (module docstring) and left unloaded; the tree must not be visited by another thread
    meanwhile (see :meth:`CasDirectory.entries`).
    """
    memo = memo if memo is not None else MarkingsMemo()
    store = root.store
    # Post-order without recursion (a tree can be deeper than Python's stack). A node is a
    # CasDirectory while its parent was loaded, a bare Digest below one read shallowly.
    found: dict[Digest, Markings] = {}
    visited: dict[Digest, tuple[str | None, list[tuple[str, CasDirectory | Digest]]]] = {}
    stack: list[tuple[CasDirectory | Digest, RelPath, bool]] = [(root, (), False)]
    while stack:
        node, where, children_done = stack.pop()
        digest = node if isinstance(node, Digest) else node.digest()
        if digest in found:
            continue
        known = memo.get(digest)
        if known is not None:
            found[digest] = known
            continue
        if not children_done:
            own, children = visited[digest] = _visit(node, digest, where, store)
            stack.append((node, where, True))
            stack.extend((child, where + (name,), False) for name, child in children)
            continue
        own, children = visited[digest]
        markings: list[tuple[RelPath, bool]] = []
        if own is not None:
            if own not in _VALUES:
                raise InvalidArgument(
                    f"input root directory {join(where) or '.'!r}: node property "
                    f"{READ_ONLY_PROPERTY}={own!r}, expected 'true' or 'false'"
                )
            markings.append(((), _VALUES[own]))
        for name, child in children:
            child_digest = child if isinstance(child, Digest) else child.digest()
            markings.extend(((name,) + path, read_only) for path, read_only in found[child_digest])
        found[digest] = tuple(markings)
        memo.put(digest, found[digest])
    return found[root.digest()]


def _visit(
    node: CasDirectory | Digest, digest: Digest, where: RelPath, store: ContentStore
) -> tuple[str | None, list[tuple[str, CasDirectory | Digest]]]:
    """A node's own marking (None: unmarked) and its subdirectories sorted by name."""
    if isinstance(node, CasDirectory) and node.loaded_entries() is not None:
        entries = node.entries()
        loaded = sorted((name, entry) for name, entry in entries.items() if isinstance(entry, CasDirectory))
        return node.node_properties().get(READ_ONLY_PROPERTY), list(loaded)
    try:
        data = store.read(digest)
    except ReapiError as err:
        raise err.within(f"loading directory {join(where) or '.'!r}") from None
    try:
        proto = re_pb2.Directory.FromString(data)
    except DecodeError as err:
        raise InvalidArgument(f"Directory {digest} at {join(where) or '.'!r} is not a Directory proto: {err}") from None
    own = next((p.value for p in proto.node_properties.properties if p.name == READ_ONLY_PROPERTY), None)
    children: list[tuple[str, CasDirectory | Digest]] = []
    for sub in proto.directories:
        try:
            check_name(sub.name)
            children.append((sub.name, Digest(sub.digest.hash, sub.digest.size_bytes)))
        except InvalidArgument as err:
            raise InvalidArgument(f"Directory {digest} at {join(where) or '.'!r}: entry {sub.name!r}: {err}") from None
    children.sort()
    return own, children


def read_only_changes(markings: Markings) -> Markings:
    """The markings that change the answer, nearest marked ancestor winning: each kept
    entry differs from what its nearest marked ancestor (or, for none, the writable
    default) says. ``markings`` must list parents before children, as
    :func:`read_only_markings` does; so does the result."""
    decided: dict[RelPath, bool] = {}
    changes: list[tuple[RelPath, bool]] = []
    for path, read_only in markings:
        inherited = next((decided[path[:i]] for i in range(len(path) - 1, -1, -1) if path[:i] in decided), False)
        decided[path] = read_only
        if read_only != inherited:
            changes.append((path, read_only))
    return tuple(changes)
