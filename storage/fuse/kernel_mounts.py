"""Mounts made and removed with the kernel's own calls: each action's overlayfs and bounded
tmpfs, and the clean-up of mounts that a killed worker left behind.

The calls themselves are :mod:`reapi_worker.host.mounts`' (``mount(2)``/``umount2(2)``
through ctypes: an overlay mount and unmount cost ~0.2 ms together, a fork+exec of
``mount`` ~2 ms each); here their OSError becomes the worker's Internal, once. Needs root
(CAP_SYS_ADMIN in the worker's mount namespace), like the FUSE mount itself.

Every function here is thread-safe (the kernel serialises mount-table changes).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable, Sequence

from reapi_worker.host import mounts as host_mounts
from reapi_worker.host.mountinfo import MOUNTINFO
from reapi_worker.protos.errors import Internal, InvalidArgument

log = logging.getLogger(__name__)

MS_NOSUID, MS_NODEV = host_mounts.MS_NOSUID, host_mounts.MS_NODEV

# Characters that would change the meaning of an overlayfs option string: "," separates
# options, ":" separates lower layers, "\\" escapes either.
_OPTION_SPECIALS = frozenset(",:\\\n")

# The overlay's fixed options, and why:
# * redirect_dir=off: renaming a directory that came from the lower layer fails with EXDEV
#   (mv and friends then copy), so the upper dir never holds redirects to paths below: an
#   entry absent from the upper is the lower's entry *at the same path* (known_digest
#   relies on this) and the upper can be read on its own if ever needed.
# * metacopy=off: a chmod of an input copies its data up; with metacopy the upper would
#   hold a data-less file pointing at the lower one.
# * index=off, xino=off: no file handles or inode-number tricks; st_ino of an unmodified
#   input is the FUSE inode's.
OVERLAY_OPTIONS = "redirect_dir=off,metacopy=off,index=off,xino=off"


def check_mountable_path(path: str, what: str) -> str:
    """Return ``path`` if it can be named in an overlay option string, else InvalidArgument
    (an operator's build root with a comma or colon in it)."""
    if not path.startswith("/") or _OPTION_SPECIALS & set(path):
        raise InvalidArgument(f"{what} {path!r} must be absolute and free of ',', ':', '\\\\' and newlines")
    return path


def mount_overlay(lower: str | Sequence[str], upper: str, work: str, target: str) -> None:
    """Mount an overlayfs at ``target``: ``lower`` read-only below (several layers: the
    first is the top one), ``upper`` (with its ``work`` dir on the same file system) taking
    every change. ``nosuid,nodev``: a setuid binary or a device node an action leaves in its
    build directory gives nobody on the host anything. Raises Internal."""
    lowers = [lower] if isinstance(lower, str) else list(lower)
    for path, what in [*((layer, "lower dir") for layer in lowers), (upper, "upper dir"), (work, "work dir"),
                       (target, "mount point")]:
        check_mountable_path(path, what)
    # The layers are named by descriptor (/proc/self/fd/N), not by path: overlayfs shows its
    # options in /proc/*/mountinfo, which the sandbox reads, and the worker's build paths
    # are none of the action's business. The kernel resolves the names while mounting; the
    # descriptors may close right after.
    fds: list[int] = []
    try:
        for path in [*lowers, upper, work]:
            fds.append(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
    except OSError as error:
        for fd in fds:
            os.close(fd)
        raise Internal(f"mounting an overlay at {target}: opening a layer: {error}") from None
    try:
        named = [f"/proc/self/fd/{fd}" for fd in fds]
        lower = ":".join(named[: len(lowers)])
        options = f"lowerdir={lower},upperdir={named[-2]},workdir={named[-1]},{OVERLAY_OPTIONS}"
        host_mounts.mount("overlay", target, "overlay", MS_NOSUID | MS_NODEV, options)
    except OSError as error:
        raise Internal(f"mounting an overlay at {target} (lower {':'.join(lowers)}): {error.strerror}") from None
    finally:
        for fd in fds:
            os.close(fd)


def mount_tmpfs(target: str, size_bytes: int, mode: int = 0o755) -> None:
    """Mount a tmpfs of at most ``size_bytes`` (rounded up to pages) at ``target``; its
    pages are RAM (or swap), charged to the memory cgroup of whoever writes them.
    ``nosuid,nodev``, as overlays. Raises Internal."""
    try:
        host_mounts.mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_bytes},mode={mode:o}")
    except OSError as e:
        raise Internal(f"mounting a {size_bytes}-byte tmpfs at {target}: {e.strerror}") from e


def unmount(target: str) -> bool:
    """Unmount ``target``; if it is busy, detach it (the kernel finishes once the last user
    is gone). Returns False if nothing was mounted there. Raises Internal otherwise."""
    try:
        try:
            return host_mounts.unmount(target)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            log.warning("%s is busy; detaching it", target)
            return host_mounts.detach(target)
    except OSError as e:
        raise Internal(f"unmounting {target}: {e.strerror}") from e


def untouched_in_overlay(upper: str, parts: Sequence[str]) -> bool:
    """Whether the entry at ``parts`` of an overlay whose upper layer is ``upper`` is still
    the lower layer's: absent from the upper layer (with ``redirect_dir=off`` nothing else
    can stand in for it there). Any other answer of ``lstat`` is False: unsure means read."""
    try:
        os.lstat(os.path.join(upper, *parts))
    except OSError as err:
        return err.errno in (errno.ENOENT, errno.ENOTDIR)
    return False  # created or changed by the command


def unmount_before_removal(points: Iterable[str], build_dir: str) -> bool:
    """Unmount each of ``points`` (the innermost first) of the build directory
    ``build_dir``. Returns whether all came off; if one did not, the caller must not delete
    ``build_dir``: deleting through a mount would delete what is mounted (the cache's
    trees, a FUSE view). The next start's sweep (storage/build_root.py) detaches it."""
    clear = True
    for point in points:
        try:
            unmount(point)
        except Internal as error:
            log.error("leaving build directory %s: %s", build_dir, error)
            clear = False
    return clear


def detach(target: str) -> bool:
    """Lazily unmount ``target`` (``umount2(MNT_DETACH)``), which never waits for a file
    system daemon, dead or alive. Returns False if nothing was mounted there."""
    try:
        return host_mounts.detach(target)
    except OSError as e:
        raise Internal(f"detaching {target}: {e.strerror}") from e


def mounts_under(path: str, mountinfo: str = MOUNTINFO) -> list[str]:
    """Mount points at or below ``path``, deepest first (:func:`reapi_worker.host.mounts.mounts_under`)."""
    return host_mounts.mounts_under(path, mountinfo)


def detach_all_under(path: str) -> list[str]:
    """Lazily unmount every mount at or below ``path`` (stale mounts of a worker that died
    without cleaning up: its overlays and its FUSE mount, whose daemon is gone). Returns
    what was unmounted. Raises Internal if one cannot be."""
    try:
        return host_mounts.detach_all_under(path)
    except OSError as e:
        raise Internal(f"detaching {e.filename}: {e.strerror}") from e
