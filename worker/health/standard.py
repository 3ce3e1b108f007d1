"""The worker's standard set of checks, from the operator's choices."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from reapi_worker.sandbox.probe import Probe

from ..config import Watermarks
from .disks import EvictableCache, standard_disk_checks
from .report import Clock, HealthCheck, StatVfs
from .sandbox import SandboxCheck
from .scheduler import SchedulerCheck


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """The operator's choices for the checks (see each check for what they mean).

    ``interval_seconds``: how often the monitor's thread checks. ``scheduler_grace_seconds``:
    keep it above the bot's ``poll_deadline_seconds``. ``disk``: the free-space watermarks of
    the cache's and the build root's file systems. ``sandbox_probe_seconds`` /
    ``sandbox_retry_seconds``: how often a trivial sandbox is run, normally and while failing.
    """

    interval_seconds: float = 5.0
    scheduler_grace_seconds: float = 60.0
    disk: Watermarks = Watermarks()
    evict_interval_seconds: float = 30.0
    sandbox_probe_seconds: float = 300.0
    sandbox_retry_seconds: float = 15.0


def standard_checks(
    config: HealthConfig,
    *,
    cache_dir: str,
    build_root: str,
    cache: EvictableCache | None,
    probe: Probe | None,
    clock: Clock = time.monotonic,
    statvfs: StatVfs = os.statvfs,
) -> list[HealthCheck]:
    """The worker's checks: scheduler, cache disk, build-root disk and (with a ``probe``,
    e.g. :func:`~reapi_worker.sandbox.probe.runner_probe`) sandbox."""
    checks: list[HealthCheck] = [SchedulerCheck(config.scheduler_grace_seconds, clock=clock)]
    checks += standard_disk_checks(
        cache_dir, build_root, config.disk, cache,
        evict_interval_seconds=config.evict_interval_seconds, statvfs=statvfs,
    )
    if probe is not None:
        checks.append(SandboxCheck(
            probe, interval_seconds=config.sandbox_probe_seconds,
            retry_seconds=config.sandbox_retry_seconds, clock=clock,
        ))
    return checks
