"""A fake Remote Workers Bots service: a real ``grpc.server`` on loopback that behaves like
BuildGrid 0.4.4 on the points of docs/buildgrid-protocol.md a bot depends on.

* CreateBotSession: ``bot_id`` required; a new session for a bot_id closes the old one and
  requeues its leases; the name is ``"{parent}/{uuid}"``.
* UpdateBotSession: unknown name -> INVALID_ARGUMENT "Bot does not exist while validating
  leases"; a lease sent back COMPLETED is recorded (``results``) and dropped; PENDING or
  CANCELLED -> DATA_LOSS, the session is closed and its leases requeued (stricter than
  BuildGrid, which checks only on a full sync: a bot must never send them).
* Long-poll: a call blocks only if the bot is OK, holds fewer leases than its capacity
  (``worker.configs["capacity"]``, default 1) and echoed the current ``version``; it returns
  when a job is assigned or after ``0.8 x min(deadline left, keepalive)``; not at all when
  that is under ``min_hold``. Every change of a session's leases bumps its version.
* Jobs (:meth:`queue`) go to bots whose ``devices[0].properties`` hold every property the
  job asks for. :meth:`cancel` makes a lease vanish from its session (as BuildGrid does);
  :meth:`expire` deletes a session as the reaper would, requeueing its leases (same id).
* A completion with status INTERNAL or UNAVAILABLE requeues the job (same id), up to
  ``max_attempts``; then the job completes with that status.
* With ``reap=True`` a session not heard from for ``keepalive`` seconds is deleted and its
  leases requeued (``reaped`` counts them). ``stale_versions`` counts Updates that did not
  echo the version of the session's last answer.
* :meth:`fail` makes the next calls of a method abort with given codes; :meth:`force_assign`
  gives a bot a lease whatever its status (an assignment that raced a status change).

It records every call (``calls``: method, monotonic time, the request) so tests assert on
what the bot sent and how often. Thread-safe.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
import uuid

import grpc
from google.protobuf.any_pb2 import Any

from reapi_worker.protos import bots_pb2, bots_pb2_grpc, code_pb2, re_pb2, status_pb2

UNAVAILABLE = code_pb2.UNAVAILABLE
INTERNAL = code_pb2.INTERNAL


@dataclasses.dataclass
class Job:
    lease_id: str
    payload: Any
    properties: dict[str, str]
    attempts: int = 0


@dataclasses.dataclass
class Session:
    name: str
    bot_id: str
    capacity: int
    properties: set[tuple[str, str]]
    status: int
    leases: dict[str, Job] = dataclasses.field(default_factory=dict)
    version: int = 1
    answered_version: int = 1
    last_contact: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass(frozen=True)
class Call:
    method: str
    time: float
    request: object


class FakeBotsServer:
    """Start with :meth:`start` (or ``with``); ``address`` is ``HOST:PORT``."""

    def __init__(self, keepalive: float = 1.0, min_hold: float = 0.0, reap: bool = False, max_attempts: int = 5) -> None:
        self.keepalive = keepalive
        self.min_hold = min_hold
        self.max_attempts = max_attempts
        self.reaped = 0
        self.stale_versions = 0
        self._reap = reap
        self._stopped = threading.Event()
        self.calls: list[Call] = []
        self.results: dict[str, tuple[status_pb2.Status, re_pb2.ActionResult]] = {}
        self.sessions: dict[str, Session] = {}
        self._queue: list[Job] = []
        self._faults: dict[str, list[grpc.StatusCode]] = {}
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None
        self.address = ""

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, address: str = "127.0.0.1:0") -> str:
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=32))
        bots_pb2_grpc.add_BotsServicer_to_server(_Servicer(self), server)
        port = server.add_insecure_port(address)
        server.start()
        self._server = server
        if self._reap:
            threading.Thread(target=self._reaper, daemon=True).start()
        self.address = f"{address.rsplit(':', 1)[0]}:{port}"
        return self.address

    def _reaper(self) -> None:
        while not self._stopped.wait(0.05):
            with self._cond:
                now = time.monotonic()
                for name, session in list(self.sessions.items()):
                    if now - session.last_contact > self.keepalive:
                        self.reaped += 1
                        self._close(name)
                self._cond.notify_all()

    def stop(self) -> None:
        self._stopped.set()
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def __enter__(self) -> "FakeBotsServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test controls ------------------------------------------------------------------

    def queue(self, payload: re_pb2.Action | re_pb2.Digest | Any, properties: dict[str, str] | None = None) -> str:
        """Queue a job; returns its lease id."""
        packed = payload if isinstance(payload, Any) else Any()
        if not isinstance(payload, Any):
            packed.Pack(payload)
        job = Job(str(uuid.uuid4()), packed, dict(properties or {}))
        with self._cond:
            self._queue.append(job)
            self._assign()
            self._cond.notify_all()
        return job.lease_id

    def force_assign(self, bot_id: str, payload: re_pb2.Action) -> str:
        """Put a job straight into the bot's session whatever its status: what a bot sees
        when the scheduler assigned a lease just before the bot's status changed."""
        packed = Any()
        packed.Pack(payload)
        job = Job(str(uuid.uuid4()), packed, {})
        with self._cond:
            session = next(s for s in self.sessions.values() if s.bot_id == bot_id)
            session.leases[job.lease_id] = job
            session.version += 1
            self._cond.notify_all()
        return job.lease_id

    def cancel(self, lease_id: str) -> None:
        """The client cancelled: the lease silently leaves its session."""
        with self._cond:
            self._queue = [job for job in self._queue if job.lease_id != lease_id]
            for session in self.sessions.values():
                if session.leases.pop(lease_id, None) is not None:
                    session.version += 1

    def expire(self, bot_id: str) -> None:
        """Delete the bot's session as the reaper does; its leases are requeued."""
        with self._cond:
            for name, session in list(self.sessions.items()):
                if session.bot_id == bot_id:
                    self._close(name)
            self._cond.notify_all()

    def fail(self, method: str, *codes: grpc.StatusCode) -> None:
        with self._cond:
            self._faults.setdefault(method, []).extend(codes)

    def holder(self, lease_id: str) -> str | None:
        """The bot_id holding ``lease_id``, if any."""
        with self._cond:
            for session in self.sessions.values():
                if lease_id in session.leases:
                    return session.bot_id
        return None

    def wait_result(self, lease_id: str, timeout: float = 10.0) -> tuple[status_pb2.Status, re_pb2.ActionResult]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while lease_id not in self.results:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no result for lease {lease_id}")
                self._cond.wait(remaining)
            return self.results[lease_id]

    def wait_held(self, lease_id: str, timeout: float = 10.0) -> None:
        """Until some session has been handed ``lease_id`` and has answered for it once."""
        deadline = time.monotonic() + timeout
        while self.holder(lease_id) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"lease {lease_id} never assigned")
            time.sleep(0.01)

    def calls_of(self, method: str) -> list[Call]:
        with self._cond:
            return [call for call in self.calls if call.method == method]

    # -- used by the servicer -----------------------------------------------------------

    def _enter(self, method: str, request: object, context: grpc.ServicerContext) -> None:
        with self._cond:
            self.calls.append(Call(method, time.monotonic(), request))
            faults = self._faults.get(method)
            code = faults.pop(0) if faults else None
        if code is not None:
            context.abort(code, f"injected {code.name}")

    def _close(self, name: str) -> None:
        session = self.sessions.pop(name)
        for job in session.leases.values():
            job.attempts += 1
            self._queue.append(job)
        self._assign()

    def _assign(self) -> None:
        for session in self.sessions.values():
            if session.status != bots_pb2.OK:
                continue
            for job in list(self._queue):
                if len(session.leases) >= session.capacity:
                    break
                if set(job.properties.items()) <= session.properties:
                    self._queue.remove(job)
                    session.leases[job.lease_id] = job
                    session.version += 1

    def _answer(self, session: Session, sent_version: str, context: grpc.ServicerContext) -> bots_pb2.BotSession:
        """Assign, long-poll if the rules allow, then describe the session."""
        remaining = context.time_remaining()
        hold = 0.8 * min(remaining if remaining is not None else 300.0, self.keepalive)
        with self._cond:
            self._assign()
            may_wait = (
                session.status == bots_pb2.OK
                and len(session.leases) < session.capacity
                and sent_version == str(session.version)
                and hold >= self.min_hold
            )
            if may_wait:
                deadline = time.monotonic() + hold
                start_version = session.version
                while (
                    session.version == start_version
                    and self.sessions.get(session.name) is session
                    and context.is_active()
                    and time.monotonic() < deadline
                ):
                    self._cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
                    self._assign()
            if self.sessions.get(session.name) is not session:
                context.abort(grpc.StatusCode.DATA_LOSS, "Bot not found to fetch expiry")
            # Only an answer the bot can still receive sets the version it must echo: a
            # long-poll it gave up on (cancelled, past its deadline) is never read, and its
            # next Update rightly echoes the version before it.
            if context.is_active():
                session.answered_version = session.version
            session.last_contact = time.monotonic()
            reply = bots_pb2.BotSession(
                name=session.name, bot_id=session.bot_id, status=session.status, version=str(session.version)
            )
            reply.expire_time.FromSeconds(int(time.time() + self.keepalive))
            for job in session.leases.values():
                reply.leases.add(id=job.lease_id, payload=job.payload, state=bots_pb2.ACTIVE)
            return reply


