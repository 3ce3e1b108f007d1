"""``FileSystemDirectory``: the Directory API over a real directory on disk.

Every operation opens the root by path and walks down one component at a time through
directory descriptors with ``O_NOFOLLOW`` (see :mod:`._local`): a symlink inside the
tree is data, never a way out of it. Nothing is cached between calls, so the tree may
also be changed by other means (an action writing its outputs) between them.

``digest()`` hashes the files itself (no CAS needed) and builds the same canonical
Directory protos as the CAS backend, so both agree on every digest.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from reapi_worker.protos.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    from_os_error,
)

from ..digests import Digest
from ..paths import RelPath, SymlinkPolicy, join, split_relative
from . import _canonical, _local
from ._importing import ImportSource, LocalSource, Op, SrcLink, iter_links, plan, source_of
from .base import Directory, FileStat, FileType, ImportFilter, ImportResult

_CHUNK = 1 << 20


@dataclass(slots=True)
class _Scanned:
    """A directory read from disk: stats of its entries (a _Scanned for a subdirectory)
    and, once computed, its digest."""

    entries: dict[str, "FileStat | _Scanned"] = field(default_factory=dict)
    digest: Digest | None = None

    def stat(self) -> FileStat:
        return FileStat(FileType.DIRECTORY, digest=self.digest)


class FileSystemDirectory(Directory):
    """A Directory over the local directory ``path`` (which must exist).

    ``symlink_policy`` is checked by ``symlink`` and imports, with link positions taken
    relative to ``path``. Files are created 0644, or 0755 if executable.
    """

    def __init__(self, path: str | os.PathLike[str], symlink_policy: SymlinkPolicy = SymlinkPolicy.ANY) -> None:
        self._root = os.path.abspath(os.fspath(path))
        self._parts: RelPath = ()
        self.symlink_policy = symlink_policy
        os.close(_local.open_root(self._root))  # NotFound now rather than on first use

    @property
    def path(self) -> str:
        """The local path of this directory."""
        return os.path.join(self._root, *self._parts)

    def __repr__(self) -> str:
        return f"FileSystemDirectory({self.path!r})"

    # -- helpers --------------------------------------------------------------------------

    def _child(self, parts: RelPath) -> "FileSystemDirectory":
        child = object.__new__(FileSystemDirectory)
        child._root = self._root
        child._parts = self._parts + parts
        child.symlink_policy = self.symlink_policy
        return child

    def _open(self, parts: RelPath = ()) -> int:
        """A descriptor of ``parts`` below this directory (the caller closes it)."""
        root = _local.open_root(self._root)
        try:
            return _local.open_path(root, self._parts + parts)
        finally:
            os.close(root)

    def _parent_of(self, path: str, what: str) -> tuple[int, str, RelPath]:
        """(descriptor of the parent, final name, parts) of a path naming an entry."""
        parts = split_relative(path)
        if not parts:
            raise InvalidArgument(f"{what}: {path!r} names the directory itself")
        return self._open(parts[:-1]), parts[-1], parts

    def _where(self, parts: RelPath) -> str:
        return join(self._parts + parts) or "."

    # -- navigation -----------------------------------------------------------------------

    def descend(self, path: str, create: bool = False) -> "FileSystemDirectory":
        parts = split_relative(path)
        if create:
            self.mkdir(path)
        else:
            os.close(self._open(parts))
        return self._child(parts)

    def stat(self, path: str) -> FileStat:
        parts = split_relative(path)
        if not parts:
            return FileStat(FileType.DIRECTORY, digest=self.digest())
        fd = self._open(parts[:-1])
        try:
            st = _local.lstat_at(fd, parts[-1])
            if st is None:
                raise NotFound(f"{self._where(parts)!r} does not exist")
            if stat_mod.S_ISDIR(st.st_mode):
                child = _local.open_child(fd, parts[-1], parts)
                try:
                    return self._scan(child, parts).stat()
                finally:
                    os.close(child)
            return self._stat_entry(fd, parts[-1], st.st_mode, parts)
        finally:
            os.close(fd)

    def _stat_entry(self, dir_fd: int, name: str, mode: int, parts: RelPath) -> FileStat:
        """FileStat of a non-directory entry."""
        if stat_mod.S_ISLNK(mode):
            return FileStat(FileType.SYMLINK, target=os.readlink(name, dir_fd=dir_fd))
        if not stat_mod.S_ISREG(mode):
            raise InvalidArgument(f"{self._where(parts)!r} is a special file, not part of a Directory")
        fd = _local.open_regular(dir_fd, name, self._where(parts))
        with os.fdopen(fd, "rb") as stream:
            digest = Digest.of_file(stream)
        return FileStat(FileType.FILE, size=digest.size_bytes, executable=_local.is_executable(mode), digest=digest)

    def _scan(self, dir_fd: int, parts: RelPath) -> _Scanned:
        """Read and digest the whole subtree at ``dir_fd`` (``parts`` below this directory)."""
        # Iterative: an action can make a tree deeper than Python's recursion limit.
        root = _Scanned()
        found = [root]  # parents before children: reversed, children come first
        stack: list[tuple[RelPath, _Scanned]] = [((), root)]
        with _local.DirFds(dir_fd, self._parts + parts) as fds:
            while stack:
                rel, node = stack.pop()
                where = parts + rel
                try:
                    fd = fds.get(rel)
                    for name in os.listdir(fd):
                        st = _local.lstat_at(fd, name)
                        if st is None:
                            continue  # removed while we looked: not ours to report
                        if stat_mod.S_ISDIR(st.st_mode):
                            node.entries[name] = child = _Scanned()
                            found.append(child)
                            stack.append((rel + (name,), child))
                        else:
                            node.entries[name] = self._stat_entry(fd, name, st.st_mode, where + (name,))
                except OSError as err:
                    raise from_os_error(err, f"reading {self._where(where)!r}") from None
        for node in reversed(found):
            files: list[tuple[str, Digest, bool]] = []
            dirs: list[tuple[str, Digest]] = []
            links: list[tuple[str, str]] = []
            for name in sorted(node.entries):
                entry = node.entries[name]
                if isinstance(entry, _Scanned):
                    assert entry.digest is not None
                    dirs.append((name, entry.digest))
                elif entry.type is FileType.SYMLINK:
                    assert entry.target is not None
                    links.append((name, entry.target))
                else:
                    assert entry.digest is not None
                    files.append((name, entry.digest, entry.executable))
            node.digest, _ = _canonical.build(files, dirs, links)
        return root

    def list(self) -> list[str]:
        fd = self._open()
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def walk(self) -> Iterator[tuple[str, FileStat]]:
        fd = self._open()
        try:
            scanned = self._scan(fd, ())
        finally:
            os.close(fd)

        def emit() -> Iterator[tuple[str, FileStat]]:
            stack = [(name, scanned.entries[name]) for name in sorted(scanned.entries, reverse=True)]
            while stack:
                path, entry = stack.pop()
                if isinstance(entry, _Scanned):
                    yield path, entry.stat()
                    stack.extend((f"{path}/{name}", entry.entries[name]) for name in sorted(entry.entries, reverse=True))
                else:
                    yield path, entry

        return emit()

    def digest(self) -> Digest:
        fd = self._open()
        try:
            digest = self._scan(fd, ()).digest
        finally:
            os.close(fd)
        assert digest is not None
        return digest

    # -- file contents --------------------------------------------------------------------

    def read_bytes(self, path: str) -> bytes:
        dir_fd, name, parts = self._parent_of(path, "read_bytes")
        try:
            fd = _local.open_regular(dir_fd, name, self._where(parts))
        finally:
            os.close(dir_fd)
        with os.fdopen(fd, "rb") as stream:
            return stream.read()

    def write_bytes(self, path: str, data: bytes, executable: bool = False) -> None:
        self._write(path, executable, lambda fd: _local.write_all(fd, data))

    def write_stream(self, path: str, stream: BinaryIO, executable: bool = False) -> None:
        def copy(fd: int) -> None:
            while chunk := stream.read(_CHUNK):
                _local.write_all(fd, chunk)

        self._write(path, executable, copy)

    def _write(self, path: str, executable: bool, fill: Callable[[int], None]) -> None:
        dir_fd, name, parts = self._parent_of(path, "write")
        try:
            self._make_room(dir_fd, name, parts)
            try:
                fd = _local.create_file(dir_fd, name, _local.WORK_MODES[executable])
            except OSError as err:
                raise from_os_error(err, f"creating {self._where(parts)!r}") from None
            try:
                fill(fd)
            except OSError as err:
                raise from_os_error(err, f"writing {self._where(parts)!r}") from None
            finally:
                os.close(fd)
        finally:
            os.close(dir_fd)

    def _make_room(self, dir_fd: int, name: str, parts: RelPath) -> None:
        """Remove the non-directory at ``name`` (write_bytes and symlink replace it)."""
        st = _local.lstat_at(dir_fd, name)
        if st is None:
            return
        if stat_mod.S_ISDIR(st.st_mode):
            raise AlreadyExists(f"{self._where(parts)!r} is a directory")
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError as err:
            raise from_os_error(err, f"replacing {self._where(parts)!r}") from None

    def symlink(self, path: str, target: str) -> None:
        parts = split_relative(path)
        if not parts:
            raise InvalidArgument(f"symlink: {path!r} names the directory itself")
        self.symlink_policy.check(self._parts + parts, target)
        dir_fd = self._open(parts[:-1])
        try:
            self._make_room(dir_fd, parts[-1], parts)
            try:
                os.symlink(target, parts[-1], dir_fd=dir_fd)
            except OSError as err:
                raise from_os_error(err, f"symlink {self._where(parts)!r}") from None
        finally:
            os.close(dir_fd)

    def mkdir(self, path: str) -> None:
        parts = split_relative(path)
        fd = self._open()
        try:
            for i, name in enumerate(parts):
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    st = _local.lstat_at(fd, name)
                    if st is not None and not stat_mod.S_ISDIR(st.st_mode):
                        raise AlreadyExists(f"{self._where(parts[: i + 1])!r} exists and is not a directory") from None
                except OSError as err:
                    raise from_os_error(err, f"mkdir {self._where(parts[: i + 1])!r}") from None
                child = _local.open_child(fd, name, self._parts + parts[: i + 1])
                os.close(fd)
                fd = child
        finally:
            os.close(fd)

    # -- tree edits -----------------------------------------------------------------------

    def remove(self, path: str, recursive: bool = False) -> None:
        dir_fd, name, parts = self._parent_of(path, "remove")
        try:
            st = _local.lstat_at(dir_fd, name)
            if st is None:
                raise NotFound(f"{self._where(parts)!r} does not exist")
            is_dir = stat_mod.S_ISDIR(st.st_mode)
            try:
                if is_dir and not recursive:
                    os.rmdir(name, dir_fd=dir_fd)
                else:
                    _local.remove_entry(dir_fd, name, is_dir)
            except OSError as err:
                if err.errno == errno.ENOTEMPTY:
                    raise FailedPrecondition(f"remove: directory {self._where(parts)!r} is not empty") from None
                raise from_os_error(err, f"remove {self._where(parts)!r}") from None
        finally:
            os.close(dir_fd)

    def rename(self, src: str, dst: str) -> None:
        self._move(src, dst, keep_source=False)

    def copy(self, src: str, dst: str) -> None:
        self._move(src, dst, keep_source=True)

    def _move(self, src: str, dst: str, keep_source: bool) -> None:
        what = "copy" if keep_source else "rename"
        src_parts = split_relative(src)
        dst_parts = split_relative(dst)
        if not src_parts or not dst_parts:
            raise InvalidArgument(f"{what}: cannot move the directory itself ({src!r} -> {dst!r})")
        src_fd = self._open(src_parts[:-1])
        dst_fd = -1
        try:
            st = _local.lstat_at(src_fd, src_parts[-1])
            if st is None:
                raise NotFound(f"{what}: {self._where(src_parts)!r} does not exist")
            is_dir = stat_mod.S_ISDIR(st.st_mode)
            if is_dir and len(dst_parts) > len(src_parts) and dst_parts[: len(src_parts)] == src_parts:
                raise InvalidArgument(f"{what}: cannot move {src!r} into itself ({dst!r})")
            dst_fd = self._open(dst_parts[:-1])
            if _local.lstat_at(dst_fd, dst_parts[-1]) is not None:
                raise AlreadyExists(f"{what}: {self._where(dst_parts)!r} exists")
            if self.symlink_policy is SymlinkPolicy.RELATIVE_INSIDE and len(dst_parts) < len(src_parts):
                self._check_moved_links(src_fd, src_parts, dst_parts, st.st_mode)
            if keep_source:
                self._copy_entry(src_fd, dst_fd, src_parts, dst_parts, st.st_mode)
            else:
                try:
                    os.rename(src_parts[-1], dst_parts[-1], src_dir_fd=src_fd, dst_dir_fd=dst_fd)
                except OSError as err:
                    raise from_os_error(err, f"rename {src!r} -> {dst!r}") from None
        finally:
            os.close(src_fd)
            if dst_fd >= 0:
                os.close(dst_fd)

    def _check_moved_links(self, src_fd: int, src_parts: RelPath, dst_parts: RelPath, mode: int) -> None:
        """Under RELATIVE_INSIDE a link that moves up may escape: check each at its new place."""
        name = src_parts[-1]
        if stat_mod.S_ISLNK(mode):
            self.symlink_policy.check(self._parts + dst_parts, os.readlink(name, dir_fd=src_fd))
        elif stat_mod.S_ISDIR(mode):
            child = _local.open_child(src_fd, name, src_parts)
            try:
                with LocalSource(self._where(src_parts), child) as scanned:
                    for parts, target in iter_links(scanned.tree):
                        self.symlink_policy.check(self._parts + dst_parts + parts, target)
            finally:
                os.close(child)

    def _copy_entry(self, src_fd: int, dst_fd: int, src_parts: RelPath, dst_parts: RelPath, mode: int) -> None:
        src_name, dst_name = src_parts[-1], dst_parts[-1]
        try:
            if stat_mod.S_ISLNK(mode):
                os.symlink(os.readlink(src_name, dir_fd=src_fd), dst_name, dir_fd=dst_fd)
            elif stat_mod.S_ISREG(mode):
                src_file = _local.open_regular(src_fd, src_name, self._where(src_parts))
                try:
                    out = _local.create_file(dst_fd, dst_name, _local.WORK_MODES[_local.is_executable(mode)])
                    try:
                        _local.copy_fd(src_file, out)
                    finally:
                        os.close(out)
                finally:
                    os.close(src_file)
            elif stat_mod.S_ISDIR(mode):
                child = _local.open_child(src_fd, src_name, src_parts)
                try:
                    with LocalSource(self._where(src_parts), child) as source:
                        os.mkdir(dst_name, 0o755, dir_fd=dst_fd)
                        out = _local.open_child(dst_fd, dst_name, dst_parts)
                        try:
                            ops, _ = plan(source.tree, _EmptyTarget(), filter=None, overwrite=False,
                                          policy=SymlinkPolicy.ANY, base=())
                            _apply(out, ops, source, _local.WORK_MODES, self._parts + dst_parts)
                        finally:
                            os.close(out)
                finally:
                    os.close(child)
            else:
                raise InvalidArgument(f"copy: {self._where(src_parts)!r} is a special file")
        except OSError as err:
            raise from_os_error(err, f"copy {join(src_parts)!r} -> {join(dst_parts)!r}") from None

    # -- bulk import/export -----------------------------------------------------------------

    def import_files(
        self,
        source: "str | os.PathLike[str] | Directory",
        filter: ImportFilter | None = None,
        overwrite: bool = True,
    ) -> ImportResult:
        with source_of(source) as src:
            fd = self._open()
            try:
                with _DiskTarget(fd, self._parts) as target:
                    ops, result = plan(src.tree, target, filter=filter, overwrite=overwrite,
                                       policy=self.symlink_policy, base=self._parts)
                _apply(fd, ops, src, _local.WORK_MODES, self._parts)
            finally:
                os.close(fd)
        return result

    def export_files(self, dest: str, can_link: bool = True) -> None:
        # A working tree's files can change under a link, so a filesystem tree always copies.
        fd = self._open()
        try:
            with LocalSource(self.path, fd) as source:
                ops, _ = plan(source.tree, _EmptyTarget(), filter=None, overwrite=False,
                              policy=SymlinkPolicy.ANY, base=())
                out = _local.empty_dest(dest)
                try:
                    _apply(out, ops, source, _local.EXPORT_MODES, ())
                finally:
                    os.close(out)
        finally:
            os.close(fd)

    def _import_source(self) -> ImportSource:
        fd = self._open()
        try:
            return LocalSource(self.path, fd, own_fd=True)
        except BaseException:
            os.close(fd)
            raise


class _DiskTarget:
    """The planner's view of a directory on disk (kinds from d_type, no stat)."""

    def __init__(self, root_fd: int, base: RelPath) -> None:
        self._fds = _local.DirFds(root_fd, base)

    def listing(self, parts: RelPath) -> dict[str, FileType]:
        kinds: dict[str, FileType] = {}
        with os.scandir(self._fds.get(parts)) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    kinds[entry.name] = FileType.DIRECTORY
                elif entry.is_symlink():
                    kinds[entry.name] = FileType.SYMLINK
                else:
                    kinds[entry.name] = FileType.FILE  # specials count as files: replaceable
        return kinds

    def __enter__(self) -> "_DiskTarget":
        return self

    def __exit__(self, *exc: object) -> None:
        self._fds.close()


class _EmptyTarget:
    def listing(self, parts: RelPath) -> dict[str, FileType]:
        return {}


def _apply(root_fd: int, ops: list[Op], source: ImportSource, modes: tuple[int, int], base: RelPath) -> None:
    """Carry out a plan below ``root_fd`` (ops are in walk order, so parents come first)."""
    with _local.DirFds(root_fd, base) as fds:
        for op in ops:
            parts = op.parts
            name = parts[-1]
            where = join(base + parts)
            try:
                dir_fd = fds.get(parts[:-1])
                if op.replace:
                    os.unlink(name, dir_fd=dir_fd)
                entry = op.entry
                if entry is None:
                    os.mkdir(name, 0o755, dir_fd=dir_fd)
                elif isinstance(entry, SrcLink):
                    os.symlink(entry.target, name, dir_fd=dir_fd)
                else:
                    out = _local.create_file(dir_fd, name, modes[entry.executable])
                    try:
                        source.copy_into(parts, entry, out)
                    finally:
                        os.close(out)
            except OSError as err:
                raise from_os_error(err, f"writing {where!r}") from None

