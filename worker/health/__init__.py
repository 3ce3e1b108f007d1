"""Is this worker fit to take work? Named checks, evaluated together, each with its reason.

A worker should stop asking for leases when it cannot do them justice: its scheduler is out
of reach (results would be lost), a disk is nearly full (actions would fail half-way with
ENOSPC), or sandboxing stopped working (every action would fail INTERNAL). The bot reports
UNHEALTHY to the scheduler with the reasons, so the scheduler assigns nothing to it; the
metrics export one gauge per check; ``/healthz`` answers 503 with the reasons.

Each check gives a :class:`Level`:

    OK          nothing to say
    WARNING     something is wrong and the worker is acting on it, still taking work
                (below the low free-space watermark: evicting from the cache)
    UNHEALTHY   take no work until it clears (below the critical watermark, scheduler
                silent past its grace period, a sandbox that cannot be set up)

The checks:

* :class:`SchedulerCheck` — fed by the session loop (:meth:`HealthMonitor.record_scheduler_contact`);
  unhealthy when no call has succeeded for ``grace_seconds``.
* :class:`DiskCheck` — free space of the file system under a path, by ``os.statvfs``. Disk
  safety goes in this order: below the ``low`` watermark the cache is asked to evict enough
  to get back above it (then the space is measured again); only if free space is still
  below ``critical`` does the worker stop taking work. Either way the reason says why.
* :class:`SandboxCheck` — a trivial sandbox (``sandbox.probe.runner_probe``: ``/bin/true``
  through the real runner, with the actions' limits) at most every ``interval_seconds``; an action whose
  sandbox could not be set up (:func:`~.executor.is_sandbox_setup_failure`, fed by
  :meth:`HealthMonitor.record_outcome`) fails the check at once, until a probe passes again
  (retried every ``retry_seconds`` meanwhile).

Who calls what: the composition root builds the monitor (:func:`standard_checks`) and calls
:meth:`HealthMonitor.start`, which checks once and then every few seconds on a thread of
its own (a check may evict or run a sandbox: never on the session loop's thread). The bot
reads :meth:`HealthMonitor.healthy` every turn, which never blocks. Time and ``statvfs``
come in through constructors, so tests need neither sleeps nor full disks.

Modules: :mod:`.report` (levels, results, the check interface), :mod:`.scheduler`,
:mod:`.disks` and :mod:`.sandbox` (one check each), :mod:`.monitor` (the monitor and the
executor wrapper feeding it), :mod:`.standard` (the worker's set of checks).
"""

from .disks import DiskCheck, EvictableCache, standard_disk_checks
from .monitor import HealthMonitor, HealthRecordingExecutor
from .report import CheckResult, DiskUsage, HealthCheck, HealthReport, Level
from .sandbox import SandboxCheck
from .scheduler import SchedulerCheck
from .standard import HealthConfig, standard_checks

__all__ = [
    "CheckResult",
    "DiskCheck",
    "DiskUsage",
    "EvictableCache",
    "HealthCheck",
    "HealthConfig",
    "HealthMonitor",
    "HealthRecordingExecutor",
    "HealthReport",
    "Level",
    "SandboxCheck",
    "SchedulerCheck",
    "standard_checks",
    "standard_disk_checks",
]
