"""One worker's part of a build root, and the sweep of parts whose worker died.

Several workers on one host may share a build root (they share the cache beside it). A
worker killed with SIGKILL leaves its build directories, their stream files, its overlay
and FUSE mounts and its trash behind; nothing else would ever remove them, and they hold
disk space (and cache blobs' inodes) for ever. So every directory a worker makes lives in a
part of its own, and a part is swept when its worker is known to be dead::

    <build root>/.owners/<token>   flock(LOCK_EX)-held by the live worker, for its life
    <build root>/w-<token>/        its build directories, .trash, .fuse

**Dead is exact.** The kernel drops a flock when its process dies, whatever killed it, in
any pid namespace; so "can I lock ``.owners/<token>``" is the question, with no pid or age
guess. The owner file is created and locked *before* the part's directory exists, and the
sweep lists directories before it tries the locks: a listed directory whose owner file is
unlocked or gone belongs to a dead worker for good (host/owner_locks.py, the scheme the
local CAS's owners use too).

**Sweeping a dead part**: every mount below it is detached (lazily: a dead FUSE daemon
cannot answer), then the directory is renamed into the new worker's trash, so the start
is not held up by deleting it; the background remover deletes it (storage/tree_removal.py:
never through a mount). Its owner file goes last, while we hold its lock.

**The layout before this one** put build directories (``<32 hex>``), ``streams-*``,
``.trash`` and ``.fuse`` directly in the build root, with no owner. They are swept too,
but only when no other live worker holds a part of this build root: a worker of that older
version cannot be running beside this one then. (Do not run an older and a newer worker on
one build root at once.)

Not fork-safe; one :class:`BuildRoot` per worker process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid

from reapi_worker.protos.errors import Internal

from .fuse import kernel_mounts
from reapi_worker.host.owner_locks import become_owner, lock_if_dead

log = logging.getLogger(__name__)

_OWNERS = ".owners"
_PART_PREFIX = "w-"
_LEGACY = re.compile(r"[0-9a-f]{32}|streams-.*|\.trash|\.fuse")


class BuildRoot:
    """This worker's part of ``root``: :attr:`path`. :meth:`claim` makes one and sweeps
    the parts of dead workers; :meth:`close` gives it up (removing it if empty)."""

    def __init__(self, root: str, token: str, owner_fd: int) -> None:
        self.root = root
        self.token = token
        self.path = os.path.join(root, _PART_PREFIX + token)
        self.trash = os.path.join(self.path, ".trash")
        self._owner_fd = owner_fd
        self.swept: list[str] = []  # what the claim found of dead workers, for logs and tests

    @classmethod
    def claim(cls, root: str) -> BuildRoot:
        """Create this worker's part under ``root`` and sweep dead workers' (module doc).
        Raises Internal if the build root cannot be written."""
        root = os.path.abspath(root)
        try:
            owners = os.path.join(root, _OWNERS)
            os.makedirs(owners, exist_ok=True)
            token, fd = become_owner(owners, str(os.getpid()))
            part = cls(root, token, fd)
            os.makedirs(part.trash, mode=0o755)
            os.chmod(part.path, 0o755)  # the sandbox uid must reach build directories
            part.swept = part._sweep()
        except OSError as error:
            raise Internal(f"claiming a part of build root {root}: {error}") from error
        if part.swept:
            log.warning("swept %d leftover(s) of dead workers from %s: %s", len(part.swept), root,
                        ", ".join(sorted(part.swept)[:10]))
        return part

    def close(self) -> None:
        """Give up the part: remove it if only empty directories are left (the caller
        drained its remover and unmounted its mounts), then the owner file. Idempotent."""
        if self._owner_fd < 0:
            return
        for path in (self.trash, self.path):
            with contextlib.suppress(OSError):
                os.rmdir(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.root, _OWNERS, self.token))
        os.close(self._owner_fd)
        self._owner_fd = -1

    def _sweep(self) -> list[str]:
        names = os.listdir(self.root)  # listed before the locks are tried (module doc)
        owners = os.path.join(self.root, _OWNERS)
        tokens = {name[len(_PART_PREFIX):] for name in names if name.startswith(_PART_PREFIX)}
        tokens |= set(os.listdir(owners))
        tokens.discard(self.token)
        swept = []
        others_alive = False
        for token in sorted(tokens):
            owner_fd = lock_if_dead(os.path.join(owners, token))
            if owner_fd is None:
                others_alive = True
                continue
            try:
                part = os.path.join(self.root, _PART_PREFIX + token)
                if os.path.lexists(part):
                    self._discard(part)
                    swept.append(part)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(owners, token))
            finally:
                if owner_fd >= 0:
                    os.close(owner_fd)
        if not others_alive:
            for name in names:
                if _LEGACY.fullmatch(name):
                    path = os.path.join(self.root, name)
                    self._discard(path)
                    swept.append(path)
        return swept

    def _discard(self, path: str) -> None:
        """Unmount everything below ``path``, then move it into our trash."""
        if os.geteuid() == 0:
            for point in kernel_mounts.detach_all_under(path):
                log.warning("detached stale mount %s", point)
        os.rename(path, os.path.join(self.trash, uuid.uuid4().hex))
