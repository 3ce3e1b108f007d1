"""``CasDirectory``: the Directory API over REAPI Directory protos in a ContentStore.

A tree is a graph of nodes, one per directory. A node loaded from the store starts as
just a digest; its Directory proto is read, checked (canonical, valid names, symlinks
the policy accepts) and turned into entries on first visit. Edits happen in memory.
Each node keeps its digest until a change below it clears it, up to the root; then
``digest()`` recomputes only the cleared nodes and writes each new proto into the store,
so a tree can always be re-loaded from its digest.

Invariants (what the code relies on):

* a node whose entries are not loaded has a digest, and its proto is in the store
  (or was claimed to be: a missing one is MissingBlobs on first visit);
* a node without a digest has loaded entries and so do all its ancestors, none of
  which has a digest either (clearing goes all the way up).

File blobs are never copied by tree edits: ``copy`` shares them, ``import_files`` from
another CasDirectory on the same store shares them.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import BinaryIO, Union

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ReapiError,
    from_os_error,
)

from ..content import ContentStore, LocalContent
from ..digests import EMPTY_DIGEST, Digest, serialize
from ..paths import RelPath, SymlinkPolicy, join, split_relative
from . import _canonical, _local
from ._importing import ImportSource, Op, SrcDir, SrcFile, SrcLink, plan, source_of
from .base import Directory, FileStat, FileType, ImportFilter, ImportResult

# errno values where a hardlink is impossible but a copy will do: another file system,
# the inode's link limit, a file system (or security module) that forbids links.
_LINK_FALLBACK = frozenset((errno.EXDEV, errno.EMLINK, errno.EPERM))


@dataclass(frozen=True, slots=True)
class _File:
    digest: Digest
    executable: bool


@dataclass(frozen=True, slots=True)
class _Link:
    target: str


_Entry = Union[_File, _Link, "CasDirectory"]
#: The entry values :meth:`CasDirectory.entries` hands out (a file: ``digest`` and
#: ``executable``; a symlink: ``target``), for readers that walk a tree node by node.
FileEntry = _File
LinkEntry = _Link
# Rows of a Directory proto, as _canonical.build takes them (named here because the
# method CasDirectory.list shadows the builtin inside the class).
_FileRows = list[tuple[str, Digest, bool]]
_DirRows = list[tuple[str, Digest]]
_LinkRows = list[tuple[str, str]]


class CasDirectory(Directory):
    """A Directory whose nodes are REAPI Directory protos in ``store``.

    Build with :meth:`empty`, :meth:`from_digest` or :meth:`from_tree`. Reading an
    unloaded node can raise MissingBlobs (the proto is not in the store) or
    InvalidArgument (the proto is not canonical, names the digest and the entry).
    """

    def __init__(
        self,
        store: ContentStore,
        digest: Digest | None = None,
        symlink_policy: SymlinkPolicy = SymlinkPolicy.ANY,
    ) -> None:
        """A node: unloaded with ``digest``, or (None) a new empty directory. Prefer the
        named constructors."""
        self._store = store
        self.symlink_policy = symlink_policy
        self._parent: CasDirectory | None = None
        self._name = ""
        self._digest = digest
        self._entries: dict[str, _Entry] | None = None if digest is not None else {}

    @classmethod
    def empty(cls, store: ContentStore, symlink_policy: SymlinkPolicy = SymlinkPolicy.ANY) -> "CasDirectory":
        """A new empty tree (nothing is written to the store until ``digest()``)."""
        return cls(store, None, symlink_policy)

    @classmethod
    def from_digest(
        cls, store: ContentStore, digest: Digest, symlink_policy: SymlinkPolicy = SymlinkPolicy.ANY
    ) -> "CasDirectory":
        """The tree whose root Directory proto is ``digest``; nothing is read yet."""
        return cls(store, digest, symlink_policy)

    @classmethod
    def from_tree(
        cls, store: ContentStore, tree: re_pb2.Tree, symlink_policy: SymlinkPolicy = SymlinkPolicy.ANY
    ) -> "CasDirectory":
        """Store the protos of a REAPI ``Tree`` (root and children) and return the tree.
        Children the root does not reach are stored but unused."""
        for child in tree.children:
            store.write(serialize(child))
        return cls(store, store.write(serialize(tree.root)), symlink_policy)

    @property
    def store(self) -> ContentStore:
        return self._store

    def __repr__(self) -> str:
        state = str(self._digest) if self._digest is not None else "modified"
        return f"CasDirectory({join(self._parts()) or '.'!r}, {state})"

    # -- nodes --------------------------------------------------------------------------

    def _new_child(self, digest: Digest | None) -> "CasDirectory":
        return CasDirectory(self._store, digest, self.symlink_policy)

    def _parts(self) -> RelPath:
        """Where this node sits in its tree (from the root node)."""
        names: list[str] = []
        node = self
        while node._parent is not None:
            names.append(node._name)
            node = node._parent
        return tuple(reversed(names))

    def _load(self) -> dict[str, _Entry]:
        """This node's entries, read and checked from the store on first visit."""
        entries = self._entries
        if entries is not None:
            return entries
        digest = self._digest
        assert digest is not None  # invariant: unloaded nodes have a digest
        parts = self._parts()
        try:
            data = self._store.read(digest)
        except ReapiError as err:
            raise err.within(f"loading directory {join(parts) or '.'!r}") from None
        proto = _canonical.parse(data, digest, parts, self.symlink_policy)
        entries = {}
        for file_node in proto.files:
            name = file_node.name
            entries[name] = _File(_canonical.child_digest(file_node.digest, digest, name), file_node.is_executable)
        for dir_node in proto.directories:
            name = dir_node.name
            child = self._new_child(_canonical.child_digest(dir_node.digest, digest, name))
            child._parent = self
            child._name = name
            entries[name] = child
        for link_node in proto.symlinks:
            entries[link_node.name] = _Link(link_node.target)
        self._entries = entries
        return entries

    def _attach(self, name: str, entry: _Entry) -> None:
        """Put ``entry`` at ``name`` (replacing what is there) and clear digests upward."""
        self._load()[name] = entry
        if isinstance(entry, CasDirectory):
            entry._parent = self
            entry._name = name
        self._changed()

    def _detach(self, name: str) -> _Entry:
        entry = self._load().pop(name)
        if isinstance(entry, CasDirectory):
            entry._parent = None
            entry._name = ""
        self._changed()
        return entry

    def _changed(self) -> None:
        node: CasDirectory | None = self
        while node is not None and node._digest is not None:
            node._digest = None
            node = node._parent

    def _lookup(self, parts: RelPath, create: bool = False) -> "CasDirectory":
        """The directory at ``parts`` below this node (see descend for the errors)."""
        node = self
        for i, name in enumerate(parts):
            entries = node._load()
            entry = entries.get(name)
            if entry is None:
                if not create:
                    raise NotFound(f"{self._where(parts[: i + 1])!r} does not exist")
                entry = node._new_child(None)
                node._attach(name, entry)
            elif not isinstance(entry, CasDirectory):
                if create:
                    raise AlreadyExists(f"{self._where(parts[: i + 1])!r} exists and is not a directory")
                raise NotFound(f"{self._where(parts[: i + 1])!r} is not a directory")
            node = entry
        return node

    def _entry(self, parts: RelPath) -> _Entry | None:
        """The entry at non-empty ``parts``, or None; NotFound if the parent is missing."""
        return self._lookup(parts[:-1])._load().get(parts[-1])

    def _where(self, parts: RelPath) -> str:
        return join(self._parts() + parts) or "."

    @staticmethod
    def _name_path(path: str, what: str) -> RelPath:
        parts = split_relative(path)
        if not parts:
            raise InvalidArgument(f"{what}: {path!r} names the directory itself")
        return parts

    # -- navigation -----------------------------------------------------------------------

    def descend(self, path: str, create: bool = False) -> "CasDirectory":
        return self._lookup(split_relative(path), create)

    def stat(self, path: str) -> FileStat:
        parts = split_relative(path)
        if not parts:
            return FileStat(FileType.DIRECTORY, digest=self.digest())
        entry = self._entry(parts)
        if entry is None:
            raise NotFound(f"{self._where(parts)!r} does not exist")
        return _stat(entry)

    def list(self) -> list[str]:
        return sorted(self._load())

    def entries(self) -> Mapping[str, "FileEntry | LinkEntry | CasDirectory"]:
        """This node's entries by name — a :data:`FileEntry`, a :data:`LinkEntry` or a child
        CasDirectory — read and checked on first visit (MissingBlobs, InvalidArgument), as a
        read-only view. For readers that walk node by node and must not load more of the
        tree than they visit (the lazy FUSE stager).

        Thread-safety: a first visit writes the node; callers that share a tree between
        threads make sure one node is not visited for the first time by two at once.
        """
        return MappingProxyType(self._load())

    def loaded_entries(self) -> Mapping[str, "FileEntry | LinkEntry | CasDirectory"] | None:
        """As :meth:`entries` if this node has been visited, else None; never reads the store
        (so it is safe beside a first visit running in another thread)."""
        entries = self._entries
        return None if entries is None else MappingProxyType(entries)

    def walk(self) -> Iterator[tuple[str, FileStat]]:
        self.digest()  # every directory's stat carries its digest: compute them in one pass
        return self._walk()

    def _walk(self) -> Iterator[tuple[str, FileStat]]:
        # Iterative, like every traversal here: an action can make a tree deeper than
        # Python's recursion limit.
        entries = self._load()
        stack: list[tuple[str, _Entry]] = [(name, entries[name]) for name in sorted(entries, reverse=True)]
        while stack:
            path, entry = stack.pop()
            yield path, _stat(entry)
            if isinstance(entry, CasDirectory):
                children = entry._load()
                stack.extend((f"{path}/{name}", children[name]) for name in sorted(children, reverse=True))

    def _nodes(self) -> Iterator[tuple[RelPath, "CasDirectory"]]:
        """This node and every directory below it with its path, loading each, parents
        before children (depth first)."""
        stack: list[tuple[RelPath, CasDirectory]] = [((), self)]
        while stack:
            parts, node = stack.pop()
            yield parts, node
            for name, entry in node._load().items():
                if isinstance(entry, CasDirectory):
                    stack.append((parts + (name,), entry))

    # -- file contents --------------------------------------------------------------------

    def read_bytes(self, path: str) -> bytes:
        parts = self._name_path(path, "read_bytes")
        entry = self._entry(parts)
        if not isinstance(entry, _File):
            raise NotFound(f"{self._where(parts)!r} is not a regular file")
        return self._store.read(entry.digest)

    def write_bytes(self, path: str, data: bytes, executable: bool = False) -> None:
        parent, name = self._room_for(path, "write_bytes")
        parent._attach(name, _File(self._store.write(data), executable))

    def write_stream(self, path: str, stream: BinaryIO, executable: bool = False) -> None:
        parent, name = self._room_for(path, "write_stream")
        parent._attach(name, _File(self._store.write_stream(stream), executable))

    def symlink(self, path: str, target: str) -> None:
        parts = self._name_path(path, "symlink")
        self.symlink_policy.check(self._parts() + parts, target)
        parent, name = self._room_for(path, "symlink")
        parent._attach(name, _Link(target))

    def _room_for(self, path: str, what: str) -> tuple["CasDirectory", str]:
        """(parent, name) for writing a non-directory at ``path``: anything but a
        directory there will be replaced."""
        parts = self._name_path(path, what)
        parent = self._lookup(parts[:-1])
        if isinstance(parent._load().get(parts[-1]), CasDirectory):
            raise AlreadyExists(f"{what}: {self._where(parts)!r} is a directory")
        return parent, parts[-1]

    def mkdir(self, path: str) -> None:
        self._lookup(split_relative(path), create=True)

    # -- tree edits -----------------------------------------------------------------------

    def remove(self, path: str, recursive: bool = False) -> None:
        parts = self._name_path(path, "remove")
        parent = self._lookup(parts[:-1])
        entry = parent._load().get(parts[-1])
        if entry is None:
            raise NotFound(f"remove: {self._where(parts)!r} does not exist")
        if isinstance(entry, CasDirectory) and not recursive and not entry._is_empty():
            raise FailedPrecondition(f"remove: directory {self._where(parts)!r} is not empty")
        parent._detach(parts[-1])

    def _is_empty(self) -> bool:
        if self._entries is None:
            return self._digest == EMPTY_DIGEST  # an empty Directory serializes to b""
        return not self._entries

    def rename(self, src: str, dst: str) -> None:
        self._move(src, dst, keep_source=False)

    def copy(self, src: str, dst: str) -> None:
        self._move(src, dst, keep_source=True)

    def _move(self, src: str, dst: str, keep_source: bool) -> None:
        what = "copy" if keep_source else "rename"
        src_parts = self._name_path(src, what)
        dst_parts = self._name_path(dst, what)
        src_parent = self._lookup(src_parts[:-1])
        entry = src_parent._load().get(src_parts[-1])
        if entry is None:
            raise NotFound(f"{what}: {self._where(src_parts)!r} does not exist")
        is_dir = isinstance(entry, CasDirectory)
        if is_dir and len(dst_parts) > len(src_parts) and dst_parts[: len(src_parts)] == src_parts:
            raise InvalidArgument(f"{what}: cannot move {src!r} into itself ({dst!r})")
        dst_parent = self._lookup(dst_parts[:-1])
        if dst_parts[-1] in dst_parent._load():
            raise AlreadyExists(f"{what}: {self._where(dst_parts)!r} exists")
        if self.symlink_policy is SymlinkPolicy.RELATIVE_INSIDE and len(dst_parts) < len(src_parts):
            # Escaping depends only on depth: a link can only break by moving up.
            base = self._parts() + dst_parts
            if isinstance(entry, _Link):
                self.symlink_policy.check(base, entry.target)
            elif isinstance(entry, CasDirectory):
                for parts, node in entry._nodes():
                    for name, link in node._load().items():
                        if type(link) is _Link:
                            self.symlink_policy.check(base + parts + (name,), link.target)
        if keep_source:
            entry = entry._clone() if isinstance(entry, CasDirectory) else entry
        else:
            src_parent._detach(src_parts[-1])
        dst_parent._attach(dst_parts[-1], entry)

    def _clone(self) -> "CasDirectory":
        """A copy of this subtree sharing blobs: unloaded nodes stay unloaded, digests
        already known are kept."""
        clone = self._new_child(self._digest)
        stack = [(self, clone)]
        while stack:
            original, copy = stack.pop()
            if original._entries is None:
                continue  # copy is unloaded with the same digest
            entries: dict[str, _Entry] = {}
            for name, entry in original._entries.items():
                if isinstance(entry, CasDirectory):
                    child = entry._new_child(entry._digest)
                    child._parent = copy
                    child._name = name
                    stack.append((entry, child))
                    entry = child
                entries[name] = entry
            copy._entries = entries
        return clone

    # -- digests and protos ------------------------------------------------------------------

    def digest(self) -> Digest:
        """The digest of this directory; writes every recomputed Directory proto to the store."""
        if self._digest is None:
            # The nodes without a digest (all loaded, see the invariants), breadth first;
            # in reverse every child comes before its parent.
            dirty = [self]
            for node in dirty:
                assert node._entries is not None
                dirty.extend(e for e in node._entries.values() if isinstance(e, CasDirectory) and e._digest is None)
            for node in reversed(dirty):
                digest, data = _canonical.build(*node._sorted_entries())
                node._store.write(data)
                node._digest = digest
        assert self._digest is not None
        return self._digest

    def _sorted_entries(self) -> tuple[_FileRows, _DirRows, _LinkRows]:
        entries = self._load()
        files: _FileRows = []
        dirs: _DirRows = []
        links: _LinkRows = []
        for name in sorted(entries):
            entry = entries[name]
            if type(entry) is _File:
                files.append((name, entry.digest, entry.executable))
            elif type(entry) is _Link:
                links.append((name, entry.target))
            else:
                assert isinstance(entry, CasDirectory) and entry._digest is not None  # children first
                dirs.append((name, entry._digest))
        return files, dirs, links

    def _proto(self) -> re_pb2.Directory:
        self.digest()  # so that every child has its digest
        return _canonical.build_proto(*self._sorted_entries())

    def file_digests(self) -> Iterator[tuple[Digest, bool]]:
        """(digest, is_executable) of every file in the tree, once per file (a blob used
        twice is listed twice). Loads the whole tree."""
        for _, node in self._nodes():
            for entry in node._load().values():
                if type(entry) is _File:
                    yield entry.digest, entry.executable

    def directory_protos(self) -> Iterator[tuple[Digest, re_pb2.Directory]]:
        """Every distinct Directory proto of the tree (this one first) with its digest.
        Loads the whole tree; computes (and stores) digests that were cleared."""
        seen: set[Digest] = set()
        stack = [self]
        while stack:
            node = stack.pop()
            digest = node.digest()
            if digest in seen:
                continue
            seen.add(digest)
            yield digest, node._proto()
            entries = node._load()
            for name in sorted(entries, reverse=True):  # popped in walk order
                child = entries[name]
                if isinstance(child, CasDirectory):
                    stack.append(child)

    def to_tree(self) -> re_pb2.Tree:
        """This directory as a REAPI ``Tree``: the root and every descendant Directory
        proto, each distinct one once (in walk order), as output directories need."""
        protos = self.directory_protos()
        _, root = next(protos)
        return re_pb2.Tree(root=root, children=[proto for _, proto in protos])

    # -- bulk import/export -----------------------------------------------------------------

    def import_files(
        self,
        source: "str | os.PathLike[str] | Directory",
        filter: ImportFilter | None = None,
        overwrite: bool = True,
    ) -> ImportResult:
        with source_of(source) as src:
            ops, result = plan(src.tree, _NodeTarget(self), filter=filter, overwrite=overwrite,
                               policy=self.symlink_policy, base=self._parts())
            # Every blob goes into the store before the tree changes, so a source that
            # fails to read leaves the tree as it was.
            store = self._store
            blobs = [src.store_into(op.parts, op.entry, store) if isinstance(op.entry, SrcFile) else None
                     for op in ops]
        self._apply(ops, blobs)
        return result

    def _apply(self, ops: Sequence[Op], blobs: Sequence[Digest | None]) -> None:
        """Carry out a checked plan in memory (cannot fail)."""
        parent_parts: RelPath | None = None
        parent = self
        for op, blob in zip(ops, blobs):
            parts = op.parts
            if parts[:-1] != parent_parts:
                if parent_parts is not None and parts[:-2] == parent_parts:
                    parent = parent._load()[parts[-2]]  # type: ignore[assignment]  # one level down
                else:
                    parent = self._lookup(parts[:-1])
                parent_parts = parts[:-1]
            entry = op.entry
            new: _Entry
            if entry is None:
                new = self._new_child(None)
            elif isinstance(entry, SrcLink):
                new = _Link(entry.target)
            else:
                assert blob is not None
                new = _File(blob, entry.executable)
            parent._attach(parts[-1], new)

    def _import_source(self) -> ImportSource:
        return _CasSource(self)

    def export_files(self, dest: str, can_link: bool = True, dir_owner: tuple[int, int] | None = None) -> None:
        """See :meth:`Directory.export_files`. ``dir_owner`` (uid, gid), if given, owns every
        directory written (``dest`` included) so that a sandbox running as that uid can
        create outputs; files stay the cache's (hardlinks must not change owner)."""
        store = self._store
        # Load (and check) every node, and make every blob local, before writing anything.
        nodes = [node for _, node in self._nodes()]
        if isinstance(store, LocalContent):
            digests = {e.digest for n in nodes for e in n._load().values() if type(e) is _File}
            with store.pinned(digests):  # nothing we link may be evicted halfway
                store.fetch(digests)
                self._write_out(dest, _Exporter(store, link=can_link, dir_owner=dir_owner))
        else:
            self._write_out(dest, _Exporter(store, link=False, dir_owner=dir_owner))

    def _write_out(self, dest: str, exporter: "_Exporter") -> None:
        out = _local.empty_dest(dest)
        try:
            if exporter.dir_owner is not None:
                os.fchown(out, *exporter.dir_owner)
            exporter.tree(self, out, dest)
        finally:
            os.close(out)


