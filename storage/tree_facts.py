"""``TreeFacts``: what a worker learns about input trees, remembered by Directory digest.

A Directory digest names an immutable subtree, so facts about it can be kept and reused by
every later action whose input root shares that subtree (a toolchain, a vendored library,
the unchanged part of a repository):

* its **size** (files, directories, bytes) never changes: kept in a bounded LRU;
* that it was **complete** — every blob below it present in the store — holds until the
  store forgets something; kept for ``complete_ttl`` seconds, then checked again.

Why this exists: a lazy stager must still answer REAPI's "every missing input is
FAILED_PRECONDITION, all of them named" before the command starts, but loading every
Directory proto of a 50,000-file tree costs ~200 ms in Python (2,751 protos, 50,000
entries) and checking 50,000 digests ~45 ms more — most of what the lazy stager saves.
With the facts remembered, a tree seen before costs one dictionary lookup, and a new root
that shares subtrees costs only its new parts.

If a blob goes missing within the TTL (evicted from a cache with no remote behind it), the
lazy stager still reports it: reading it fails the action with MissingBlobs naming it.

The FUSE stager no longer asks :meth:`TreeFacts.check_complete` before the command: it
reports missing inputs lazily (the trade-off is in ``storage/fuse/stager.py``); sizes are
still what :class:`~.auto_staging.AutoStager` decides by.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from reapi_worker.protos.errors import MissingBlobs

from .content import ContentStore
from .digests import Digest
from .directory.cas import CasDirectory, FileEntry


@dataclass(frozen=True, slots=True)
class TreeSize:
    """Files (counting a blob used twice twice), directories (the root included) and the
    bytes of all files of a tree."""

    files: int
    directories: int
    bytes: int

    def __add__(self, other: "TreeSize") -> "TreeSize":
        return TreeSize(self.files + other.files, self.directories + other.directories, self.bytes + other.bytes)


class TreeFacts:
    """Sizes and completeness of subtrees by Directory digest (see the module docstring).

    ``max_sizes`` bounds the remembered sizes (~100 bytes each); ``complete_ttl`` is how long
    a subtree found complete is trusted to stay so; ``clock`` is injected for tests.
    Thread-safe; the trees passed in must not be visited concurrently by another thread
    (see :meth:`CasDirectory.entries`).
    """

    def __init__(
        self,
        max_sizes: int = 1 << 18,
        complete_ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_sizes = max_sizes
        self._ttl = complete_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._sizes: collections.OrderedDict[Digest, TreeSize] = collections.OrderedDict()
        self._complete: dict[Digest, float] = {}

    def size(self, root: CasDirectory) -> TreeSize:
        """The size of ``root``'s tree, loading only the subtrees not measured before.
        Raises what loading raises (MissingBlobs for an absent Directory, InvalidArgument)."""
        known = self._known_size(root.digest())
        if known is not None:
            return known
        # Post-order without recursion (a tree can be deeper than Python's stack).
        stack: list[tuple[CasDirectory, bool]] = [(root, False)]
        sizes: dict[Digest, TreeSize] = {}
        while stack:
            node, children_done = stack.pop()
            digest = node.digest()
            if digest in sizes:
                continue
            known = self._known_size(digest)
            if known is not None:
                sizes[digest] = known
                continue
            entries = node.entries()
            if not children_done:
                stack.append((node, True))
                stack.extend((child, False) for child in entries.values() if isinstance(child, CasDirectory))
                continue
            total = TreeSize(0, 1, 0)
            for entry in entries.values():
                if isinstance(entry, CasDirectory):
                    total = total + sizes[entry.digest()]
                elif type(entry) is FileEntry:
                    total = TreeSize(total.files + 1, total.directories, total.bytes + entry.digest.size_bytes)
            sizes[digest] = total
            self._remember_size(digest, total)
        return sizes[root.digest()]

    def check_complete(self, root: CasDirectory, store: ContentStore) -> None:
        """Raise MissingBlobs naming every file blob of ``root`` that ``store`` lacks, looking
        only below subtrees not found complete within the TTL (one ``find_missing`` call for
        all of them). Directory protos are read as the tree is walked (MissingBlobs,
        InvalidArgument from loading)."""
        now = self._clock()
        visited: list[Digest] = []
        blobs: set[Digest] = set()
        stack = [root]
        while stack:
            node = stack.pop()
            digest = node.digest()
            if self._is_complete(digest, now):
                continue
            visited.append(digest)
            for entry in node.entries().values():
                if isinstance(entry, CasDirectory):
                    stack.append(entry)
                elif type(entry) is FileEntry:
                    blobs.add(entry.digest)
        missing = store.find_missing(blobs) if blobs else set()
        if missing:
            raise MissingBlobs(missing)
        with self._lock:
            if len(self._complete) > 4 * self._max_sizes:  # forget the expired ones
                self._complete = {d: t for d, t in self._complete.items() if now - t < self._ttl}
            for digest in visited:
                self._complete[digest] = now

    def forget(self) -> None:
        """Forget every fact (e.g. after the store was emptied)."""
        with self._lock:
            self._sizes.clear()
            self._complete.clear()

    def _is_complete(self, digest: Digest, now: float) -> bool:
        with self._lock:
            checked = self._complete.get(digest)
        return checked is not None and now - checked < self._ttl

    def _known_size(self, digest: Digest) -> TreeSize | None:
        with self._lock:
            size = self._sizes.get(digest)
            if size is not None:
                self._sizes.move_to_end(digest)
            return size

    def _remember_size(self, digest: Digest, size: TreeSize) -> None:
        with self._lock:
            self._sizes[digest] = size
            while len(self._sizes) > self._max_sizes:
                self._sizes.popitem(last=False)
