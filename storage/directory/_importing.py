"""What ``import_files`` reads, and the plan of what it will write.

An import runs in three steps so that a refused import changes nothing:

1. the source is scanned into a :data:`SrcDir` (shape, executable bits, symlink
   targets; special files refused here);
2. :func:`plan` compares it with the target and decides every write, raising on the
   first conflict or refused symlink before anything is written;
3. the backend applies the plan, reading file contents through the
   :class:`ImportSource` (``copy_into`` for a filesystem target, ``store_into`` for a
   CAS target).
"""

from __future__ import annotations

import abc
import os
import stat as stat_mod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Union

from reapi_worker.protos.errors import AlreadyExists, InvalidArgument, ReapiError, from_os_error

from ..content import ContentStore
from ..digests import Digest
from ..paths import RelPath, SymlinkPolicy, join, split_relative
from . import _local
from .base import FileType, ImportFilter, ImportResult

if TYPE_CHECKING:
    from .base import Directory


@dataclass(frozen=True, slots=True)
class SrcFile:
    """A regular file of a source; ``digest`` is known when the source is a CAS tree."""

    executable: bool
    digest: Digest | None = None


@dataclass(frozen=True, slots=True)
class SrcLink:
    target: str


# A source directory: name -> file, symlink or subdirectory (a nested dict).
SrcEntry = Union[SrcFile, SrcLink, "SrcDir"]
SrcDir = dict[str, SrcEntry]


class ImportSource(abc.ABC):
    """A scanned tree to import from. Use as a context manager (it may hold descriptors)."""

    tree: SrcDir

    @abc.abstractmethod
    def copy_into(self, parts: RelPath, entry: SrcFile, out_fd: int) -> None:
        """Write the bytes of the file at ``parts`` to ``out_fd``."""

    @abc.abstractmethod
    def store_into(self, parts: RelPath, entry: SrcFile, store: ContentStore) -> Digest:
        """Make the file at ``parts`` a blob of ``store``; return its digest."""

    def close(self) -> None:
        """Release what the source holds (descriptors)."""

    def __enter__(self) -> "ImportSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def source_of(source: "str | os.PathLike[str] | Directory") -> ImportSource:
    """The ImportSource for an ``import_files`` argument: a local path or a Directory."""
    if isinstance(source, (str, os.PathLike)):
        return LocalSource(os.fspath(source))
    return source._import_source()


# -- local directories ---------------------------------------------------------------

# write_file takes a path; naming the file through its parent's descriptor keeps the
# guarantee that no intermediate component is resolved through a symlink again.
_PROC_FD = os.path.isdir("/proc/self/fd")


class LocalSource(ImportSource):
    """A local directory, scanned without following any symlink below its root."""

    def __init__(self, path: str, root_fd: int | None = None, own_fd: bool = False) -> None:
        """Scan ``path``, or if given the already open ``root_fd`` (``path`` then only
        words messages; the descriptor stays the caller's unless ``own_fd``)."""
        self._path = path
        self._owns_root = root_fd is None or own_fd
        self._root_fd = _local.open_root(path) if root_fd is None else root_fd
        self._fds = _local.DirFds(self._root_fd)
        try:
            self.tree = self._scan()
        except BaseException:
            self._owns_root = root_fd is None  # on failure the caller still owns its fd
            self.close()
            raise

    def _scan(self) -> SrcDir:
        # Iterative (a tree can be deeper than Python's recursion limit); DirFds opens
        # each directory once, relative to its parent, never through a symlink.
        tree: SrcDir = {}
        stack: list[tuple[RelPath, SrcDir]] = [((), tree)]
        while stack:
            parts, out = stack.pop()
            try:
                with os.scandir(self._fds.get(parts)) as entries:
                    listed = list(entries)
                for entry in listed:
                    name = entry.name
                    where = parts + (name,)
                    try:
                        name.encode()
                    except UnicodeEncodeError:
                        raise InvalidArgument(f"import of {self._path!r}: name {join(where)!r} is not valid UTF-8") from None
                    if entry.is_symlink():
                        out[name] = SrcLink(os.readlink(name, dir_fd=self._fds.get(parts)))
                    elif entry.is_dir(follow_symlinks=False):
                        subtree: SrcDir = {}
                        out[name] = subtree
                        stack.append((where, subtree))
                    else:
                        mode = entry.stat(follow_symlinks=False).st_mode
                        if not stat_mod.S_ISREG(mode):
                            raise InvalidArgument(
                                f"import of {self._path!r}: {join(where)!r} is a special file "
                                f"({_special_kind(mode)}); only files, directories and symlinks are allowed"
                            )
                        out[name] = SrcFile(_local.is_executable(mode))
            except OSError as err:
                raise from_os_error(err, f"scanning {os.path.join(self._path, *parts)!r}") from None
        return tree

    def copy_into(self, parts: RelPath, entry: SrcFile, out_fd: int) -> None:
        parent = self._fds.get(parts[:-1])
        src = _local.open_regular(parent, parts[-1], join(parts))
        try:
            _local.copy_fd(src, out_fd)
        finally:
            os.close(src)

    def store_into(self, parts: RelPath, entry: SrcFile, store: ContentStore) -> Digest:
        if _PROC_FD:
            path = f"/proc/self/fd/{self._fds.get(parts[:-1])}/{parts[-1]}"
        else:
            path = os.path.join(self._path, *parts)
        try:
            return store.write_file(path)
        except OSError as err:
            raise from_os_error(err, f"reading {os.path.join(self._path, *parts)!r}") from None

    def close(self) -> None:
        self._fds.close()
        if self._owns_root and self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1