def _stat(entry: _Entry) -> FileStat:
    if type(entry) is _File:
        return FileStat(FileType.FILE, size=entry.digest.size_bytes, executable=entry.executable, digest=entry.digest)
    if type(entry) is _Link:
        return FileStat(FileType.SYMLINK, target=entry.target)
    assert isinstance(entry, CasDirectory)
    return FileStat(FileType.DIRECTORY, digest=entry.digest())


class _NodeTarget:
    """The planner's view of a CasDirectory (loads the nodes it is asked about)."""

    def __init__(self, root: CasDirectory) -> None:
        self._root = root

    def listing(self, parts: RelPath) -> dict[str, FileType]:
        return {
            name: (FileType.FILE if type(e) is _File else FileType.SYMLINK if type(e) is _Link else FileType.DIRECTORY)
            for name, e in self._root._lookup(parts)._load().items()
        }


class _CasSource(ImportSource):
    """A CasDirectory as an import source: blobs are shared when the target uses the
    same store, copied otherwise."""

    def __init__(self, root: CasDirectory) -> None:
        self._store = root.store
        self._fetched = False
        self.tree = {}
        stack: list[tuple[CasDirectory, SrcDir]] = [(root, self.tree)]
        while stack:
            node, tree = stack.pop()
            for name, entry in node._load().items():
                if type(entry) is _File:
                    tree[name] = SrcFile(entry.executable, entry.digest)
                elif type(entry) is _Link:
                    tree[name] = SrcLink(entry.target)
                else:
                    assert isinstance(entry, CasDirectory)
                    subtree: SrcDir = {}
                    tree[name] = subtree
                    stack.append((entry, subtree))

    def store_into(self, parts: RelPath, entry: SrcFile, store: ContentStore) -> Digest:
        assert entry.digest is not None
        if store is not self._store and store.find_missing([entry.digest]):
            store.write(self._store.read(entry.digest))
        return entry.digest

    def copy_into(self, parts: RelPath, entry: SrcFile, out_fd: int) -> None:
        assert entry.digest is not None
        store = self._store
        if not isinstance(store, LocalContent):
            _local.write_all(out_fd, store.read(entry.digest))
            return
        if not self._fetched:  # one batch for the whole import, not one per file
            store.fetch(_digests(self.tree))
            self._fetched = True
        fd = os.open(store.path(entry.digest), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _local.copy_fd(fd, out_fd)
        finally:
            os.close(fd)


def _digests(tree: SrcDir) -> Iterable[Digest]:
    stack = [tree]
    while stack:
        for entry in stack.pop().values():
            if isinstance(entry, SrcFile):
                assert entry.digest is not None
                yield entry.digest
            elif isinstance(entry, dict):
                stack.append(entry)


class _Exporter:
    """Writes nodes to disk: hardlinks from a LocalContent where it can, copies otherwise.

    The per-file loop is the hot path of staging (docs/measured.md: within 2x of ``cp -al``):
    no stat, one link per file, cache paths computed once per blob.
    """

    def __init__(self, store: ContentStore, link: bool, dir_owner: tuple[int, int] | None = None) -> None:
        self._store = store
        self.dir_owner = dir_owner
        self._local = store if isinstance(store, LocalContent) else None
        self._link = link and self._local is not None
        # object_path(digest) is the non-executable path without a stat.
        self._object_path: Callable[[Digest], str] | None = (
            self._local.object_path if self._local is not None else None
        )
        self._paths: dict[tuple[Digest, bool], str] = {}

    def _cache_path(self, entry: _File) -> str:
        if not entry.executable and self._object_path is not None:
            return self._object_path(entry.digest)  # string formatting only
        key = (entry.digest, entry.executable)
        path = self._paths.get(key)
        if path is None:  # path() may stat, or create the 0555 variant: once per blob
            assert self._local is not None
            path = self._paths[key] = self._local.path(entry.digest, entry.executable)
        return path

    def tree(self, root: CasDirectory, root_fd: int, dest: str) -> None:
        """Write ``root``'s loaded tree into the empty directory ``root_fd``."""
        link = os.link
        symlink = os.symlink
        mkdir = os.mkdir
        chown = os.chown
        owner = self.dir_owner
        with _local.DirFds(root_fd) as fds:
            stack: list[tuple[RelPath, CasDirectory]] = [((), root)]
            while stack:
                parts, node = stack.pop()
                dir_fd = fds.get(parts)  # created when its parent was written, just below
                for name, entry in node._load().items():
                    try:
                        if type(entry) is _File:
                            if self._link:
                                try:
                                    link(self._cache_path(entry), name, dst_dir_fd=dir_fd, follow_symlinks=False)
                                    continue
                                except OSError as err:
                                    if err.errno not in _LINK_FALLBACK:
                                        raise
                                    if err.errno == errno.EXDEV:
                                        self._link = False  # the whole destination is elsewhere
                            self._copy(entry, name, dir_fd)
                        elif type(entry) is _Link:
                            symlink(entry.target, name, dir_fd=dir_fd)
                        else:
                            assert isinstance(entry, CasDirectory)
                            mkdir(name, 0o755, dir_fd=dir_fd)
                            if owner is not None:
                                chown(name, *owner, dir_fd=dir_fd, follow_symlinks=False)
                            stack.append((parts + (name,), entry))
                    except OSError as err:
                        raise from_os_error(err, f"exporting {os.path.join(dest, *parts, name)}") from None

    def _copy(self, entry: _File, name: str, dir_fd: int) -> None:
        out = _local.create_file(dir_fd, name, _local.EXPORT_MODES[entry.executable])
        try:
            if self._local is not None:
                src = os.open(self._cache_path(_File(entry.digest, False)), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _local.copy_fd(src, out)
                finally:
                    os.close(src)
            else:
                _local.write_all(out, self._store.read(entry.digest))
        finally:
            os.close(out)

