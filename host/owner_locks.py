"""Owner files: "is the worker that made this still alive?", answered exactly by flock.

A worker that shares a directory with others (the local CAS, a build root) creates and
locks ``<owners>/<token>`` before it creates anything of its own there, and holds the lock
for its life. The kernel drops a flock when its process dies, whatever killed it and in any
pid namespace, so whoever can take the lock of an owner file knows its worker is dead: no
pid or age guessing. Sweepers list what they may remove *before* they try the locks, so a
listed item whose owner is unlocked or gone is an orphan for good.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets


def become_owner(owners: str, note: str) -> tuple[str, int]:
    """Create and lock ``owners/<token>`` (``note``, e.g. the pid, written in it for people
    reading the directory). Returns the token and the descriptor whose lock is held until
    it is closed or the process dies."""
    while True:
        token = secrets.token_hex(8)
        path = os.path.join(owners, token)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            # A sweeper may have taken it for dead between our open and our flock.
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.write(fd, f"{note}\n".encode())
                return token, fd
        os.close(fd)


def lock_if_dead(owner: str) -> int | None:
    """None if the owner file ``owner`` is locked by a live worker; else a descriptor
    holding its lock (-1 if the file is gone: its worker is dead too). The caller removes
    what the dead owner left, the owner file last, then closes the descriptor."""
    try:
        fd = os.open(owner, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
