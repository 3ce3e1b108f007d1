"""Idmapped mounts: a directory shown with its owner's uid/gid replaced, without touching it.

The directory cache (:mod:`.tree_cache`) keeps materialised trees owned by the worker
(root), mode 0755/0444: nobody else may write them. An action's view of such a tree must
nevertheless show directories owned by the sandbox's uid — an action may create, replace
and delete entries anywhere in its input root, exactly as with hardlink staging — and the
sandbox's uid differs per worker (and per action with a uid pool). An idmapped mount of the
cached tree (Linux >= 5.12; as an overlayfs lower layer >= 5.19) shows one stored uid/gid as
the sandbox's, per mount, for free: measured here, cloning the tree, idmapping the clone and
attaching it cost ~0.1 ms, the same as an overlay mount. The files on disk keep their
owner and mode; what the action writes goes to its overlay's upper layer (overlayfs copies
a file up before any change), never into the cache.

Only *directories* change hands: the cache stores them owned by :data:`TREE_DIR_ID`, a
uid/gid no process runs as, and the mapping shows exactly that id as the sandbox's. Files
stay root's (the local CAS's inodes): the action cannot chmod or write them, exactly as
with hardlink staging, though it may replace them.

A mapping needs a user namespace whose uid_map says "TREE_DIR_ID <uid> 1" (and keeps 0 as 0,
see :func:`_map`): :class:`OwnerMappings`
makes one per owner (a short-lived ``unshare --user`` child whose namespace outlives it
through an open descriptor — a subprocess, not ``fork``: the worker has gRPC threads).

Needs root (CAP_SYS_ADMIN for the mount, CAP_SETUID/CAP_SETGID to write the maps).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import time

from reapi_worker.protos.errors import Internal

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# x86-64 and aarch64 share these numbers (the new mount API came after the unified table).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_IDMAP = 0x100000

#: Owner (uid and gid) of every directory of a cached tree on disk. Chosen so that nothing
#: runs as it: above the ranges distributions and systemd hand out (system and regular
#: users, dynamic users up to 65519, container ranges up to 1879048191), below (uid_t)-2.
#: Only root can write there (mode 0755), and only an idmapped mount shows it as someone.
TREE_DIR_ID = 2147483646


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def attach_idmapped(source: str, target: str, userns_fd: int) -> None:
    """Mount a read-only clone of ``source`` at ``target`` (an existing directory) with
    ``userns_fd``'s mapping applied: an entry owned by an id the namespace maps shows the
    id it maps to; any other shows as unmapped (no one owns it). Raises Internal."""
    fd = _libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(source), _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC)
    if fd < 0:
        raise Internal(f"cloning mount of {source}: {os.strerror(ctypes.get_errno())}")
    try:
        attr = _MountAttr(_MOUNT_ATTR_IDMAP | _MOUNT_ATTR_RDONLY, 0, 0, userns_fd)
        if _libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
            raise Internal(f"idmapping a mount of {source}: {os.strerror(ctypes.get_errno())}")
        if _libc.syscall(_SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH) != 0:
            raise Internal(f"attaching an idmapped mount of {source} at {target}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


class OwnerMappings:
    """User namespaces mapping ``stored_id`` (uid and gid) to an owner, made on first request
    and kept open (one descriptor each) until :meth:`close`. Thread-safe."""

    def __init__(self, stored_id: int = TREE_DIR_ID, unshare: str = "unshare") -> None:
        self._stored = stored_id
        self._unshare = unshare
        self._lock = threading.Lock()
        self._fds: dict[tuple[int, int], int] = {}

    def userns_fd(self, uid: int, gid: int) -> int:
        """A descriptor of a user namespace whose maps show ``stored_id`` as uid/gid."""
        with self._lock:
            fd = self._fds.get((uid, gid))
            if fd is None:
                fd = self._fds[(uid, gid)] = _make_userns(self._unshare, self._stored, uid, gid)
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _make_userns(unshare: str, stored: int, uid: int, gid: int) -> int:
    ours = os.readlink("/proc/self/ns/user")
    try:
        child = subprocess.Popen([unshare, "--user", "--", "cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    except OSError as error:
        raise Internal(f"starting {unshare} --user for an idmapped mount: {error}") from None
    try:
        deadline = time.monotonic() + 10.0
        path = f"/proc/{child.pid}/ns/user"
        while os.readlink(path) == ours:  # until the child has unshared
            if child.poll() is not None or time.monotonic() > deadline:
                raise Internal(f"{unshare} --user did not make a user namespace (exit {child.poll()})")
            time.sleep(0.001)
        for name, owner in (("uid_map", uid), ("gid_map", gid)):
            with open(f"/proc/{child.pid}/{name}", "w") as out:
                out.write(_map(stored, owner))
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise Internal(f"making a user namespace mapping {stored} to {uid}:{gid}: {error}") from None
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()


def _map(stored: int, owner: int) -> str:
    """The id map showing ``stored`` as ``owner`` and keeping root's files root's. Every id
    must be mapped: the kernel refuses to delete or change an entry whose owner an idmapped
    mount leaves unmapped (EOVERFLOW). An owner that is root itself gets the files shown as
    ``stored`` instead (two ids cannot map to one)."""
    return f"{stored} {owner} 1\n0 {0 if owner != 0 else stored} 1\n"
