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
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import InvalidArgument, ReapiError
from reapi_worker.sandbox.probe import Probe
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.local_cas import CacheStats

from .config import Watermarks, format_bytes
from .executor import ActionExecutor, Outcome, is_sandbox_setup_failure

log = logging.getLogger("reapi_worker.health")

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


# ---- scheduler -----------------------------------------------------------------------------


class SchedulerCheck:
    """Unhealthy when no call to the scheduler has succeeded for ``grace_seconds``.

    The grace period starts when the check is made (a worker starting up is given it too)
    and must be longer than the longest successful call, the idle long-poll (the bot's
    ``poll_deadline_seconds``): an idle bot records a success only as often as that.
    A failure within the grace period is a WARNING. Thread-safe.
    """

    name = "scheduler"

    def __init__(self, grace_seconds: float = 60.0, *, clock: Clock = time.monotonic) -> None:
        if not grace_seconds > 0:
            raise InvalidArgument(f"scheduler grace period must be positive, not {grace_seconds}")
        self._grace = grace_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._last_ok = clock()
        self._failures = 0
        self._last_error = ""

    def record_contact(self, ok: bool, detail: str = "") -> None:
        """A call to the scheduler succeeded (``ok``) or failed (``detail``: why)."""
        with self._lock:
            if ok:
                self._last_ok = self._clock()
                self._failures = 0
            else:
                self._failures += 1
                self._last_error = detail

    def evaluate(self, now: float) -> CheckResult:
        with self._lock:
            silent, failures, error = now - self._last_ok, self._failures, self._last_error
        because = f" (last error: {error})" if error and failures else ""
        if silent > self._grace:
            return CheckResult(
                self.name, Level.UNHEALTHY,
                f"scheduler not reached for {silent:.0f} s (grace {self._grace:g} s){because}",
            )
        if failures:
            return CheckResult(self.name, Level.WARNING, f"{failures} scheduler call(s) failed in a row{because}")
        return CheckResult(self.name, Level.OK)


# ---- disks ---------------------------------------------------------------------------------


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


# ---- sandbox -------------------------------------------------------------------------------


