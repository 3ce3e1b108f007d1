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
node costs 48 ms for 10k files, 398 ms for 50k; the shallow read 11 and 79 ms (since
cut, below). A hardlink stager then loads every node once more for the export (the
shallow reads are the extra). The shallow read checks what the markings' paths are made of (each
subdirectory's name and digest) and that the node is a Directory proto; the rest of a
node is checked when it is loaded.

What the walk costs, and why it is shaped so (issue 12: a lazy FUSE action waits for
this walk, and for a tree never seen it must read every Directory before the command).
Profiled at 50k files (2,751 Directories, warm cache on /dev/shm, fresh memo), the walk
cost 60 ms: ``LocalCAS.read`` 31 (a translated-errors context, an fstat, a counter under a
lock, an ``utime`` to record the use; open+read+close alone is 20), the proto parses 5,
the rest the walk's own Python (a :class:`Digest` hashes in Python, ~10 times a node).
So:

* :func:`_read_file` opens the cache's file itself when the store's blobs are files:
  its size checked against the digest, any doubt (absent, evicted, another size, any
  OSError) sent to ``store.read``, which fetches, translates and raises MissingBlobs as
  before. Lost: LRU advice only — a Directory read by this walk alone is not marked used,
  as before for every tree the memo already knew (the walk does not read those at all);
* keys are ``(hash, size)`` tuples; the memo is asked about a node's children at once and
  told the walk's new nodes at once (one lock each, not one a node);
* two passes: first read every node not known, then combine children's markings into
  their parents' — skipped when no node read and no subtree known has a marking, the
  common case (every Bazel tree), which then costs one visit a node, not two;
* a node's properties are looked at only if the property's name is in its bytes.

