"""``FreeSpaceGuard``: the fallback for a worker that cannot bound its actions' writes.

Without a bound of their own (storage/bounded_staging.py needs root; ``build_dir_size =
"off"``), actions write to the build root's file system, which the worker shares, and an
ENOSPC they meet there cannot be told from their own result. This wrapper catches what it
can: after the command, if that file system has less than ``reserve_bytes`` free (the
operator's ``disk_critical_free``), the run may have met a full disk and the lease is
reported UNAVAILABLE, so the scheduler runs it elsewhere.

It is **not exact**, and says so: it samples free space once, after the run, so a disk
that filled during the run and was freed before its end goes unseen (a wrong result
remains possible), and a disk filled by someone else at the end costs a needless retry.
Only the bound is exact; use this where the bound cannot be had.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from reapi_worker.protos.errors import Unavailable

from .digests import Digest
from .directory.cas import CasDirectory
from .paths import RelPath
from .staging import Owner, StagedInput, Stager


class FreeSpaceGuard(Stager):
    """Wrap ``inner``; each staged input's :meth:`~StagedInput.check` raises Unavailable
    when the file system under its build directory has less than ``reserve_bytes`` free."""

    def __init__(
        self, inner: Stager, reserve_bytes: int, statvfs: Callable[[str], os.statvfs_result] = os.statvfs
    ) -> None:
        self._inner = inner
        self._reserve = reserve_bytes
        self._statvfs = statvfs

    def stage(
        self, root: CasDirectory, build_dir: str, directories: Iterable[RelPath] = (), owner: Owner | None = None
    ) -> StagedInput:
        staged = self._inner.stage(root, build_dir, directories, owner)
        return _Guarded(staged, os.path.dirname(os.path.abspath(build_dir)), self._reserve, self._statvfs)


class _Guarded(StagedInput):
    def __init__(
        self, inner: StagedInput, where: str, reserve: int, statvfs: Callable[[str], os.statvfs_result]
    ) -> None:
        self._inner = inner
        self.path = inner.path
        self.scratch_dir = inner.scratch_dir
        self.private_inputs = inner.private_inputs
        self._where = where
        self._reserve = reserve
        self._statvfs = statvfs

    def check(self) -> None:
        self._inner.check()
        st = self._statvfs(self._where)
        free = st.f_bavail * st.f_frsize
        if free < self._reserve:
            raise Unavailable(
                f"the build root's file system ({self._where}) has {free} bytes free after the run, below "
                f"the {self._reserve} reserved: the action may have met a full disk (no per-action bound "
                "on this worker, build_dir_size)"
            )

    def known_digest(self, parts: RelPath, st: os.stat_result) -> Digest | None:
        return self._inner.known_digest(parts, st)

    def close(self) -> None:
        self._inner.close()
