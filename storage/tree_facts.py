"""``TreeFacts``: the sizes of input trees, remembered by Directory digest.

A Directory digest names an immutable subtree, so its size (files, directories, bytes)
never changes and can be reused by every later action whose input root shares that
subtree (a toolchain, a vendored library, the unchanged part of a repository). The sizes
are what :class:`~.auto_staging.AutoStager` decides by; measuring a 50,000-file tree loads
2,751 Directory protos, so a tree measured before costs one dictionary lookup and a new
root that shares subtrees costs only its new parts. Kept in a bounded LRU.

Whether every input blob is present is not a fact kept here: the FUSE stager finds
missing inputs lazily (the trade-off is in ``storage/fuse/stager.py``) and the linking
stagers find them as they link.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

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
    """Sizes of subtrees by Directory digest (see the module docstring).

    ``max_sizes`` bounds the remembered sizes (~100 bytes each).
    Thread-safe; the trees passed in must not be visited concurrently by another thread
    (see :meth:`CasDirectory.entries`).
    """

    def __init__(self, max_sizes: int = 1 << 18) -> None:
        self._max_sizes = max_sizes
        self._lock = threading.Lock()
        self._sizes: collections.OrderedDict[Digest, TreeSize] = collections.OrderedDict()

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

    def forget(self) -> None:
        """Forget every fact (e.g. after the store was emptied)."""
        with self._lock:
            self._sizes.clear()

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
