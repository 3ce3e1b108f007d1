"""A host uid/gid per concurrent action: :class:`UidPool`, and :class:`SharedUid` for a
worker that cannot switch ids.

Why one uid per action: with one sandbox uid for everyone, every in-flight build directory
belongs to the same host user, so a process of that uid — a setuid binary one action left
in its build directory, run by anyone who can reach it — reads and rewrites every other
tenant's inputs and outputs before they are captured: a forged result. With a uid of its
own, an action's build directory (``0700``, owned by that uid) is closed to every other
action's uid and to every other host user.

Contract of an identity source (both classes):

* :meth:`lease` hands out a :class:`UidLease` — the :class:`~.identity.RunAs` the action's
  sandbox runs as and its build directory's directories are owned by — for the action's
  whole life: staging, run, capture and the removal of its build directory;
* :meth:`UidLease.release` gives it back; the caller releases only once the build
  directory is gone from where anything could reach it (nothing of the action left that
  the next holder of the uid would own), and :meth:`UidLease.retire` instead when it is
  not: the uid is then never leased again by this pool (logged; the pool shrinks);
* a pool with no free uid raises :class:`~reapi_worker.protos.errors.ResourceExhausted`:
  the worker's own shortage, reported UNAVAILABLE (worker/faults.py), never the action's
  result;
* thread-safe: leases are taken and released from every action's thread.

Workers on one host must never share a uid: each pool *claims* its ids for its life with a
``flock`` on one file per id in a host-wide directory (:data:`CLAIM_DIR`, on ``/run``: gone
at boot, and a dead worker's locks go with it). :meth:`UidPool.claim` takes the first of
several candidate ranges whose ids no live worker holds — how ``sandbox_uid_range = "auto"``
gives two workers on one host two ranges. (Containers on one host see different ``/run``
directories: give each its own range.)

The pool hands out the uid free for longest first (FIFO), so consecutive actions get
different uids and a just-released one rests before it is reused. Each slot's gid is the
same number as its uid: no two actions share a group either.

The cache stays safe from every pool uid (:mod:`.identity`'s hardlink rule, per uid): a
pool refuses the cache's owner (the worker's own uid, and its gid), and a uid the running
worker cannot switch to — one outside its user namespace's ``uid_map`` / ``gid_map`` (a
container with remapped ids) — is refused when the pool is built, not when an action
would fail on it.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Iterable

from reapi_worker.protos.errors import ResourceExhausted

from .errors import SandboxSetupError
from .identity import RunAs, sandbox_can_protect_hardlinks

log = logging.getLogger(__name__)

#: Where pools claim their ids, host-wide (module docstring).
CLAIM_DIR = "/run/reapi-worker/sandbox-uids"


class UidLease:
    """One action's host identity, from :meth:`UidPool.lease` (or :meth:`SharedUid.lease`).
    Release or retire it exactly once; further calls do nothing."""

    def __init__(self, run_as: RunAs, pool: "UidPool | None") -> None:
        self.run_as = run_as
        self._pool = pool
        self._done = False

    def release(self) -> None:
        """Give the uid back: its build directory is gone."""
        if not self._done:
            self._done = True
            if self._pool is not None:
                self._pool._give_back(self.run_as.uid)

    def retire(self, why: str) -> None:
        """Never lease this uid again: something of the action's may still be reachable."""
        if not self._done:
            self._done = True
            if self._pool is not None:
                self._pool._retire(self.run_as.uid, why)


