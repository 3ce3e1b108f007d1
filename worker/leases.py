"""Running leases: each lease's Action on a thread of its own, at most N at once.

A lease goes WAITING (accepted, no free slot yet) -> RUNNING (in the executor) -> over.
How it ends decides what the scheduler is told (:class:`~.session.LeaseReport`):

* finished: the executor's status and ActionResult (OK for any exit code);
* vanished from the session (cancelled by a client, or given to another bot):
  :meth:`LeaseRunner.cancel` kills it and its report is dropped: nothing is sent;
* handed back before it started (shutdown): UNAVAILABLE, so the job is requeued;
* aborted while running (second signal, or the grace period ran out): killed, then
  reported UNAVAILABLE so the job is requeued rather than failed;
* a payload that is neither an Action nor a Digest: INVALID_ARGUMENT at once.

The executor (:class:`~.executor.ActionExecutor`) never raises by contract; if it does anyway (a bug), the lease is reported
INTERNAL (requeued by the scheduler) and the bot goes on.

Thread-safety: every public method may be called from any thread; ``on_change`` is called
(from lease threads) whenever a report becomes ready, and must only signal, not block.
Lease threads are not daemons: the sandbox ties an action's life to the thread that runs it,
so the process waits for them; :meth:`join` is how the bot does so deliberately.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable

from reapi_worker.protos import bots_pb2, code_pb2, re_pb2, status_pb2
from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.storage.digests import Digest

from .executor import ActionExecutor, Outcome
from .session import LeaseReport

log = logging.getLogger("reapi_worker.lease")


class Ending(enum.Enum):
    """Why a lease stops being ours, when it is not simply finishing."""

    VANISHED = "cancelled"  # gone from the session: drop the result
    HANDED_BACK = "handed back"  # never started: UNAVAILABLE
    ABORTED = "aborted"  # killed at shutdown: UNAVAILABLE


@dataclasses.dataclass(slots=True)
class _Run:
    """One lease's bookkeeping; mutated only under the runner's lock."""

    lease_id: str
    action_digest: Digest | None
    action: re_pb2.Action | None
    accepted: float
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    running: bool = False
    ending: Ending | None = None


def parse_payload(lease: bots_pb2.Lease) -> tuple[Digest, re_pb2.Action | None]:
    """The Action digest and, when the payload carries it, the Action itself.

    BuildGrid 0.4.4 sends the full Action; jobs stored without it carry its Digest
    (docs/buildgrid-protocol.md section 6). Raises InvalidArgument for anything else."""
    payload = lease.payload
    if payload.Is(re_pb2.Action.DESCRIPTOR):
        action = re_pb2.Action()
        payload.Unpack(action)
        return Digest.of_message(action), action
    if payload.Is(re_pb2.Digest.DESCRIPTOR):
        digest = re_pb2.Digest()
        payload.Unpack(digest)
        return Digest.from_proto(digest), None
    raise InvalidArgument(f"lease payload is {payload.type_url or 'empty'}, expected an Action or a Digest")


def unavailable(lease_id: str, why: str) -> LeaseReport:
    """A report that hands the lease back to the scheduler to be requeued."""
    return LeaseReport(lease_id, status_pb2.Status(code=code_pb2.UNAVAILABLE, message=why), re_pb2.ActionResult())


class LeaseRunner:
    """Runs accepted leases through ``executor``, ``concurrency`` at a time."""

    def __init__(
        self,
        executor: ActionExecutor,
        concurrency: int,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if concurrency < 1:
            raise InvalidArgument(f"concurrency must be at least 1, not {concurrency}")
        self._executor = executor
        self._concurrency = concurrency
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Condition()
        self._runs: dict[str, _Run] = {}
        self._reports: dict[str, LeaseReport] = {}
        self._threads: set[threading.Thread] = set()
        self._running = 0

    # -- queries ------------------------------------------------------------------------

    def active(self) -> set[str]:
        """Leases accepted and not over (waiting or running, not cancelled or handed back)."""
        with self._lock:
            return {lease_id for lease_id, run in self._runs.items() if run.ending is None}

    def has(self, lease_id: str) -> bool:
        with self._lock:
            run = self._runs.get(lease_id)
            return run is not None and run.ending is None

    def has_reports(self) -> bool:
        with self._lock:
            return bool(self._reports)

    def running_count(self) -> int:
        with self._lock:
            return self._running

    # -- commands -----------------------------------------------------------------------

    def start(self, lease: bots_pb2.Lease) -> None:
        """Accept ``lease``: it runs as soon as a slot is free. A lease id already active is
        ignored (a requeued job comes back under the same id while we may still run it)."""
        try:
            digest, action = parse_payload(lease)
        except InvalidArgument as error:
            self._report(LeaseReport(lease.id, error.to_status(), re_pb2.ActionResult()))
            log.warning("lease %s refused: %s", lease.id, error, extra={"fields": {"lease": lease.id}})
            return
        with self._lock:
            if lease.id in self._runs and self._runs[lease.id].ending is None:
                return
            run = _Run(lease.id, digest, action, self._clock())
            self._runs[lease.id] = run
            thread = threading.Thread(target=self._run, args=(run,), name=f"lease-{lease.id[:8]}")
            self._threads.add(thread)
        thread.start()

    def cancel(self, lease_id: str) -> None:
        """The lease vanished from the session: kill it, report nothing. Idempotent."""
        with self._lock:
            run = self._runs.get(lease_id)
            if run is not None and run.ending is None:
                run.ending = Ending.VANISHED
                run.cancel.set()
                self._lock.notify_all()
            self._reports.pop(lease_id, None)

    def hand_back_waiting(self) -> list[str]:
        """Give back every lease that has not started; their UNAVAILABLE reports follow."""
        with self._lock:
            waiting = [run for run in self._runs.values() if run.ending is None and not run.running]
            for run in waiting:
                run.ending = Ending.HANDED_BACK
                run.cancel.set()
            self._lock.notify_all()
        return [run.lease_id for run in waiting]

    def abort_running(self) -> list[str]:
        """Kill every running lease; each is then reported UNAVAILABLE (requeued)."""
        with self._lock:
            running = [run for run in self._runs.values() if run.ending is None]
            for run in running:
                run.ending = Ending.ABORTED if run.running else Ending.HANDED_BACK
                run.cancel.set()
            self._lock.notify_all()
        return [run.lease_id for run in running]

    def take_reports(self) -> dict[str, LeaseReport]:
        """Reports ready to send, removed from the runner."""
        with self._lock:
            reports, self._reports = self._reports, {}
            return reports

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every lease thread to end; True if they all did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                threads = [t for t in self._threads if t.is_alive()]
            if not threads:
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            threads[0].join(remaining)

    # -- one lease ----------------------------------------------------------------------

    def _run(self, run: _Run) -> None:
        try:
            if not self._acquire_slot(run):
                self._finish(run, None, started=None)
                return
            started = self._clock()
            try:
                outcome = self._execute(run)
            finally:
                with self._lock:
                    self._running -= 1
                    run.running = False
                    self._lock.notify_all()
            self._finish(run, outcome, started)
        except BaseException:  # never lose a lease silently, even to a bug here
            log.exception("lease %s: runner failure", run.lease_id)
            self._report(LeaseReport(run.lease_id, status_pb2.Status(code=code_pb2.INTERNAL, message="worker failure"),
                                     re_pb2.ActionResult()))
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _acquire_slot(self, run: _Run) -> bool:
        with self._lock:
            while run.ending is None and self._running >= self._concurrency:
                self._lock.wait()
            if run.ending is not None:
                return False
            self._running += 1
            run.running = True
            return True

    def _execute(self, run: _Run) -> Outcome:
        assert run.action_digest is not None
        try:
            return self._executor.execute(run.action_digest, run.action, run.cancel)
        except Exception as error:  # the executor's contract says never; a bug costs one lease
            log.exception("lease %s: executor raised", run.lease_id)
            return Outcome(
                status=status_pb2.Status(code=code_pb2.INTERNAL, message=f"executor failure: {error!r}"),
                result=re_pb2.ActionResult(),
            )

    def _finish(self, run: _Run, outcome: Outcome | None, started: float | None) -> None:
        now = self._clock()
        with self._lock:
            ending = run.ending
            if self._runs.get(run.lease_id) is run:
                del self._runs[run.lease_id]
        if ending is Ending.VANISHED:
            report = None
        elif ending is not None:
            report = unavailable(run.lease_id, f"worker shutting down: lease {ending.value}")
        else:
            assert outcome is not None
            report = LeaseReport(run.lease_id, outcome.status, outcome.result)
        _log_lease(run, outcome, ending, started, now)
        if report is not None:
            self._report(report)

    def _report(self, report: LeaseReport) -> None:
        with self._lock:
            self._reports[report.lease_id] = report
        self._on_change()


def _log_lease(run: _Run, outcome: Outcome | None, ending: Ending | None, started: float | None, now: float) -> None:
    """One line per lease: what it ran, how it ended, how long each phase took."""
    fields: dict[str, object] = {
        "lease": run.lease_id,
        "action": str(run.action_digest),
        "outcome": ending.value if ending is not None else "completed",
        "wait_s": round((started if started is not None else now) - run.accepted, 4),
        "total_s": round(now - run.accepted, 4),
    }
    if outcome is not None:
        fields["status"] = code_pb2.Code.Name(outcome.status.code)
        fields["exit_code"] = outcome.result.exit_code
        for phase, seconds in outcome.phases.items():
            fields[f"{phase}_s"] = round(seconds, 4)
        if outcome.status.code != code_pb2.OK:
            fields["message"] = outcome.status.message[:300]
    log.info("lease %s", fields["outcome"], extra={"fields": fields})
