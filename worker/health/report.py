"""What a health check finds: :class:`Level`, :class:`CheckResult`, all of them together in
a :class:`HealthReport`; and the :class:`HealthCheck` interface every check implements."""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

Clock = Callable[[], float]
#: ``os.statvfs``'s signature; tests pass a fake that reports any free space they like.
StatVfs = Callable[[str], os.statvfs_result]


class Level(enum.IntEnum):
    """How bad a check's finding is; the value is what the metrics gauge shows."""

    OK = 0
    WARNING = 1
    UNHEALTHY = 2


@dataclass(frozen=True, slots=True)
class DiskUsage:
    """Space of the file system under ``path``, as an unprivileged process may use it."""

    path: str
    free_bytes: int
    total_bytes: int

    @property
    def free_fraction(self) -> float:
        return self.free_bytes / self.total_bytes if self.total_bytes else 0.0


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check's finding: ``reason`` is empty only when there is nothing to say (it may
    be set at OK, e.g. "evicted 2.0 GiB"). ``disk`` is set by disk checks, for metrics."""

    name: str
    level: Level
    reason: str = ""
    disk: DiskUsage | None = None


@dataclass(frozen=True, slots=True)
class HealthReport:
    """Every check's finding at one moment (``checked_at``, the monitor's clock)."""

    results: tuple[CheckResult, ...]
    checked_at: float

    @property
    def ok(self) -> bool:
        """Whether the worker should take work: no check is UNHEALTHY."""
        return all(r.level < Level.UNHEALTHY for r in self.results)

    @property
    def reasons(self) -> tuple[str, ...]:
        """Why the worker takes no work (empty when :attr:`ok`)."""
        return tuple(r.reason for r in self.results if r.level is Level.UNHEALTHY)

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(r.reason for r in self.results if r.level is Level.WARNING)

    def to_json(self) -> dict[str, Any]:
        """What ``/healthz`` answers: status, reasons, and each check's level and reason."""
        return {
            "status": "ok" if self.ok else "unhealthy",
            "reasons": list(self.reasons),
            "checks": {r.name: {"level": r.level.name.lower(), "reason": r.reason} for r in self.results},
        }


class HealthCheck(Protocol):
    """One named check. ``evaluate`` is called by the monitor only, one call at a time, with
    the monitor's clock; it may block for a while (evict, run a sandbox) and must not raise
    for a finding (a raise is reported as UNHEALTHY with the error, as a bug)."""

    @property
    def name(self) -> str: ...

    def evaluate(self, now: float) -> CheckResult: ...