def _special_kind(mode: int) -> str:
    if stat_mod.S_ISFIFO(mode):
        return "fifo"
    if stat_mod.S_ISSOCK(mode):
        return "socket"
    if stat_mod.S_ISCHR(mode) or stat_mod.S_ISBLK(mode):
        return "device"
    return "unknown type"


# -- any Directory, through its public API --------------------------------------------


class DirectorySource(ImportSource):
    """Any Directory, read through ``walk`` and ``read_bytes`` (the generic fallback)."""

    def __init__(self, directory: "Directory") -> None:
        self._directory = directory
        self.tree = {}
        dirs: dict[RelPath, SrcDir] = {(): self.tree}
        for path, stat in directory.walk():
            parts = split_relative(path)
            parent = dirs[parts[:-1]]
            if stat.type is FileType.DIRECTORY:
                parent[parts[-1]] = dirs[parts] = {}
            elif stat.type is FileType.SYMLINK:
                assert stat.target is not None
                parent[parts[-1]] = SrcLink(stat.target)
            else:
                parent[parts[-1]] = SrcFile(stat.executable, stat.digest)

    def copy_into(self, parts: RelPath, entry: SrcFile, out_fd: int) -> None:
        _local.write_all(out_fd, self._directory.read_bytes(join(parts)))

    def store_into(self, parts: RelPath, entry: SrcFile, store: ContentStore) -> Digest:
        if entry.digest is not None and not store.find_missing([entry.digest]):
            return entry.digest
        return store.write(self._directory.read_bytes(join(parts)))


# -- the plan -------------------------------------------------------------------------


class TargetView(Protocol):
    """What the planner needs to know of the target: the kinds of the entries of an
    existing directory (``parts`` relative to the importing directory)."""

    def listing(self, parts: RelPath) -> dict[str, FileType]: ...


@dataclass(frozen=True, slots=True)
class Op:
    """One write: create ``entry`` (None: an empty directory) at ``parts``, removing the
    non-directory there first if ``replace``."""

    parts: RelPath
    entry: SrcFile | SrcLink | None
    replace: bool = False


def plan(
    source: SrcDir,
    target: TargetView,
    *,
    filter: ImportFilter | None,
    overwrite: bool,
    policy: SymlinkPolicy,
    base: RelPath,
) -> tuple[list[Op], ImportResult]:
    """Decide every write of an import, in walk order (parents first), without writing.

    ``base`` is where the importing directory sits in its tree (symlinks are checked by
    ``policy`` at their final position). Raises AlreadyExists where a directory meets a
    non-directory, InvalidArgument for a refused symlink.
    """
    ops: list[Op] = []
    result = ImportResult()
    # Pending entries, next on top: (path, source entry, listing of the target parent or
    # None if that parent is new). Popping them gives walk order; iterative because a
    # tree can be deeper than Python's recursion limit.
    pending: list[tuple[RelPath, SrcEntry, dict[str, FileType] | None]] = []

    def push(src: SrcDir, parts: RelPath, existing: dict[str, FileType] | None) -> None:
        pending.extend((parts + (name,), src[name], existing) for name in sorted(src, reverse=True))

    push(source, (), target.listing(()))
    while pending:
        here, entry, existing = pending.pop()
        path = join(here)
        if filter is not None and not filter(path):
            result.ignored.append(path)
            continue
        have = existing.get(here[-1]) if existing is not None else None
        if isinstance(entry, dict):
            if have is None:
                ops.append(Op(here, None))
                result.imported.append(path)
                push(entry, here, None)
            elif have is FileType.DIRECTORY:
                push(entry, here, target.listing(here))
            else:
                raise AlreadyExists(f"import: cannot put directory {path!r} where a {have.value} is")
            continue
        if isinstance(entry, SrcLink):
            try:
                policy.check(base + here, entry.target)
            except ReapiError as err:
                raise err.within("import") from None
        if have is None:
            ops.append(Op(here, entry))
            result.imported.append(path)
        elif have is FileType.DIRECTORY:
            kind = "file" if isinstance(entry, SrcFile) else "symlink"
            raise AlreadyExists(f"import: cannot put {kind} {path!r} where a directory is")
        elif overwrite:
            ops.append(Op(here, entry, replace=True))
            result.imported.append(path)
            result.overwritten.append(path)
        else:
            result.ignored.append(path)
    return ops, result


def iter_links(tree: SrcDir) -> Iterator[tuple[RelPath, str]]:
    """Every symlink of a scanned tree with its path (to re-check a moved subtree)."""
    stack: list[tuple[RelPath, SrcDir]] = [((), tree)]
    while stack:
        parts, subtree = stack.pop()
        for name, entry in subtree.items():
            if isinstance(entry, SrcLink):
                yield parts + (name,), entry.target
            elif isinstance(entry, dict):
                stack.append((parts + (name,), entry))