class SandboxCheck:
    """Whether sandboxes can be set up: a ``probe`` every ``interval_seconds``; after a
    failure (the probe's, or an action's reported by :meth:`record_outcome`) the check
    stays UNHEALTHY until a probe passes, tried every ``retry_seconds``.

    Only a probe clears a failure: an action that succeeds while the check is failing may
    have started before the cause appeared. Thread-safe.
    """

    name = "sandbox"

    def __init__(
        self,
        probe: Probe,
        *,
        interval_seconds: float = 300.0,
        retry_seconds: float = 15.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._probe = probe
        self._interval = interval_seconds
        self._retry = retry_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._problem: str | None = None
        self._reported = 0  # action failures recorded so far
        self._last_probe: float | None = None

    def record_outcome(self, outcome: Outcome) -> None:
        """Look at an action's outcome; a sandbox set-up failure fails the check at once."""
        if is_sandbox_setup_failure(outcome):
            with self._lock:
                self._problem = f"an action's sandbox could not be set up: {outcome.status.message[:300]}"
                self._reported += 1

    def evaluate(self, now: float) -> CheckResult:
        with self._lock:
            problem, last, reported = self._problem, self._last_probe, self._reported
        due = last is None or now - last >= (self._retry if problem else self._interval)
        if due:
            try:
                found = self._probe()
            except Exception as error:  # a broken probe says as much about the host
                found = f"the sandbox probe failed: {error!r}"
            with self._lock:
                self._last_probe = now
                # An action that failed while the probe ran is newer evidence than a pass.
                if found is not None or self._reported == reported:
                    self._problem = found
                problem = self._problem
        if problem:
            return CheckResult(self.name, Level.UNHEALTHY, problem)
        return CheckResult(self.name, Level.OK)


# ---- the monitor ---------------------------------------------------------------------------


class HealthMonitor:
    """Evaluates named checks together and keeps the latest :class:`HealthReport`.

    :meth:`check` evaluates every check now (blocking: a check may evict or run a sandbox;
    one call at a time); :meth:`start` does so once and then every ``interval`` seconds on a
    daemon thread until :meth:`close`. :meth:`report` and :meth:`healthy` return the latest
    report without blocking (the first call checks if nothing has yet). Changes of a check's
    level are logged (warning when it gets worse, info when it recovers), not every report.

    Thread-safe. Check names must be unique.
    """

    def __init__(self, checks: Sequence[HealthCheck], *, clock: Clock = time.monotonic) -> None:
        names = [check.name for check in checks]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"health check names must be unique: {names}")
        self._checks = tuple(checks)
        self._clock = clock
        self._check_lock = threading.Lock()  # one evaluation at a time
        self._lock = threading.Lock()  # guards _report
        self._report: HealthReport | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def checks(self) -> tuple[HealthCheck, ...]:
        return self._checks

    # -- facts pushed in by the bot --------------------------------------------------------

    def record_scheduler_contact(self, ok: bool, detail: str = "") -> None:
        """The session loop's call to the scheduler succeeded, or failed with ``detail``."""
        for check in self._checks:
            if isinstance(check, SchedulerCheck):
                check.record_contact(ok, detail)

    def record_outcome(self, outcome: Outcome) -> None:
        """An action's outcome (see :class:`HealthRecordingExecutor`)."""
        for check in self._checks:
            if isinstance(check, SandboxCheck):
                check.record_outcome(outcome)

    # -- evaluation ------------------------------------------------------------------------

    def check(self) -> HealthReport:
        """Evaluate every check now; returns (and keeps) the report."""
        with self._check_lock:
            now = self._clock()
            report = HealthReport(tuple(self._evaluate(check, now) for check in self._checks), now)
            with self._lock:
                previous, self._report = self._report, report
            _log_changes(previous, report)
            return report

    def report(self) -> HealthReport:
        with self._lock:
            report = self._report
        return report if report is not None else self.check()

    def healthy(self) -> tuple[bool, tuple[str, ...]]:
        """Whether to take work, and if not, why (for the bot's status and logs)."""
        report = self.report()
        return report.ok, report.reasons

    @staticmethod
    def _evaluate(check: HealthCheck, now: float) -> CheckResult:
        try:
            return check.evaluate(now)
        except Exception as error:  # a bug in a check must not stop the others
            log.exception("health check %s", check.name)
            return CheckResult(check.name, Level.UNHEALTHY, f"{check.name}: the check itself failed: {error!r}")

    # -- the thread ------------------------------------------------------------------------

    def start(self, interval: float = 5.0) -> HealthMonitor:
        """Check once now, then every ``interval`` seconds on a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("the health monitor is already started")
        self.check()
        self._thread = threading.Thread(target=self._loop, args=(interval,), name="reapi-worker-health", daemon=True)
        self._thread.start()
        return self

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.check()
            except Exception:  # the monitor outlives a bug: the next round may succeed
                log.exception("health monitor round")

    def close(self) -> None:
        """Stop the thread (waits for a check in progress). Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> HealthMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HealthRecordingExecutor:
    """Wraps an executor (same ``execute`` signature) and shows every outcome to the
    monitor, so a sandbox that could not be set up fails the sandbox check at once."""

    def __init__(self, inner: ActionExecutor, monitor: HealthMonitor) -> None:
        self._inner = inner
        self._monitor = monitor

    def execute(
        self, action_digest: Digest, action: re_pb2.Action | None = None, cancel: threading.Event | None = None
    ) -> Outcome:
        outcome = self._inner.execute(action_digest, action, cancel)
        self._monitor.record_outcome(outcome)
        return outcome


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


def _log_changes(previous: HealthReport | None, report: HealthReport) -> None:
    before = {r.name: r.level for r in previous.results} if previous else {}
    for result in report.results:
        was = before.get(result.name, Level.OK)
        if result.level > was:
            log.warning("health: %s is %s: %s", result.name, result.level.name, result.reason)
        elif result.level < was:
            log.info("health: %s is %s again%s", result.name, result.level.name, f": {result.reason}" if result.reason else "")
    if previous is not None and previous.ok != report.ok:
        if report.ok:
            log.info("health: taking work again")
        else:
            log.warning("health: taking no work: %s", "; ".join(report.reasons))
    elif previous is None and not report.ok:
        log.warning("health: taking no work: %s", "; ".join(report.reasons))
