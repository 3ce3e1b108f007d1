"""The monitor (every check evaluated together, on a thread of its own) and the executor
wrapper that shows it every action's outcome."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.storage.digests import Digest

from ..executor import ActionExecutor, Outcome
from .report import CheckResult, Clock, HealthCheck, HealthReport, Level
from .sandbox import SandboxCheck
from .scheduler import SchedulerCheck

log = logging.getLogger("reapi_worker.health")


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
            self.check()

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