Before and after in one run, min of 11 (two cores shared, load ~2.7; wall clock): 10k
files 9.8 -> 4.4 ms, 50k 66.9 -> 29.7 ms; the whole FUSE action at 50k
(``bench/bench_fuse.py``) 110 -> 60 ms beside a 229 ms ``cp -al`` floor.
Still one read a Directory never seen (~10 us each): at "any size" only a view that
enforces the markings as it is looked up (the FUSE file system) would make it constant.
Not done: parsing into a message of only the two fields needed (1.2 us a node less,
~3 ms at 50k) — a Directory whose file entries do not parse would then pass this walk
and, under a lazy stager, reach the command; today it is INVALID_ARGUMENT before it.
"""

from __future__ import annotations

import collections
import os
import threading

from google.protobuf.message import DecodeError

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import InvalidArgument, ReapiError

from .content import ContentStore, LocalContent
from .digests import Digest
from .directory.cas import CasDirectory
from .paths import RelPath, check_name, join

#: The Directory node property this module reads.
READ_ONLY_PROPERTY = "SubtreeReadOnly"

#: (path relative to the subtree's root, read-only?) for every marked directory of a subtree.
Markings = tuple[tuple[RelPath, bool], ...]

_VALUES = {"true": True, "false": False}
_PROPERTY_BYTES = READ_ONLY_PROPERTY.encode()


#: A Directory digest as ``(hash, size_bytes)``: the walk's and the memo's key. A tuple,
#: not a :class:`Digest`, because a Digest hashes in Python and the walk hashes each key
#: about ten times: at 50k files that was 8 of the walk's 30 ms.
_Key = tuple[str, int]


class MarkingsMemo:
    """The markings of subtrees by Directory digest, at most ``max_entries`` (least recently
    used forgotten first). Thread-safe."""

    def __init__(self, max_entries: int = 1 << 16) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._known: collections.OrderedDict[_Key, Markings] = collections.OrderedDict()

    def get(self, digest: Digest) -> Markings | None:
        key = (digest.hash, digest.size_bytes)
        return self._get_known([key]).get(key)

    def put(self, digest: Digest, markings: Markings) -> None:
        self._put_all({(digest.hash, digest.size_bytes): markings})

    # By key, for this module's walk:

    def _get_known(self, keys: list[_Key]) -> dict[_Key, Markings]:
        """Those of ``keys`` remembered, with their markings, under one lock (a node's
        children at once)."""
        known = self._known
        with self._lock:
            found = {key: known[key] for key in keys if key in known}
            for key in found:
                known.move_to_end(key)
        return found

    def _put_all(self, found: dict[_Key, Markings]) -> None:
        """Remember every subtree of ``found`` (a walk's new nodes) under one lock."""
        with self._lock:
            self._known.update(found)  # (new keys go last: most recently used)
            while len(self._known) > self._max:
                self._known.popitem(last=False)


#: A node of the walk: a CasDirectory while its parent was loaded, a bare Digest below one
#: read shallowly; with its key.
_Node = CasDirectory | Digest


def read_only_markings(root: CasDirectory, memo: MarkingsMemo | None = None) -> Markings:
    """Every directory of ``root``'s tree that carries ``SubtreeReadOnly``, parents before
    children, siblings by name.

    Raises InvalidArgument naming the directory whose value is neither ``true`` nor
    ``false``, whose subdirectory has an invalid name or digest, or which is not a
    Directory proto; MissingBlobs for an absent Directory. Nodes already loaded are read
    as they are, the others shallowly (module docstring) and left unloaded; the tree must
    not be visited by another thread meanwhile (see :meth:`CasDirectory.entries`).
    """
    memo = memo if memo is not None else MarkingsMemo()
    root_digest = root.digest()
    root_key = (root_digest.hash, root_digest.size_bytes)
    known, read = _read_unknown_nodes(root, root_key, memo)
    # Why two passes rather than one post-order walk that combines as it goes: nearly every
    # tree has no marking at all, and then there is nothing to combine — every new node's
    # answer is "none" — so the common case pays one visit per node, not two.
    if not any(known.values()) and all(own is None for own, _ in read.values()):
        memo._put_all(dict.fromkeys(read, ()))
        return ()
    found = _combine(root_key, known, read)
    memo._put_all({key: found[key] for key in read})
    return found[root_key]


#: A node read in this walk: its own value of the property (None: unmarked) and its
#: subdirectories (name, node, key) sorted by name.
_Read = tuple[str | None, list[tuple[str, _Node, _Key]]]


def _read_unknown_nodes(
    root: CasDirectory, root_key: _Key, memo: MarkingsMemo
) -> tuple[dict[_Key, Markings], dict[_Key, _Read]]:
    """The subtrees of ``root`` the memo knows (their markings), and every other node (read
    shallowly, its value checked), each once."""
    store = root.store
    local = store if isinstance(store, LocalContent) else None  # asked once: an ABC check is slow
    read: dict[_Key, _Read] = {}
    known = memo._get_known([root_key])
    # Depth first without recursion (a tree can be deeper than Python's stack). A node is
    # pushed if the memo did not know it when its parent was read; the memo is asked about
    # a node's children together, under one lock.
    stack: list[tuple[_Node, _Key, RelPath]] = [] if known else [(root, root_key, ())]
    while stack:
        node, key, where = stack.pop()
        if key in read:
            continue  # the same subtree at two places
        if isinstance(node, Digest):  # (a plain class: a fast check, unlike CasDirectory's ABC)
            data = _read_file(local, node) if local is not None else None
            if data is None:
                data = _read_through(store, node, where)
            own, children = read[key] = _parse(data, node, where)
        else:
            own, children = read[key] = _visit_loaded(node, where, store)
        if own is not None and own not in _VALUES:
            raise InvalidArgument(
                f"input root directory {join(where) or '.'!r}: node property "
                f"{READ_ONLY_PROPERTY}={own!r}, expected 'true' or 'false'"
            )
        if children:
            known.update(memo._get_known([child_key for _, _, child_key in children if child_key not in known]))
            stack.extend([(child, child_key, where + (name,)) for name, child, child_key in children
                          if child_key not in known])
    return known, read


def _combine(root_key: _Key, known: dict[_Key, Markings], read: dict[_Key, _Read]) -> dict[_Key, Markings]:
    """The markings of every subtree under ``root_key``, from the nodes read and the
    subtrees known, children before parents (post-order without recursion)."""
    found = dict(known)
    stack: list[tuple[_Key, bool]] = [(root_key, False)]
    while stack:
        key, children_done = stack.pop()
        if key in found:
            continue
        own, children = read[key]
        if not children_done:
            stack.append((key, True))
            stack.extend([(child_key, False) for _, _, child_key in children])
            continue
        markings: list[tuple[RelPath, bool]] = [] if own is None else [((), _VALUES[own])]
        for name, _, child_key in children:
            markings.extend(((name,) + path, read_only) for path, read_only in found[child_key])
        found[key] = tuple(markings)
    return found


def _visit_loaded(node: CasDirectory, where: RelPath, store: ContentStore) -> _Read:
    """What :func:`_parse` gives, for a node given as a CasDirectory: from its entries if
    it is loaded (the root, the paths the mount points were checked along), else read."""
    entries = node.loaded_entries()
    if entries is None:
        digest = node.digest()
        return _parse(_read_through(store, digest, where), digest, where)
    children: list[tuple[str, _Node, _Key]] = []
    for name, entry in sorted(entries.items()):
        if isinstance(entry, CasDirectory):
            digest = entry.digest()
            children.append((name, entry, (digest.hash, digest.size_bytes)))
    return node.node_properties().get(READ_ONLY_PROPERTY), children


def _parse(data: bytes, digest: Digest, where: RelPath) -> _Read:
    """A Directory blob's own marking (None: unmarked) and its subdirectories sorted by
    name; InvalidArgument if it is not a Directory proto or names a subdirectory badly."""
    try:
        proto = re_pb2.Directory.FromString(data)
    except DecodeError as err:
        raise InvalidArgument(f"Directory {digest} at {join(where) or '.'!r} is not a Directory proto: {err}") from None
    own = None
    if _PROPERTY_BYTES in data:  # (a name is stored as its bytes: absent, no need to look)
        for prop in proto.node_properties.properties:
            if prop.name == READ_ONLY_PROPERTY:
                own = prop.value
                break
    children: list[tuple[str, _Node, _Key]] = []
    for sub in proto.directories:
        name, sub_digest = sub.name, sub.digest
        try:
            check_name(name)
            child = Digest(sub_digest.hash, sub_digest.size_bytes)
        except InvalidArgument as err:
            raise InvalidArgument(f"Directory {digest} at {join(where) or '.'!r}: entry {name!r}: {err}") from None
        children.append((name, child, (child.hash, child.size_bytes)))
    children.sort()  # (names are unique in a valid Directory: digests compared only in a hostile one)
    return own, children


def _read_file(local: LocalContent, digest: Digest) -> bytes | None:
    """The Directory blob's bytes straight from the local cache's file (module docstring:
    why), or None when in any doubt — absent, evicted, another size, any OSError — for
    :func:`_read_through` to decide."""
    # ``object_path`` is formatting only; ``digest`` was checked (64 hex digits), so the
    # path stays in the cache. A blob evicted meanwhile is either read whole from its open
    # descriptor or not found; a file of another size is not trusted.
    try:
        fd = os.open(local.object_path(digest), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, digest.size_bytes + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) == digest.size_bytes else None


def _read_through(store: ContentStore, digest: Digest, where: RelPath) -> bytes:
    """The Directory blob's bytes from ``store.read``: fetched from the remote on a miss,
    or MissingBlobs naming it and where it is."""
    try:
        return store.read(digest)
    except ReapiError as err:
        raise err.within(f"loading directory {join(where) or '.'!r}") from None


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
