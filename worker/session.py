"""The Remote Workers API session as BuildGrid 0.4.4 speaks it (docs/buildgrid-protocol.md).

This module knows the wire: how a :class:`BotIdentity` becomes the ``BotSession`` the
scheduler reads (properties in ``worker.devices[0]``, capacity in ``worker.configs``), how
a lease is echoed back (ACTIVE while running, COMPLETED with a status and a packed
``ActionResult`` when over, never PENDING or CANCELLED), and what each gRPC failure means
for the session. gRPC errors are translated into :class:`SessionCallError` here and only
here; the loop in :mod:`.bot` decides what to do with them.

Calls are started asynchronously (:meth:`SessionClient.start_update` returns a
:class:`PendingCall`) because the bot must be able to abandon a long-poll: a finished lease
is reported by cancelling the outstanding call and sending a new one (section 5).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from reapi_worker.protos import bots_pb2, bots_pb2_grpc, re_pb2, status_pb2, worker_pb2

#: A deadline short enough that BuildGrid answers at once: it only long-polls when
#: 0.8 x min(deadline, keepalive) is 3 s or more (docs/buildgrid-protocol.md section 5).
SHORT_CALL_DEADLINE = 3.0

#: Status messages with which BuildGrid says "this session is gone, create a new one"
#: (sections 8 and 13): the session expired or was replaced, or a lease sync failed.
_LOST_MARKERS = ("Bot does not exist", "Mismatch between client supplied", "Name in UpdateBotSessionRequest")


class Failure(enum.Enum):
    """What a failed call means for the session."""

    LOST = "lost"  # the session is gone (expired, replaced, closed after DATA_LOSS): create a new one
    INTERRUPTED = "interrupted"  # we cancelled the call ourselves: go on at once
    TIMED_OUT = "timed out"  # the deadline passed; for a long-poll just ask again
    FAILED = "failed"  # the server is unreachable, overloaded or refused: back off and retry


class SessionCallError(Exception):
    """A Bots call that did not return a session. ``kind`` says what to do next; ``code``
    and ``details`` are the gRPC status, for logs."""

    def __init__(self, kind: Failure, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.kind = kind
        self.code = code
        self.details = details


def classify(code: grpc.StatusCode, details: str) -> Failure:
    """The one translation of a Bots call's gRPC status into what it means."""
    if code == grpc.StatusCode.CANCELLED:
        return Failure.INTERRUPTED
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Failure.TIMED_OUT
    # DATA_LOSS: an illegal lease transition (the session is closed and its leases requeued)
    # or "Bot not found to fetch expiry" (closed while we long-polled). NOT_FOUND: a server
    # that forgot the session after a restart.
    if code in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.NOT_FOUND):
        return Failure.LOST
    if code == grpc.StatusCode.INVALID_ARGUMENT and any(marker in details for marker in _LOST_MARKERS):
        return Failure.LOST
    return Failure.FAILED


@dataclass(frozen=True, slots=True)
class BotIdentity:
    """Who the bot says it is. ``properties`` are advertised for matching; ``capacity``
    is how many leases it takes at once."""

    instance_name: str
    bot_id: str
    capacity: int
    properties: tuple[tuple[str, str], ...]

    def worker(self) -> worker_pb2.Worker:
        # BuildGrid reads properties only from devices[0] and capacity only from configs
        # (docs/buildgrid-protocol.md section 4); worker.properties would be ignored.
        device = worker_pb2.Device(handle=self.bot_id)
        for key, value in self.properties:
            device.properties.add(key=key, value=value)
        worker = worker_pb2.Worker(devices=[device])
        worker.configs.add(key="capacity", value=str(self.capacity))
        return worker


@dataclass(frozen=True, slots=True)
class LeaseReport:
    """How a lease ended, as it is sent back: ``status`` is the lease status the scheduler
    hands to the client (OK for any exit code; UNAVAILABLE or INTERNAL requeue the job)."""

    lease_id: str
    status: status_pb2.Status
    result: re_pb2.ActionResult

    @property
    def requeues(self) -> bool:
        return self.status.code in (grpc.StatusCode.UNAVAILABLE.value[0], grpc.StatusCode.INTERNAL.value[0])