def _capacity(bot_session: bots_pb2.BotSession) -> int:
    for config in bot_session.worker.configs:
        if config.key == "capacity":
            return int(config.value)
    return 1


def _properties(bot_session: bots_pb2.BotSession) -> set[tuple[str, str]]:
    if not bot_session.worker.devices:
        return set()
    return {(p.key, p.value) for p in bot_session.worker.devices[0].properties}


class _Servicer(bots_pb2_grpc.BotsServicer):
    def __init__(self, fake: FakeBotsServer) -> None:
        self._fake = fake

    def CreateBotSession(self, request: bots_pb2.CreateBotSessionRequest, context: grpc.ServicerContext) -> bots_pb2.BotSession:
        fake = self._fake
        fake._enter("CreateBotSession", request, context)
        bot = request.bot_session
        if not bot.bot_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Bots's id must be set by client.")
        with fake._cond:
            for name, old in list(fake.sessions.items()):
                if old.bot_id == bot.bot_id:
                    fake._close(name)
            session = Session(
                name=f"{request.parent}/{uuid.uuid4()}",
                bot_id=bot.bot_id,
                capacity=_capacity(bot),
                properties=_properties(bot),
                status=bot.status,
            )
            fake.sessions[session.name] = session
            fake._cond.notify_all()
        return fake._answer(session, str(session.version), context)

    def UpdateBotSession(self, request: bots_pb2.UpdateBotSessionRequest, context: grpc.ServicerContext) -> bots_pb2.BotSession:
        fake = self._fake
        fake._enter("UpdateBotSession", request, context)
        bot = request.bot_session
        if bot.name != request.name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Name in UpdateBotSessionRequest does not match BotSession")
        with fake._cond:
            session = fake.sessions.get(request.name)
            if session is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Bot does not exist while validating leases")
            assert session is not None
            if session.bot_id != bot.bot_id:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Mismatch between client supplied bot_id/bot_name")
            session.last_contact = time.monotonic()
            if bot.version != str(session.answered_version):
                fake.stale_versions += 1
            session.status = bot.status
            session.capacity = _capacity(bot)
            session.properties = _properties(bot)
            for lease in bot.leases:
                if lease.state in (bots_pb2.PENDING, bots_pb2.CANCELLED):
                    fake._close(session.name)
                    context.abort(grpc.StatusCode.DATA_LOSS, "Unsupported lease state transition")
                if lease.state == bots_pb2.COMPLETED and lease.id in session.leases:
                    job = session.leases.pop(lease.id)
                    session.version += 1
                    result = re_pb2.ActionResult()
                    if not lease.result.Unpack(result):
                        result = re_pb2.ActionResult()  # BuildGrid drops anything else
                    if lease.status.code in (UNAVAILABLE, INTERNAL) and job.attempts + 1 < fake.max_attempts:
                        job.attempts += 1
                        fake._queue.append(job)
                    else:
                        fake.results[lease.id] = (lease.status, result)
            fake._cond.notify_all()
        return fake._answer(session, bot.version, context)
