"""The scheduler check: unhealthy when the scheduler has been out of reach too long."""

from __future__ import annotations

import threading
import time

from reapi_worker.protos.errors import InvalidArgument

from .report import CheckResult, Clock, Level


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
