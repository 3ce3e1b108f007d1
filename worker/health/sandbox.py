"""The sandbox check: can a trivial sandbox still be set up?"""

from __future__ import annotations

import threading
import time

from reapi_worker.sandbox.probe import Probe

from ..executor import Outcome, is_sandbox_setup_failure
from .report import CheckResult, Clock, Level


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
