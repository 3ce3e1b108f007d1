"""The disk checks: free space under the cache and the build root, evicting before giving up."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

from reapi_worker.protos.errors import ReapiError
from reapi_worker.storage.local_cas import CacheStats

from reapi_worker.host import format_bytes

from ..config import Watermarks
from .report import CheckResult, DiskUsage, Level, StatVfs

log = logging.getLogger("reapi_worker.health")


class EvictableCache(Protocol):
    """What a disk check needs of the local cache (``LocalCAS`` is one)."""

    def stats(self) -> CacheStats: ...

    def evict(self, down_to: int | None = None) -> int: ...


class DiskCheck:
    """Free space of the file system under ``path`` against ``watermarks``.

    Below ``low``, and if a ``cache`` on that file system is given, asks it to evict the
    shortfall (at most every ``evict_interval_seconds``: a pass scans the whole cache), then
    measures again. Below ``critical`` after that: UNHEALTHY; below ``low``: WARNING.
    A path that cannot be measured is UNHEALTHY (its disk is gone or unreadable).
    """

    def __init__(
        self,
        name: str,
        path: str,
        watermarks: Watermarks = Watermarks(),
        *,
        cache: EvictableCache | None = None,
        evict_interval_seconds: float = 30.0,
        statvfs: StatVfs = os.statvfs,
    ) -> None:
        self.name = name
        self.path = path
        self._marks = watermarks
        self._cache = cache
        self._evict_interval = evict_interval_seconds
        self._statvfs = statvfs
        self._last_evict: float | None = None

    def usage(self) -> DiskUsage:
        """Measure now. Raises OSError."""
        st = self._statvfs(self.path)
        # f_bavail, not f_bfree: the blocks reserved for root are no use to a build that
        # fills the disk, and the worker must stop before the disk is full for everyone.
        return DiskUsage(self.path, st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)

    def evaluate(self, now: float) -> CheckResult:
        where = f"{self.name.replace('_', ' ')} {self.path}"
        try:
            usage = self.usage()
        except OSError as error:
            return CheckResult(self.name, Level.UNHEALTHY, f"{where}: cannot measure free space: {error.strerror or error}")
        low, critical = self._marks.low.of(usage.total_bytes), self._marks.critical.of(usage.total_bytes)
        # Watermarks of mixed kinds (a size and a fraction) are ordered here, per disk: a
        # critical one above the low one would stop work without evicting first.
        low = max(low, critical)
        note = ""
        if usage.free_bytes < low and self._cache is not None and self._may_evict(now):
            note, usage = self._evict(usage, low - usage.free_bytes)
        free = f"{where}: {format_bytes(usage.free_bytes)} free of {format_bytes(usage.total_bytes)} ({usage.free_fraction:.1%})"
        if usage.free_bytes < critical:
            reason = f"{free}, below the critical watermark {self._marks.critical}: taking no work{note}"
            return CheckResult(self.name, Level.UNHEALTHY, reason, usage)
        if usage.free_bytes < low:
            action = "evicting from the cache" if self._cache is not None else "no cache here to evict from"
            return CheckResult(self.name, Level.WARNING, f"{free}, below the low watermark {self._marks.low}: {action}{note}", usage)
        return CheckResult(self.name, Level.OK, note.removeprefix("; "), usage)

    def _may_evict(self, now: float) -> bool:
        if self._last_evict is not None and now - self._last_evict < self._evict_interval:
            return False
        self._last_evict = now
        return True

    def _evict(self, usage: DiskUsage, shortfall: int) -> tuple[str, DiskUsage]:
        """Ask the cache to free ``shortfall`` bytes; the note for the reason, and the
        usage measured again."""
        assert self._cache is not None
        try:
            size = self._cache.stats().size_bytes
            freed = self._cache.evict(down_to=max(0, size - shortfall))
        except ReapiError as error:
            log.warning("%s: eviction failed: %s", self.name, error)
            return f"; eviction failed: {error}", usage
        log.info("%s: below the low watermark, evicted %s from the cache", self.name, format_bytes(freed))
        try:
            usage = self.usage()
        except OSError:
            pass  # reported on the next evaluation
        return f"; evicted {format_bytes(freed)} from the cache", usage


def standard_disk_checks(
    cache_dir: str,
    build_root: str,
    watermarks: Watermarks,
    cache: EvictableCache | None,
    *,
    evict_interval_seconds: float = 30.0,
    statvfs: StatVfs = os.statvfs,
    device_of: Callable[[str], int] = lambda path: os.stat(path).st_dev,
) -> list[DiskCheck]:
    """``cache_disk`` and ``build_root_disk``. The build root's check may evict too when it
    shares the cache's file system (the recommended layout, so inputs can be hardlinked):
    there, eviction is what frees its space. Both directories must exist."""
    shared = device_of(cache_dir) == device_of(build_root)
    options: dict[str, Any] = {"evict_interval_seconds": evict_interval_seconds, "statvfs": statvfs}
    return [
        DiskCheck("cache_disk", cache_dir, watermarks, cache=cache, **options),
        DiskCheck("build_root_disk", build_root, watermarks, cache=cache if shared else None, **options),
    ]
