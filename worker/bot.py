"""The bot: one session with the scheduler, up to N leases at once (``reapi-worker bot``).

One thread (the caller of :meth:`Bot.run`) owns the session; leases run on threads of a
:class:`~.leases.LeaseRunner`. The loop, each turn:

1. gathers what changed: finished leases, stop requests;
2. sends ``UpdateBotSession`` with every lease it holds (ACTIVE, or COMPLETED with its
   report) and the echoed ``version``;
3. compares the answer with what it sent: a reported lease that is gone was accepted; a
   running lease that is gone was cancelled (killed, nothing reported); a new lease is
   started (or handed back while shutting down);
4. paces itself.

Pacing, and why (docs/buildgrid-protocol.md section 5):

* idle: a long-poll (deadline ``poll_deadline_seconds``): the scheduler holds the call
  until it has work or 0.8 x keepalive passes, so an idle bot makes one call every ~8 s;
* busy (any lease running or waiting): a short call (which the scheduler answers at once)
  every ``heartbeat_seconds``: the only way to learn of a cancellation, which is not pushed
  but shows as the lease vanishing from the session, within about a second. A long-poll
  cannot do this: the scheduler does not hold a call for less than 3 s;
* a lease that finishes, or a signal, cuts any wait short and cancels the call in flight
  client-side, so the result is reported at once instead of after the long-poll;
* a long-poll that comes back at once with nothing new (a scheduler that does not hold
  calls) is followed by a heartbeat wait: the bot never spins;
* failures: capped exponential backoff with jitter; a lost session (expired, replaced,
  closed) is created anew, and running leases go on. A result the new session does not
  want is kept for a while, and reported if the scheduler hands the same lease (same id)
  back to this bot.

Shutdown (:meth:`Bot.request_stop`): the first request hands back leases that have not
started, reports status BOT_TERMINATING (the scheduler then assigns nothing more but still
takes results) while running leases finish within ``shutdown_grace_seconds``; a second
request, or the end of the grace period, kills them and reports them UNAVAILABLE so the
scheduler requeues them. :meth:`Bot.run` returns 0 once everything is reported, 1 if the
scheduler could not be told within ``final_report_seconds`` after that.

Health (:class:`BotHealth`, e.g. :class:`~.health.HealthMonitor`): read every turn; while
it says no, the bot reports status UNHEALTHY, so the scheduler assigns it nothing, and
hands back at once any lease that still arrives. The scheduler answers such a bot without
long-polling (docs/buildgrid-protocol.md section 4), so it heartbeats instead. Every call's success or
failure is shown to the health object, which is how "the scheduler is out of reach"
becomes a reason. Lease and session events go to :class:`BotEvents` (the metrics).
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from reapi_worker.protos import bots_pb2, code_pb2
from reapi_worker.storage.retry import RetryPolicy

from .executor import ActionExecutor
from .leases import LeaseRunner, unavailable
from .session import (
    SHORT_CALL_DEADLINE,
    Failure,
    LeaseReport,
    SessionCallError,
    SessionClient,
    Wakeup,
    session_to_send,
)

log = logging.getLogger("reapi_worker.bot")

#: ``wait(wakeup, timeout)``: block until ``wakeup`` is set or ``timeout`` seconds pass;
#: returns whether it was set. Tests pass one that records or fakes the time instead.
Wait = Callable[[Wakeup, float], bool]


def _wait(event: Wakeup, timeout: float) -> bool:
    return event.wait(timeout)


class BotHealth(Protocol):
    """Whether the bot may take work. ``healthy`` must not block (it is read every turn)."""

    def healthy(self) -> tuple[bool, tuple[str, ...]]: ...

    def record_scheduler_contact(self, ok: bool, detail: str = "") -> None: ...


class BotEvents(Protocol):
    """What the session loop counts (``WorkerMetrics`` is one). Leases that reach the
    executor are counted by whoever wraps it; these are the rest."""

    def record_lease_received(self) -> None: ...

    def record_lease_finished(self, code: int) -> None: ...

    def record_session_reconnect(self) -> None: ...


class _AlwaysHealthy:
    def healthy(self) -> tuple[bool, tuple[str, ...]]:
        return True, ()

    def record_scheduler_contact(self, ok: bool, detail: str = "") -> None:
        pass


class _NoEvents:
    def record_lease_received(self) -> None:
        pass

    def record_lease_finished(self, code: int) -> None:
        pass

    def record_session_reconnect(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class BotConfig:
    """How the session loop paces itself; see the module docstring.

    ``backoff``: waits between failed attempts (its ``max_attempts`` is not used: the bot
    retries for ever). ``min_poll_seconds``: a long-poll answered faster than this with
    nothing new counts as "the scheduler did not hold it". ``remembered_results``: how
    many unreported results of lost sessions are kept for re-assignment.
    """

    heartbeat_seconds: float = 1.0
    poll_deadline_seconds: float = 30.0
    call_deadline_seconds: float = SHORT_CALL_DEADLINE
    backoff: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(initial_backoff=0.25, max_backoff=5.0, multiplier=2.0, jitter=0.2)
    )
    shutdown_grace_seconds: float = 60.0
    final_report_seconds: float = 15.0
    min_poll_seconds: float = 1.0
    remembered_results: int = 256


class Bot:
    """Runs the session loop until stopped. ``run`` is meant for the main thread (signal
    handlers call :meth:`request_stop`); every other method is thread-safe.

    The bot owns its :class:`LeaseRunner` and waits for its threads before ``run``
    returns; the channel behind ``session`` and the executor belong to the caller.
    """

    def __init__(
        self,
        session: SessionClient,
        executor: ActionExecutor,
        config: BotConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wait: Wait = _wait,
        rng: random.Random | None = None,
        health: BotHealth | None = None,
        events: BotEvents | None = None,
    ) -> None:
        self._client = session
        self._health: BotHealth = health or _AlwaysHealthy()
        self._events: BotEvents = events or _NoEvents()
        self._unhealthy_reasons: tuple[str, ...] = ()
        self._identity = session.identity
        self._config = config or BotConfig()
        self._clock = clock
        self._wait = wait
        self._rng = rng or random.Random()
        self._wake = Wakeup()
        self._runner = LeaseRunner(executor, self._identity.capacity, on_change=self._wake.set, clock=clock)
        self._session: bots_pb2.BotSession | None = None
        self._reports: dict[str, LeaseReport] = {}  # sent as COMPLETED until the scheduler drops the lease
        self._remembered: collections.OrderedDict[str, LeaseReport] = collections.OrderedDict()
        self._failures = 0
        self._stop_lock = threading.Lock()
        self._stop_requests = 0
        self._stop_applied = 0
        self._draining = False
        self._aborted = False
        self._terminated = False
        self._drain_deadline = 0.0
        self._hard_deadline = 0.0
        self.sessions_created = 0  # for tests and logs

    # -- control -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: drain. Second call: abort running leases. Thread-safe; from a signal
        handler, call it on a fresh thread (it takes locks the interrupted code may hold)."""
        with self._stop_lock:
            self._stop_requests += 1
        self._wake.set()

    @property
    def runner(self) -> LeaseRunner:
        return self._runner

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        """Serve leases until stopped; returns the process exit code."""
        identity = self._identity
        log.info(
            "bot %s starting: instance %r, capacity %d, properties %s",
            identity.bot_id, identity.instance_name, identity.capacity,
            ",".join(f"{k}={v}" for k, v in identity.properties),
        )
        code = 0
        try:
            while True:
                self._wake.clear()
                self._apply_stop()
                self._collect()
                if self._draining:
                    if self._drained():
                        break
                    if self._clock() >= self._hard_deadline:
                        log.error("shutdown: could not report everything to the scheduler in time; exiting")
                        self._runner.abort_running()
                        code = 1
                        break
                    if self._session is None:
                        # A lost session wants none of our results: wait for the runs to end.
                        self._wait(self._wake, self._config.heartbeat_seconds)
                        continue
                if self._session is None:
                    self._create()
                else:
                    self._update()
        finally:
            self._runner.join()
        log.info("bot %s stopped", identity.bot_id)
        return code

    def _drained(self) -> bool:
        if self._runner.active() or self._runner.has_reports() or self._reports:
            return False
        # Nothing left to report: BOT_TERMINATING is a courtesy (the session would expire
        # anyway), so one failed attempt at it is enough; an unreachable scheduler must not
        # hold an idle worker's exit for the whole grace period.
        return self._session is None or self._terminated or self._failures > 0

    def _apply_stop(self) -> None:
        with self._stop_lock:
            requests = self._stop_requests
        if requests == self._stop_applied and not (self._draining and not self._aborted):
            return
        self._stop_applied = requests
        now = self._clock()
        if requests >= 1 and not self._draining:
            self._draining = True
            self._drain_deadline = now + self._config.shutdown_grace_seconds
            self._hard_deadline = self._drain_deadline + self._config.final_report_seconds
            handed = self._runner.hand_back_waiting()
            for _ in handed:
                self._events.record_lease_finished(code_pb2.UNAVAILABLE)
            log.info(
                "shutting down: %d lease(s) running, %d handed back; grace %.0f s",
                self._runner.running_count(), len(handed), self._config.shutdown_grace_seconds,
            )
        if self._draining and not self._aborted and (requests >= 2 or now >= self._drain_deadline):
            self._aborted = True
            aborted = self._runner.abort_running()
            self._hard_deadline = min(self._hard_deadline, now + self._config.final_report_seconds)
            why = "second stop request" if requests >= 2 else "grace period over"
            log.warning("%s: aborting %d running lease(s); they are handed back", why, len(aborted))

    def _collect(self) -> None:
        self._reports.update(self._runner.take_reports())

    def _create(self) -> None:
        try:
            session = self._client.create(self._config.call_deadline_seconds, self._status())
        except SessionCallError as error:
            self._failed("CreateBotSession", error)
            return
        self._health.record_scheduler_contact(True)
        self.sessions_created += 1
        if self.sessions_created > 1:
            self._events.record_session_reconnect()
        log.info("session %s created (bot %s)", session.name, self._identity.bot_id)
        self._take_new_leases(set(), session)
        self._session = session

    def _update(self) -> None:
        assert self._session is not None
        status = self._status()
        self._forget_orphans()
        request = session_to_send(self._session, self._identity, status, self._reports)
        # Only an OK bot is held by the scheduler; any other status is answered at once.
        long_poll = status == bots_pb2.OK and not self._reports and not self._runner.active()
        deadline = self._config.poll_deadline_seconds if long_poll else self._config.call_deadline_seconds
        # A call carrying results is short and is never abandoned: the scheduler may have
        # taken them already, and a resent UNAVAILABLE/INTERNAL for a lease requeued to us
        # in between would requeue it once more.
        interruptible = not any(lease.state == bots_pb2.COMPLETED for lease in request.leases)
        started = self._clock()
        try:
            call = self._client.start_update(request, deadline)
            response = self._wake.wait_for_call(call, interruptible)
        except SessionCallError as error:
            elapsed = self._clock() - started
            log.debug("UpdateBotSession (%s, %.1f s): %s after %.3f s", _states(request), deadline, error, elapsed)
            if error.kind is Failure.INTERRUPTED:
                return  # woken by a finished lease or a signal: go round at once
            if error.kind is Failure.TIMED_OUT and long_poll and elapsed >= self._config.min_poll_seconds:
                # The scheduler answers a long-poll well inside its deadline (0.8 x the
                # shorter of it and its keepalive), so one that runs out was not answered:
                # the scheduler is out of reach. Ask again at once, and tell health.
                self._health.record_scheduler_contact(False, str(error))
                log.info("idle long-poll got no answer in %.0f s; asking again", elapsed)
                return
            self._health.record_scheduler_contact(False, str(error))
            if error.kind is Failure.LOST:
                self._lose_session(error)
                return
            self._failed("UpdateBotSession", error)
            return
        self._health.record_scheduler_contact(True)
        self._failures = 0
        log.debug("UpdateBotSession (%s, %.1f s) -> %s", _states(request), deadline, _states(response))
        news = self._reconcile(request, response)
        self._session = response
        self._terminated = status == bots_pb2.BOT_TERMINATING and not response.leases
        self._pace(long_poll, self._clock() - started, news)

    # -- lease bookkeeping ----------------------------------------------------------------

    def _reconcile(self, sent: bots_pb2.BotSession, got: bots_pb2.BotSession) -> bool:
        """Apply the scheduler's answer; returns whether it carried new leases."""
        kept = {lease.id for lease in got.leases}
        running = set()
        for lease in sent.leases:
            if lease.state == bots_pb2.COMPLETED:
                # A successful Update takes every completion it carries. If the same id is in
                # the answer, the job was requeued (UNAVAILABLE, INTERNAL) and handed back to
                # us: a new assignment, not a refusal of the report.
                self._reports.pop(lease.id, None)
                continue
            running.add(lease.id)
            if lease.id not in kept:
                # Cancelled by a client, or given to another bot: kill it, report nothing.
                log.info("lease %s left the session: cancelling it", lease.id, extra={"fields": {"lease": lease.id}})
                self._runner.cancel(lease.id)
                self._reports.pop(lease.id, None)
        return self._take_new_leases(running, got)

    def _take_new_leases(self, known: set[str], got: bots_pb2.BotSession) -> bool:
        if any(lease.id not in known for lease in got.leases):
            # Health may have changed while the call was out (an idle long-poll lasts
            # seconds): decide on new leases by the health of now, not of the request.
            self._status()
        news = False
        for lease in got.leases:
            if lease.id in known:
                continue
            news = True
            self._events.record_lease_received()
            refusal = "worker shutting down" if self._draining else self._unhealthy_refusal()
            if refusal:
                self._reports[lease.id] = unavailable(lease.id, refusal)
                self._events.record_lease_finished(code_pb2.UNAVAILABLE)
                log.info("lease %s handed back: %s", lease.id, refusal, extra={"fields": {"lease": lease.id}})
            elif lease.id in self._remembered:
                log.info("lease %s came back: reporting the result kept from a lost session", lease.id)
                self._reports[lease.id] = self._remembered.pop(lease.id)
            elif lease.id in self._reports and not self._reports[lease.id].requeues:
                # Finished after its session was lost and before this one was created:
                # the result is here, unsent; it goes out with the next call.
                log.info("lease %s came back: reporting the result that finished between sessions", lease.id)
            elif self._runner.has(lease.id):
                log.info("lease %s came back while still running here: carrying on", lease.id)
            else:
                self._reports.pop(lease.id, None)  # an unsent hand-back of it: run it instead
                self._runner.start(lease)
        return news

    def _forget_orphans(self) -> None:
        """Reports for leases the current session does not hold (their session was lost)
        cannot be sent; keep them in case the scheduler gives the lease back to us."""
        assert self._session is not None
        held = {lease.id for lease in self._session.leases}
        for lease_id in [i for i in self._reports if i not in held]:
            self._remember(self._reports.pop(lease_id))

    def _remember(self, report: LeaseReport) -> None:
        if report.requeues:
            return  # a hand-back or an internal error: worth nothing if the lease returns
        self._remembered[report.lease_id] = report
        while len(self._remembered) > self._config.remembered_results:
            self._remembered.popitem(last=False)

    def _lose_session(self, error: SessionCallError) -> None:
        assert self._session is not None
        log.warning(
            "session %s lost (%s); creating a new one, %d running lease(s) go on",
            self._session.name, error, len(self._runner.active()),
        )
        for report in self._reports.values():
            self._remember(report)
        self._reports.clear()
        self._session = None
        self._failures += 1
        if self._failures > 1:  # lost again right after a new session: do not loop hot
            self._backoff()

    # -- pacing ---------------------------------------------------------------------------

    def _pace(self, long_poll: bool, elapsed: float, news: bool) -> None:
        # The call's own completion set the wake event; clear it, then look for anything
        # that arrived meanwhile, so that nothing set after this point is missed.
        self._wake.clear()
        if self._runner.has_reports() or self._stop_pending() or (self._draining and self._drained()):
            return
        idle_next = (
            not self._draining and not self._unhealthy_reasons and not self._reports and not self._runner.active()
        )
        if idle_next and not (long_poll and elapsed < self._config.min_poll_seconds and not news):
            return  # the next call is a long-poll, and the scheduler paces it
        self._wait(self._wake, self._config.heartbeat_seconds)

    def _status(self) -> bots_pb2.BotStatus.ValueType:
        """The status to report now; logs when health changes it."""
        if self._draining:
            return bots_pb2.BOT_TERMINATING
        ok, reasons = self._health.healthy()
        reasons = () if ok else (reasons or ("unhealthy",))
        if reasons != self._unhealthy_reasons:
            if reasons:
                log.warning("reporting UNHEALTHY, taking no work: %s", "; ".join(reasons))
            else:
                log.info("healthy again: taking work")
            self._unhealthy_reasons = reasons
        return bots_pb2.UNHEALTHY if reasons else bots_pb2.OK

    def _unhealthy_refusal(self) -> str | None:
        """Why a lease that arrives now must be handed back (the scheduler assigned it
        before it saw our UNHEALTHY), or None."""
        if not self._unhealthy_reasons:
            return None
        return "worker unhealthy: " + "; ".join(self._unhealthy_reasons)

    def _stop_pending(self) -> bool:
        with self._stop_lock:
            return self._stop_requests != self._stop_applied

    def _failed(self, what: str, error: SessionCallError) -> None:
        self._failures += 1
        log.warning("%s failed (%s); attempt %d", what, error, self._failures)
        self._backoff()

    def _backoff(self) -> None:
        delay = self._config.backoff.backoff(self._failures, self._rng)
        # Whatever set the wake event so far was the failed call; from here on only a new
        # finished lease or a signal cuts the wait short.
        self._wake.clear()
        if self._runner.has_reports() or self._stop_pending():
            delay = min(delay, self._config.heartbeat_seconds)
        self._wait(self._wake, delay)


def _states(session: bots_pb2.BotSession) -> str:
    """``status; lease-id:STATE ...`` for debug logs."""
    leases = " ".join(f"{lease.id[:8]}:{bots_pb2.LeaseState.Name(lease.state)}" for lease in session.leases)
    return f"{bots_pb2.BotStatus.Name(session.status)} v{session.version} [{leases}]"
