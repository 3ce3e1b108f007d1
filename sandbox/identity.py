"""Which host uid the sandbox runs as, and why that protects hardlinked inputs.

The trap: a staged input is a *hardlink* of a file in the worker's cache — the same inode.
If the sandboxed command runs as the owner of that inode it can ``chmod u+w`` it and write
through the link, corrupting the cached blob for every later action; ``--cap-drop ALL`` does
not help, because the owner needs no capability to chmod. bubblewrap as root with
``--uid 0`` maps the sandbox's root to the host's root, the owner of the cache.

The design: bubblewrap runs as an unprivileged host uid/gid that owns nothing in the cache:
each action's own from a :class:`~.uid_pool.UidPool` (which refuses the cache's owner), or
the runner's default, ``65534:65534`` ("nobody"), for requests that name none (the probe). Inside the
user namespace the command may *appear* as uid 0 (the request's ``uid``), but that id maps to
the unprivileged host uid only, so the cache's files have an unmapped owner there: chmod
fails with EPERM, writing with EACCES, and ``fs.protected_hardlinks`` stops new links to them.
The build directory's *directories* must be writable by that uid so the command can create
outputs and replace (rename over) inputs; :func:`prepare_build_dir` chowns them, or the
stager creates them owned by that uid in the first place. Files are never chowned: they are
the cache's inodes.

A worker that is not root cannot switch uid: the sandbox runs as the worker's own uid,
which owns the cache. Such a worker must stage inputs by *copying*, not linking;
:func:`sandbox_can_protect_hardlinks` tells the composition root which case it is in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import SandboxSetupError


@dataclass(frozen=True)
class RunAs:
    """The host uid/gid bubblewrap (and so the whole sandbox) runs as. No supplementary groups."""

    uid: int
    gid: int

    def __post_init__(self) -> None:
        for ident in (self.uid, self.gid):
            if not isinstance(ident, int) or not 0 <= ident < 2**32 - 1:
                raise SandboxSetupError(f"host uid/gid {ident!r} is out of range")


#: The default sandbox identity when the worker runs as root.
NOBODY = RunAs(65534, 65534)


def default_run_as() -> RunAs:
    """The identity a sandbox gets when nobody chooses one: :data:`NOBODY` when the worker
    is root, else the worker's own ids."""
    return effective_run_as(None) or RunAs(os.geteuid(), os.getegid())


def effective_run_as(run_as: RunAs | None) -> RunAs | None:
    """The identity to switch to, or ``None`` to run as the worker itself.

    ``None`` means "automatic": :data:`NOBODY` when the worker is root, else the worker's own
    ids (no switch). An explicit identity other than the worker's own needs root.
    """
    euid, egid = os.geteuid(), os.getegid()
    if run_as is None:
        return NOBODY if euid == 0 else None
    if run_as == RunAs(euid, egid):
        return None
    if euid != 0:
        raise SandboxSetupError(
            f"cannot run the sandbox as {run_as.uid}:{run_as.gid}: the worker is not root "
            f"(uid {euid}); configure no sandbox identity and stage inputs by copying"
        )
    return run_as


def sandbox_host_uid(run_as: RunAs | None) -> int:
    """The host uid the sandboxed command's files and processes will belong to."""
    target = effective_run_as(run_as)
    return os.geteuid() if target is None else target.uid


def sandbox_can_protect_hardlinks(run_as: RunAs | None = None, cache_owner_uid: int | None = None) -> bool:
    """Whether hardlinked inputs are safe: the sandbox's host uid does not own the cache.

    ``cache_owner_uid`` defaults to the worker's own effective uid (the worker writes the
    cache). ``False`` means the stager must copy inputs instead of linking them.
    """
    owner = os.geteuid() if cache_owner_uid is None else cache_owner_uid
    return sandbox_host_uid(run_as) != owner


def prepare_build_dir(path: str, uid: int, gid: int) -> None:
    """Make every directory of a staged tree (``path`` included) owned by ``uid:gid``.

    Only directories: files are left alone, since hardlinked files are the cache's own inodes
    and must stay owned by the cache. Symlinks are never followed (``fwalk`` with
    ``follow_symlinks=False``, ``lchown`` semantics), so a hostile tree cannot redirect the
    chown. Costs one ``chown`` per directory; a stager that creates directories with the
    right owner can skip this. Call it before the sandbox runs; not thread-safe against
    concurrent changes to the same tree.
    """
    os.chown(path, uid, gid, follow_symlinks=False)
    for _root, dirs, _files, root_fd in os.fwalk(path, follow_symlinks=False):
        for name in dirs:
            os.chown(name, uid, gid, dir_fd=root_fd, follow_symlinks=False)
