"""``ParsedTrees``: Directory protos parsed once, kept as immutable nodes by digest.

Parsing is what a re-stage of a known tree spends most of its time on when it walks the
tree: most of a 10,000-file hardlink re-stage went to turning its Directory protos into
checked entries. From a flat tree kept by root digest the stage phase of that re-stage
fell from 103 to 45 ms, and from 759 to 225 ms at 50,000 files (``bench/bench_tree_cache.py``,
``hardlink: seen``, medians of 5-7 in two runs of one day). A Directory digest names an immutable node,
so the parsed, checked form can be kept and shared by every tree that contains it: a root
seen before costs one dictionary lookup per node visited, and a new root that shares
subtrees with earlier ones parses only its new nodes. The cache is a bounded LRU of nodes
(~2 KiB each for 20 entries); entries are checked exactly as :class:`CasDirectory` checks
them (canonical order, names, symlink policy) because that is what parses them.

For a whole root there is also a flattened form, :class:`FlatTree`, kept by root digest:
every directory, file and symlink in one list each, and the set of its blobs — what a
stager that writes the whole tree out needs, so that staging a root seen before parses
nothing and builds no set.

Thread-safe: two threads may parse one node at once (both get equal nodes).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from .content import ContentStore
from .digests import Digest
from .directory.cas import CasDirectory, FileEntry, LinkEntry


@dataclass(frozen=True, slots=True)
class TreeNode:
    """One Directory: its files ``(name, digest, executable)``, subdirectories
    ``(name, digest)`` and symlinks ``(name, target)``, each sorted by name."""

    files: tuple[tuple[str, Digest, bool], ...]
    dirs: tuple[tuple[str, Digest], ...]
    links: tuple[tuple[str, str], ...]

    def entry(self, name: str) -> tuple[Digest, bool] | Digest | str | None:
        """The file ``(digest, executable)``, the subdirectory's digest, the symlink's target,
        or None."""
        for file_name, digest, executable in self.files:
            if file_name == name:
                return digest, executable
        for dir_name, digest in self.dirs:
            if dir_name == name:
                return digest
        for link_name, target in self.links:
            if link_name == name:
                return target
        return None


@dataclass(frozen=True, slots=True)
class FlatTree:
    """A whole tree, flattened: ``dirs`` below the root (paths, parents first), ``files``
    ``(index into dirs + 1 or 0 for the root, name, digest, executable)``, ``links``
    ``(index, name, target)`` alike, and ``digests``, every file blob once."""

    dirs: tuple[tuple[str, ...], ...]
    files: tuple[tuple[int, str, Digest, bool], ...]
    links: tuple[tuple[int, str, str], ...]
    digests: frozenset[Digest]

    @property
    def size(self) -> int:
        return len(self.dirs) + len(self.files) + len(self.links)


class ParsedTrees:
    """Parsed nodes by Directory digest, at most ``max_nodes`` of them, and flattened trees
    by root digest, at most ``max_flat_entries`` entries in all (both LRU)."""

    # Defaults: ~64 MiB of nodes (~2 KiB for 20 entries: ~600,000 files' worth) and ~50 MiB
    # of flattened trees (~100 bytes an entry; names and digests are shared with the nodes).
    def __init__(self, max_nodes: int = 1 << 15, max_flat_entries: int = 1 << 19) -> None:
        self._max = max_nodes
        self._max_flat = max_flat_entries
        self._lock = threading.Lock()
        self._nodes: collections.OrderedDict[Digest, TreeNode] = collections.OrderedDict()
        self._flat: collections.OrderedDict[Digest, FlatTree] = collections.OrderedDict()
        self._flat_entries = 0
        self.parsed = 0  # nodes parsed since creation (tests, benchmarks)

    def flat(self, store: ContentStore, root: Digest) -> FlatTree:
        """The flattened tree under ``root``, built from its nodes (parsing those not known)
        unless known. Raises what parsing raises."""
        with self._lock:
            known = self._flat.get(root)
            if known is not None:
                self._flat.move_to_end(root)
                return known
        dirs: list[tuple[str, ...]] = []
        files: list[tuple[int, str, Digest, bool]] = []
        links: list[tuple[int, str, str]] = []
        for parts, node in self.walk(store, root):
            index = 0
            if parts:
                dirs.append(parts)
                index = len(dirs)
            files.extend((index, name, digest, executable) for name, digest, executable in node.files)
            links.extend((index, name, target) for name, target in node.links)
        tree = FlatTree(tuple(dirs), tuple(files), tuple(links), frozenset(d for _, _, d, _ in files))
        with self._lock:
            if root not in self._flat:
                self._flat[root] = tree
                self._flat_entries += tree.size
                while self._flat_entries > self._max_flat and len(self._flat) > 1:
                    _, old = self._flat.popitem(last=False)
                    self._flat_entries -= old.size
        return tree

    def node(self, store: ContentStore, digest: Digest) -> TreeNode:
        """The node of ``digest``, parsed from ``store`` if not known. Raises what loading a
        CasDirectory raises (MissingBlobs, InvalidArgument)."""
        with self._lock:
            node = self._nodes.get(digest)
            if node is not None:
                self._nodes.move_to_end(digest)
                return node
        files: list[tuple[str, Digest, bool]] = []
        dirs: list[tuple[str, Digest]] = []
        links: list[tuple[str, str]] = []
        for name, entry in CasDirectory.from_digest(store, digest).entries().items():
            if type(entry) is FileEntry:
                files.append((name, entry.digest, entry.executable))
            elif type(entry) is LinkEntry:
                links.append((name, entry.target))
            else:
                assert isinstance(entry, CasDirectory)
                dirs.append((name, entry.digest()))
        node = TreeNode(tuple(sorted(files)), tuple(sorted(dirs)), tuple(sorted(links)))
        with self._lock:
            self.parsed += 1
            self._nodes[digest] = node
            while len(self._nodes) > self._max:
                self._nodes.popitem(last=False)
        return node

    def walk(self, store: ContentStore, root: Digest) -> Iterator[tuple[tuple[str, ...], TreeNode]]:
        """Every node of the tree under ``root`` with its path, parents before children."""
        stack: list[tuple[tuple[str, ...], Digest]] = [((), root)]
        while stack:
            parts, digest = stack.pop()
            node = self.node(store, digest)
            yield parts, node
            stack.extend((parts + (name,), child) for name, child in reversed(node.dirs))

    def lookup(self, store: ContentStore, root: Digest, parts: tuple[str, ...]) -> tuple[Digest, bool] | None:
        """The file ``(digest, executable)`` at ``parts`` below ``root``, or None (absent, or
        not a regular file). Parses only the nodes on the way."""
        digest = root
        for name in parts[:-1]:
            child = self.node(store, digest).entry(name)
            if not isinstance(child, Digest):
                return None
            digest = child
        found = self.node(store, digest).entry(parts[-1]) if parts else None
        return found if isinstance(found, tuple) else None