class UidPool:
    """The uids ``ids`` (each with the gid of the same number) for one action each.

    Raises SandboxSetupError when ``ids`` is empty, holds the worker's own uid or gid (the
    cache's owner), or holds an id this process cannot switch to (see the module docstring).
    Built directly, it claims nothing (tests); :meth:`claim` builds one that holds its ids
    against every other worker of the host until :meth:`close`.
    """

    def __init__(self, ids: Iterable[int]) -> None:
        uids = list(dict.fromkeys(ids))
        if not uids:
            raise SandboxSetupError("the sandbox uid pool is empty")
        for uid in uids:
            RunAs(uid, uid)  # range check
        owner = {os.geteuid(), os.getegid()}
        if clash := sorted(owner.intersection(uids)):
            raise SandboxSetupError(
                f"the sandbox uid pool holds {clash[0]}, the worker's own id: the cache's owner may never "
                "run a sandbox (hardlinked inputs would be writable)"
            )
        for kind in ("uid", "gid"):
            if outside := _unmapped(uids, f"/proc/self/{kind}_map"):
                raise SandboxSetupError(
                    f"the sandbox uid pool holds {kind} {outside}, which this worker's user namespace does not "
                    f"map (/proc/self/{kind}_map): choose ids it maps"
                )
        self.ids: tuple[int, ...] = tuple(uids)
        self._free = collections.deque(uids)
        self._retired: set[int] = set()
        self._lock = threading.Lock()
        self._claims: list[int] = []  # descriptors holding this pool's flocks

    @classmethod
    def claim(cls, candidates: Iterable[range], claim_dir: str = CLAIM_DIR) -> "UidPool":
        """A pool of the first candidate range none of whose ids another live pool of the
        host holds, claimed until :meth:`close`. SandboxSetupError if every candidate is
        taken (naming the last), or for a range the constructor refuses."""
        os.makedirs(claim_dir, mode=0o700, exist_ok=True)
        last: range | None = None
        for ids in candidates:
            pool = cls(ids)
            if pool._claim_all(claim_dir):
                return pool
            last = ids
        assert last is not None, "no candidate range"
        raise SandboxSetupError(
            f"sandbox uids {last.start}-{last.stop - 1} are held by another worker on this host "
            f"({claim_dir}): give each worker a range of its own (sandbox_uid_range)"
        )

    def _claim_all(self, claim_dir: str) -> bool:
        for uid in self.ids:
            fd = os.open(os.path.join(claim_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self.close()
                return False
            self._claims.append(fd)
        return True

    def close(self) -> None:
        """Give up the claims (the ids stay usable here; another worker may take them)."""
        while self._claims:
            with contextlib.suppress(OSError):
                os.close(self._claims.pop())

    def __enter__(self) -> "UidPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lease(self) -> UidLease:
        """The uid free for longest; ResourceExhausted when none is."""
        with self._lock:
            if not self._free:
                raise ResourceExhausted(
                    f"no sandbox uid free: all {len(self.ids) - len(self._retired)} of the pool are held by "
                    f"actions whose build directories still exist"
                    + (f" ({len(self._retired)} retired)" if self._retired else "")
                    + " (sandbox_uid_range)"
                )
            uid = self._free.popleft()
        return UidLease(RunAs(uid, uid), self)

    @property
    def free(self) -> int:
        with self._lock:
            return len(self._free)

    @property
    def retired(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._retired)

    @property
    def protects_hardlinks(self) -> bool:
        """Always: no pool uid owns the cache (checked when the pool was built)."""
        return True

    def _give_back(self, uid: int) -> None:
        with self._lock:
            self._free.append(uid)

    def _retire(self, uid: int, why: str) -> None:
        with self._lock:
            self._retired.add(uid)
        log.error("sandbox uid %d retired (never leased again by this worker): %s", uid, why)


class SharedUid:
    """Every action runs as one identity: a worker that is not root cannot switch uids, so
    its actions share its own (and it must stage by copying: ``protects_hardlinks`` is
    False then). Leasing never runs out; releasing does nothing."""

    def __init__(self, run_as: RunAs) -> None:
        self.run_as = run_as
        self.ids: tuple[int, ...] = (run_as.uid,)

    def lease(self) -> UidLease:
        return UidLease(self.run_as, None)

    @property
    def protects_hardlinks(self) -> bool:
        return sandbox_can_protect_hardlinks(self.run_as)


def parse_uid_range(text: str) -> range:
    """``"FIRST-LAST"`` (inclusive, decimal) -> a range. Raises ValueError with the reason."""
    first, sep, last = text.strip().partition("-")
    if not sep or not (first.isdigit() and last.isdigit()):
        raise ValueError(f"{text!r} is not FIRST-LAST (two decimal ids)")
    low, high = int(first), int(last)
    if low > high:
        raise ValueError(f"{text!r}: the first id is above the last")
    return range(low, high + 1)


def _unmapped(ids: list[int], map_path: str) -> int | None:
    """The first of ``ids`` no extent of ``map_path`` (``inside outside count`` lines)
    covers, or None; None too when the map cannot be read (not Linux: nothing to check)."""
    try:
        with open(map_path) as f:
            extents = [tuple(int(n) for n in line.split()) for line in f if line.strip()]
    except OSError:
        return None
    for ident in ids:
        if not any(inside <= ident < inside + count for inside, _outside, count in extents):
            return ident
    return None


#: Where an executor gets each action's identity: a pool, or one shared identity.
UidSource = UidPool | SharedUid
