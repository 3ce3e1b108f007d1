"""Local trees through directory descriptors: open, walk and write without following symlinks.

Every path below a root is opened one component at a time, ``O_NOFOLLOW`` relative to its
parent's descriptor, so a symlink inside a tree (left by an action, or swapped in by a
race) is never followed out of it. The root itself is the caller's path and is followed.

``OSError`` is translated into the project's errors where it is caught, by
:func:`~reapi_worker.protos.errors.from_os_error` (the project's one errno table).
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from collections.abc import Iterator
from contextlib import contextmanager

from reapi_worker.protos.errors import AlreadyExists, NotFound, from_os_error

from ..content import BLOB_MODES
from ..paths import RelPath, join

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a fifo that raced into the place of a file must not hang.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# O_EXCL with O_CREAT never follows a symlink and never reuses an inode someone else holds.
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# Modes of files this package creates: working trees are writable by their owner;
# exported (staged) copies have the cache's own modes, so a copy looks like a link.
WORK_MODES = (0o644, 0o755)
EXPORT_MODES = BLOB_MODES

_COPY_CHUNK = 1 << 20

def is_executable(mode: int) -> bool:
    """REAPI's is_executable for a local file: the owner's execute bit."""
    return bool(mode & stat_mod.S_IXUSR)


def open_root(path: str) -> int:
    """A descriptor of the directory at ``path`` (the caller's path: symlinks in it are
    followed). NotFound if it is absent or not a directory."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise from_os_error(err, f"opening directory {path!r}") from None


def open_child(dir_fd: int, name: str, where: RelPath) -> int:
    """A descriptor of the subdirectory ``name`` of ``dir_fd``, never through a symlink.
    ``where`` (the child's path) only words the error."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as err:
        if err.errno in (errno.ENOTDIR, errno.ELOOP):
            raise NotFound(f"{join(where)!r} is not a directory") from None
        if err.errno == errno.ENOENT:
            raise NotFound(f"{join(where)!r} does not exist") from None
        raise from_os_error(err, f"opening {join(where)!r}") from None


def open_path(root_fd: int, parts: RelPath, base: RelPath = ()) -> int:
    """A new descriptor of the directory ``parts`` below ``root_fd`` (``base`` is where
    ``root_fd`` sits, for messages). The caller closes it."""
    fd = os.dup(root_fd)
    try:
        for i, name in enumerate(parts):
            child = open_child(fd, name, base + parts[: i + 1])
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def opened_dir(root: str, parts: RelPath, base: RelPath = ()) -> Iterator[int]:
    """The directory ``parts`` below the directory at path ``root``, for a ``with``."""
    root_fd = open_root(root)
    try:
        fd = open_path(root_fd, parts, base)
    finally:
        os.close(root_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """The entry ``name`` in ``dir_fd`` without following it, or None if absent."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


class DirFds:
    """Descriptors of the directories along one path below a root, reused while visiting
    paths in walk order (so a deep tree costs one open per directory, and at most its
    depth in open descriptors). Closes what it opened; the root stays the caller's."""

    def __init__(self, root_fd: int, base: RelPath = ()) -> None:
        self._root_fd = root_fd
        self._base = base
        self._parts: RelPath = ()
        self._fds: list[int] = []

    def get(self, parts: RelPath) -> int:
        """The descriptor of directory ``parts`` (borrowed: valid until the next call)."""
        current = self._parts
        if parts != current:
            depth = len(current)
            # Walk order mostly goes one level down or to a sibling: compare slices (in C)
            # before falling back to a loop, so that a deep tree costs no quadratic time.
            if len(parts) > depth and parts[:depth] == current:
                common = depth
            elif len(parts) == depth and parts[:-1] == current[:-1]:
                common = depth - 1
            else:
                common = 0
                limit = min(len(parts), depth)
                while common < limit and parts[common] == current[common]:
                    common += 1
            while len(self._fds) > common:
                os.close(self._fds.pop())
            self._parts = parts[:common]
            for i in range(common, len(parts)):
                parent = self._fds[-1] if self._fds else self._root_fd
                self._fds.append(open_child(parent, parts[i], self._base + parts[: i + 1]))
                self._parts = parts[: i + 1]
        return self._fds[-1] if self._fds else self._root_fd

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())
        self._parts = ()

    def __enter__(self) -> "DirFds":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_regular(dir_fd: int, name: str, where: str) -> int:
    """Open the regular file ``name`` for reading; NotFound for anything else."""
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOENT, errno.EISDIR, errno.ENXIO):
            raise NotFound(f"{where!r} is not a regular file") from None
        raise from_os_error(err, f"opening {where!r}") from None
    if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotFound(f"{where!r} is not a regular file")
    return fd


def create_file(dir_fd: int, name: str, mode: int) -> int:
    """Create the file ``name`` (which must not exist) for writing; its mode is exactly
    ``mode`` whatever the umask, so staged files are exactly 0644/0755."""
    fd = os.open(name, CREATE_FLAGS, mode, dir_fd=dir_fd)
    if _UMASK & mode:
        os.fchmod(fd, mode)
    return fd


def _read_umask() -> int:
    # /proc tells without changing it; os.umask() would set it, racing other threads.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def copy_fd(src_fd: int, dst_fd: int) -> None:
    """Copy everything from ``src_fd`` (at its offset) to ``dst_fd``, in the kernel if it can."""
    while True:
        try:
            copied = os.copy_file_range(src_fd, dst_fd, _COPY_CHUNK)
        except OSError as err:
            if err.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                break
            raise
        if copied == 0:
            return
    while chunk := os.read(src_fd, _COPY_CHUNK):
        write_all(dst_fd, chunk)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def empty_dest(dest: str) -> int:
    """Create ``dest`` (and missing parents) or accept it if it is an empty directory;
    return its descriptor. AlreadyExists if it holds anything or is not a directory."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        try:
            os.mkdir(dest, 0o755)
        except FileExistsError:
            pass
        fd = os.open(dest, DIR_FLAGS)
    except OSError as err:
        if err.errno in (errno.ENOTDIR, errno.ELOOP):
            raise AlreadyExists(f"export destination {dest!r} is not a directory") from None
        raise from_os_error(err, f"export destination {dest!r}") from None
    if os.listdir(fd):
        os.close(fd)
        raise AlreadyExists(f"export destination {dest!r} is not empty")
    return fd


def remove_entry(dir_fd: int, name: str, is_dir: bool) -> None:
    """Remove ``name`` from ``dir_fd``; a directory with everything below it, through
    descriptors, never following a symlink out of the tree. Iterative: shutil.rmtree
    recurses, and an action can make a tree deeper than Python's recursion limit."""
    if not is_dir:
        os.unlink(name, dir_fd=dir_fd)
        return
    top = open_child(dir_fd, name, (name,))
    try:
        with DirFds(top) as fds:
            found: list[RelPath] = []  # parents before children
            stack: list[RelPath] = [()]
            while stack:
                parts = stack.pop()
                found.append(parts)
                fd = fds.get(parts)
                with os.scandir(fd) as entries:
                    listed = list(entries)
                for entry in listed:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(parts + (entry.name,))
                    else:
                        os.unlink(entry.name, dir_fd=fd)
            for parts in reversed(found[1:]):
                os.rmdir(parts[-1], dir_fd=fds.get(parts[:-1]))
    finally:
        os.close(top)
    os.rmdir(name, dir_fd=dir_fd)
