"""mount(2) and umount2(2) for the worker's own mounts, and the mounts below a path.

The one place the worker calls them: the stagers' overlays, tmpfs bounds and FUSE views
(``storage/``) and the sandbox's ``/etc`` view (``sandbox/``) use these, each translating
``OSError`` into its own errors. ``ctypes`` rather than ``mount(8)``: a program per mount
would cost a millisecond each on an action's path.
"""

from __future__ import annotations

import ctypes
import errno
import os

from .mountinfo import MOUNTINFO, read_mountinfo

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """``mount(2)``; raises OSError naming ``target``."""
    encoded = [None if v is None else os.fsencode(v) for v in (source, target, fstype, data)]
    if _libc.mount(encoded[0], encoded[1], encoded[2], flags, encoded[3]) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def unmount(target: str, flags: int = 0) -> bool:
    """``umount2(2)``. Returns False if nothing was mounted at ``target`` (EINVAL, ENOENT);
    raises OSError naming ``target`` for anything else (EBUSY among them)."""
    if _libc.umount2(os.fsencode(target), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more)
        return False
    raise OSError(err, os.strerror(err), target)


def detach(target: str) -> bool:
    """Lazily unmount ``target`` (``MNT_DETACH``), which never waits for a file system
    daemon, dead or alive. Returns False if nothing was mounted there; raises OSError."""
    return unmount(target, MNT_DETACH)


def mounts_under(path: str, mountinfo: str = MOUNTINFO) -> list[str]:
    """Mount points at or below ``path`` in this process's mount namespace, deepest first
    (the order to unmount them in)."""
    top = os.path.abspath(path).rstrip("/") or "/"
    found = [
        entry.mount_point for entry in read_mountinfo(mountinfo)
        if entry.mount_point == top or entry.mount_point.startswith(top + "/")
    ]
    # Deepest first; for one path mounted several times, the later (upper) one first.
    order = {point: i for i, point in enumerate(found)}
    return sorted(set(found), key=lambda p: (-p.count("/"), -order[p]))


def detach_all_under(path: str) -> list[str]:
    """Lazily unmount every mount at or below ``path``, deepest first. Returns what was
    unmounted; raises OSError for one that cannot be."""
    done = []
    for point in mounts_under(path):
        # A path mounted twice shows up once: repeat until nothing is mounted there.
        while detach(point):
            done.append(point)
    return done
