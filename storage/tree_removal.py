"""Deleting a tree an action left behind, whatever its shape.

An action decides the shape of its build directory, so removal must not depend on it:

* **No recursion.** ``shutil.rmtree`` recurses once per level; an action that makes a
  directory ~1,000 levels deep raised RecursionError in the background remover, which then
  never deleted anything again. :func:`remove_tree` walks with an explicit stack.
* **No descriptor per level, no long paths.** Holding one descriptor per level runs out of
  descriptors (RLIMIT_NOFILE is 1,024 by default) on a 5,000-deep tree, and a path through
  it is longer than PATH_MAX. The walk holds one directory descriptor at a time: it opens a
  child relative to its parent and goes back up through ``..``, which is safe because the
  tree has been renamed into the trash and nothing else changes it any more. Only the names
  on the way down are kept (a few bytes per level).
* **Never through a mount.** A directory on another device (a mount an action's sandbox or
  a dead worker left) is not entered: its entries are not ours to delete. Its parent then
  cannot be removed, and the error says why.
* **Unwritable directories.** An action may leave a directory mode 0000. As root that does
  not matter; otherwise a directory the worker owns is made writable and searchable first.

Cost: one ``scandir`` per directory, one ``unlink`` per file, one ``rmdir`` and two
``open`` per directory — the same syscalls as ``rm -rf``.
"""

from __future__ import annotations

import errno
import os
import stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: str) -> None:
    """Remove ``path`` and everything below it (a file or symlink at ``path`` is unlinked).

    Raises OSError for an entry that cannot be removed (e.g. a mount point below ``path``:
    ``EBUSY`` naming it); whatever could be removed before that is gone. Absent: no error.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    fd = _open_dir(None, path)
    device = st.st_dev
    # names[i] is the directory entered at depth i + 1; pending[i] the subdirectories of
    # the directory at depth i that are still to be visited.
    names: list[str] = []
    pending: list[list[str]] = [_empty_files(fd, device, path)]
    try:
        while True:
            if pending[-1]:
                name = pending[-1].pop()
                child = _open_dir(fd, name)
                os.close(fd)
                fd = child
                names.append(name)
                pending.append(_empty_files(fd, device, name))
                continue
            pending.pop()
            if not names:
                break
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            _rmdir(fd, names.pop())
    finally:
        os.close(fd)
    os.rmdir(path)


def _empty_files(fd: int, device: int, where: str) -> list[str]:
    """Unlink every non-directory entry of ``fd``; return its subdirectories on ``device``.
    A subdirectory on another device (a mount point) is not entered: EBUSY names it."""
    subdirectories = []
    with os.scandir(fd) as entries:
        listed = list(entries)
    for entry in listed:
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            _unlink(fd, entry.name)
        elif st.st_dev != device:
            raise OSError(errno.EBUSY, "a mount point, not entered", os.path.join(where, entry.name))
        else:
            subdirectories.append(entry.name)
    return subdirectories


def _open_dir(dir_fd: int | None, name: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        _make_usable(dir_fd, name)
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _unlink(fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=fd)
    except PermissionError:
        os.fchmod(fd, 0o700)  # our own directory left unwritable by the action
        os.unlink(name, dir_fd=fd)


def _rmdir(fd: int, name: str) -> None:
    try:
        os.rmdir(name, dir_fd=fd)
    except PermissionError:
        os.fchmod(fd, 0o700)
        os.rmdir(name, dir_fd=fd)


def _make_usable(dir_fd: int | None, name: str) -> None:
    """A directory the action made unsearchable (mode 0000): give its owner rwx back."""
    # Known to be a directory (listed as one, in a tree nothing else changes): following
    # is safe, and Linux has no fchmodat(AT_SYMLINK_NOFOLLOW).
    os.chmod(name, 0o700, dir_fd=dir_fd)
