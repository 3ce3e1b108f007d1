"""The sandbox check: can a trivial sandbox still be set up?"""

from __future__ import annotations

import threading
import time

from reapi_worker.sandbox.probe import Probe

from ..executor import Outcome, is_sandbox_setup_failure
from .report import CheckResult, Clock, Level


class SandboxCheck:
    """Whether sandboxes can be set up: a ``probe`` every ``interval_seconds``, and at the
    next evaluation after an action's sandbox could not be set up (:meth:`record_outcome`);
    after a probe failed the check stays UNHEALTHY until a probe passes, tried every
    ``retry_seconds``.

    Only the probe decides, both ways: an action's set-up failure may be the action's own
    doing (its input root), and one such action must not bench every worker it reaches; an
    action that succeeds while the check is failing may have started before the cause
    appeared. Thread-safe.
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
        self._probe_now = False  # an action's sandbox failed since the last probe
        self._last_probe: float | None = None

    def record_outcome(self, outcome: Outcome) -> None:
        """Look at an action's outcome; after a sandbox set-up failure, probe at once."""
        if is_sandbox_setup_failure(outcome):
            with self._lock:
                self._probe_now = True

    def evaluate(self, now: float) -> CheckResult:
        with self._lock:
            problem, last = self._problem, self._last_probe
            due = self._probe_now or last is None or now - last >= (self._retry if problem else self._interval)
            self._probe_now = False
        if due:
            try:
                found = self._probe()
            except Exception as error:  # a broken probe says as much about the host
                found = f"the sandbox probe failed: {error!r}"
            with self._lock:
                self._last_probe = now
                self._problem = problem = found
        if problem:
            return CheckResult(self.name, Level.UNHEALTHY, problem)
        return CheckResult(self.name, Level.OK)