def session_to_send(
    last: bots_pb2.BotSession,
    identity: BotIdentity,
    status: bots_pb2.BotStatus.ValueType,
    reports: dict[str, LeaseReport],
) -> bots_pb2.BotSession:
    """The BotSession for the next UpdateBotSession: the last response (so ``name`` and
    ``version`` are echoed, without which the scheduler never long-polls), our status and
    worker, and every lease it gave us: COMPLETED with its report when one is in
    ``reports``, else ACTIVE."""
    session = bots_pb2.BotSession()
    session.CopyFrom(last)
    session.bot_id = identity.bot_id
    session.status = status
    session.worker.CopyFrom(identity.worker())
    del session.leases[:]
    for lease in last.leases:
        out = session.leases.add()
        out.CopyFrom(lease)
        out.ClearField("status")
        out.ClearField("result")
        report = reports.get(lease.id)
        if report is None:
            out.state = bots_pb2.ACTIVE
        else:
            out.state = bots_pb2.COMPLETED
            out.status.CopyFrom(report.status)
            out.result.Pack(report.result)  # must be an ActionResult, or the client gets an empty one
    return session


class PendingCall:
    """An UpdateBotSession in flight. :meth:`cancel` abandons it (the scheduler does no
    lease sync for a cancelled call); :meth:`result` returns the session or raises
    :class:`SessionCallError`. ``on_done`` callbacks run on a gRPC thread."""

    def __init__(self, future: Any) -> None:
        self._future = future

    def done(self) -> bool:
        return bool(self._future.done())

    def cancel(self) -> None:
        self._future.cancel()

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        self._future.add_done_callback(lambda _future: callback())

    def result(self) -> bots_pb2.BotSession:
        try:
            return self._future.result()
        except grpc.FutureCancelledError:
            raise SessionCallError(Failure.INTERRUPTED, grpc.StatusCode.CANCELLED, "cancelled by the bot") from None
        except grpc.RpcError as error:
            raise _translate(error) from None


class SessionClient:
    """Bots calls for one identity. Thread-safe (it holds no state but the stub).

    ``stub`` is a ``BotsStub`` (or anything with the same two methods); the caller owns
    its channel.
    """

    def __init__(self, stub: bots_pb2_grpc.BotsStub, identity: BotIdentity) -> None:
        self._stub = stub
        self.identity = identity

    def create(self, deadline: float = SHORT_CALL_DEADLINE, status: bots_pb2.BotStatus.ValueType = bots_pb2.OK) -> bots_pb2.BotSession:
        """CreateBotSession with ``status``. The default deadline keeps the scheduler from
        long-polling it, so a bot that has to recreate its session while actions run is
        not blocked for seconds. The response may already carry leases."""
        session = bots_pb2.BotSession(
            bot_id=self.identity.bot_id, status=status, worker=self.identity.worker()
        )
        request = bots_pb2.CreateBotSessionRequest(parent=self.identity.instance_name, bot_session=session)
        try:
            return self._stub.CreateBotSession(request, timeout=deadline)
        except grpc.RpcError as error:
            raise _translate(error) from None

    def start_update(self, session: bots_pb2.BotSession, deadline: float) -> PendingCall:
        """Send UpdateBotSession without waiting for it."""
        request = bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session)
        return PendingCall(self._stub.UpdateBotSession.future(request, timeout=deadline))

    def update(self, session: bots_pb2.BotSession, deadline: float) -> bots_pb2.BotSession:
        return self.start_update(session, deadline).result()


class Wakeup:
    """A flag that many threads set and the session loop waits on, also while a call is
    in flight. It has ``threading.Event``'s ``set``/``clear``/``is_set``/``wait``.

    Why not an Event: a call's completion must end a wait too, and gRPC may run a
    cancelled call's done-callback late, on its own thread. Had that callback set the
    shared flag, it would cut short the *next* call's wait; here it only prompts waiters to
    look again (:meth:`wait_for_call` checks the call it was given).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._flag = False

    def set(self) -> None:
        with self._cond:
            self._flag = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._flag = False

    def is_set(self) -> bool:
        with self._cond:
            return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._flag, timeout)

    def wait_for_call(self, call: "PendingCall", interruptible: bool = True) -> bots_pb2.BotSession:
        """The result of ``call``. If ``interruptible`` and the flag is set first, the call is
        cancelled and SessionCallError(INTERRUPTED) raised."""
        call.add_done_callback(self._poke)
        with self._cond:
            self._cond.wait_for(lambda: call.done() or (interruptible and self._flag))
        if not call.done():
            call.cancel()
        return call.result()

    def _poke(self) -> None:
        with self._cond:
            self._cond.notify_all()


def _translate(error: grpc.RpcError) -> SessionCallError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    return SessionCallError(classify(code, details), code, details)
