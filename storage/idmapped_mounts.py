"""Idmapped mounts: a tree of root's shown as the action's own, without touching it.

The directory cache (:mod:`.tree_cache`) keeps materialised trees owned by the worker
(root): directories 0755, files the local CAS's blobs (hardlinks, 0644/0755). Under
``build_dir_size`` the hardlink stager's tree is root's too (:mod:`.bounded_staging`).
Nobody else may write them. An action's view of such a tree must nevertheless show every
entry as the sandbox's uid's — an action may create, replace and delete entries anywhere in
its input root, and, as BuildStream's local sandbox lets it, ``touch``, ``chmod``,
append to and rewrite its input files in place — and the sandbox's uid differs per
action (uid pool). An idmapped mount of the tree (Linux >= 5.12; as an overlayfs lower
layer >= 5.19) shows root as the sandbox's uid, per mount, for free: measured here, cloning
the tree, idmapping the clone and attaching it cost ~0.1 ms, the same as an overlay mount.
The files on disk keep their owner, mode and times: the kernel's permission check passes
on the overlay's inode (owned by the action), and overlayfs then copies the file up into
the action's upper layer with the mounter's credentials before any change, so the write
lands there, never in the cache (checked on 6.18: touch, chmod, chown, truncate, append
and open-for-write copy up; the lower inode's mode, times, link count and bytes stay;
two paths that are one cache inode are two files to the action — one copied up leaves the
other as it was, as two files of a REAPI tree are locally).

A mapping needs a user namespace whose uid_map says "0 <uid> 1" (gid_map likewise):
:class:`OwnerMappings` makes one per owner (a short-lived ``unshare --user`` child whose
namespace outlives it through an open descriptor — a subprocess, not ``fork``: the worker
has gRPC threads). No other id is mapped: a tree holding an entry of another owner would
show it unmapped (nobody's), and the kernel refuses to change it (EOVERFLOW) — the trees
mapped here are written by the worker alone, all root's.

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
    """User namespaces mapping root (uid and gid 0) to an owner, made on first request and
    kept open (one descriptor each) until :meth:`close`. Thread-safe."""

    def __init__(self, unshare: str = "unshare") -> None:
        self._unshare = unshare
        self._lock = threading.Lock()
        self._fds: dict[tuple[int, int], int] = {}

    def userns_fd(self, uid: int, gid: int) -> int:
        """A descriptor of a user namespace whose maps show root as ``uid``/``gid``."""
        with self._lock:
            fd = self._fds.get((uid, gid))
            if fd is None:
                fd = self._fds[(uid, gid)] = _make_userns(self._unshare, uid, gid)
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _make_userns(unshare: str, uid: int, gid: int) -> int:
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
                out.write(f"0 {owner} 1\n")
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise Internal(f"making a user namespace mapping root to {uid}:{gid}: {error}") from None
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()

