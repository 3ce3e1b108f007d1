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
node. For a hardlink-staged tree the visit loads nodes the export loads anyway.
"""

from __future__ import annotations

import collections
import threading

from reapi_worker.protos.errors import InvalidArgument

from .digests import Digest
from .directory.cas import CasDirectory
from .paths import RelPath, join

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
    ``false``, and what loading a node raises (MissingBlobs, InvalidArgument). Loads every
    node of the subtrees ``memo`` does not know; the tree must not be visited by another
    thread meanwhile (see :meth:`CasDirectory.entries`).
    """
    memo = memo if memo is not None else MarkingsMemo()
    # Post-order without recursion (a tree can be deeper than Python's stack).
    found: dict[Digest, Markings] = {}
    stack: list[tuple[CasDirectory, RelPath, bool]] = [(root, (), False)]
    while stack:
        node, where, children_done = stack.pop()
        digest = node.digest()
        if digest in found:
            continue
        known = memo.get(digest)
        if known is not None:
            found[digest] = known
            continue
        entries = node.entries()
        children = sorted((name, entry) for name, entry in entries.items() if isinstance(entry, CasDirectory))
        if not children_done:
            stack.append((node, where, True))
            stack.extend((child, where + (name,), False) for name, child in children)
            continue
        markings: list[tuple[RelPath, bool]] = []
        own = node.node_properties().get(READ_ONLY_PROPERTY)
        if own is not None:
            if own not in _VALUES:
                raise InvalidArgument(
                    f"input root directory {join(where) or '.'!r}: node property "
                    f"{READ_ONLY_PROPERTY}={own!r}, expected 'true' or 'false'"
                )
            markings.append(((), _VALUES[own]))
        for name, child in children:
            markings.extend(((name,) + path, read_only) for path, read_only in found[child.digest()])
        found[digest] = tuple(markings)
        memo.put(digest, found[digest])
    return found[root.digest()]


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
