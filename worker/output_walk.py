"""Walk a directory tree an action wrote, without recursion and with few descriptors.

The tree's shape is the action's choice: it may be thousands of levels deep, so the walk
keeps its own stack instead of Python's (a recursive walk dies of RecursionError at
about 1,000 levels), and holds at most :data:`OPEN_DIRECTORIES` directory descriptors
at a time instead of one per level (a deep tree would otherwise exhaust the worker's
RLIMIT_NOFILE, failing every concurrent action). An ancestor whose descriptor was
closed is reopened from the top, component by component, when the walk comes back to
it with subdirectories left to visit.

Every open uses ``O_NOFOLLOW``: a symlink is never followed, whatever it is named. The
walk runs after the sandbox has ended, so nothing changes the tree under it; reopening
by components therefore finds the directory it first found.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from reapi_worker.storage.paths import RelPath

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: Directory descriptors one walk keeps open at most (one more while it opens a child).
OPEN_DIRECTORIES = 32

#: Called once per directory, before its subdirectories, with its components below the
#: walk's base and an open descriptor of it (valid only during the call); returns the
#: names of the subdirectories to walk into next.
Visit = Callable[[RelPath, int], Iterable[str]]


@dataclass(slots=True)
class _Frame:
    parts: RelPath
    fd: int  # -1 once closed to stay within OPEN_DIRECTORIES
    pending: list[str] = field(default_factory=list)


def walk(base_fd: int, top: RelPath, visit: Visit) -> None:
    """Visit the directory at ``top`` (components below the directory ``base_fd``) and
    every directory below it, parents first. The caller keeps ``base_fd`` open and owns
    it. OSError from an open or from ``visit`` propagates; every descriptor the walk
    opened is closed by then."""
    stack: list[_Frame] = []
    try:
        frame = _Frame(top, open_directory(base_fd, top))
        stack.append(frame)
        frame.pending = _descend_order(visit(top, frame.fd))
        while stack:
            frame = stack[-1]
            if not frame.pending:
                stack.pop()
                _close(frame)
                continue
            name = frame.pending.pop()
            if frame.fd < 0:
                frame.fd = open_directory(base_fd, frame.parts)
            child = _Frame(frame.parts + (name,), os.open(name, DIR_FLAGS, dir_fd=frame.fd))
            stack.append(child)
            child.pending = _descend_order(visit(child.parts, child.fd))
            if len(stack) > OPEN_DIRECTORIES:
                _close(stack[-OPEN_DIRECTORIES - 1])
    finally:
        for frame in stack:
            _close(frame)


def open_directory(base_fd: int, parts: RelPath) -> int:
    """A new descriptor of the directory at ``parts`` below ``base_fd``, opened one
    component at a time without following symlinks. Raises OSError (ENOENT, ENOTDIR,
    ELOOP for a symlink on the way)."""
    fd = os.dup(base_fd)
    try:
        for part in parts:
            next_fd = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _descend_order(names: Iterable[str]) -> list[str]:
    # Popped from the end: reversed, so subdirectories are visited in the order given.
    return list(reversed(list(names)))


def _close(frame: _Frame) -> None:
    if frame.fd >= 0:
        os.close(frame.fd)
        frame.fd = -1
