"""The session loop against the fake Bots server (tests/fakes/bots_server.py): each point
of docs/buildgrid-protocol.md the bot depends on, on a real gRPC server on loopback.

Rates and bounds here are about behaviour (a bot that spins makes hundreds of calls a
second; a bot that waits out a long-poll takes its full length), so their margins are wide.
"""

from __future__ import annotations

import contextlib
import threading
import time

import grpc
import pytest
from google.protobuf.any_pb2 import Any

from fakes.bots_server import FakeBotsServer
from fakes.executor import FakeExecutor, action

from reapi_worker.protos import bots_pb2, bots_pb2_grpc, code_pb2, re_pb2
from reapi_worker.storage.retry import RetryPolicy
from reapi_worker.worker.bot import Bot, BotConfig
from reapi_worker.worker.session import BotIdentity, SessionClient

PROPS = (("ISA", "x86-64"), ("OSFamily", "linux"))
FAST = BotConfig(
    heartbeat_seconds=0.05,
    backoff=RetryPolicy(initial_backoff=0.02, max_backoff=0.1),
    shutdown_grace_seconds=30,
)


class Running:
    """A bot running on a thread; ``code`` is what ``run`` returned."""

    def __init__(self, bot: Bot, thread: threading.Thread) -> None:
        self.bot = bot
        self.thread = thread
        self.code: int | None = None

    def stop(self, timeout: float = 10.0) -> int | None:
        self.bot.request_stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the bot did not stop"
        return self.code


@contextlib.contextmanager
def running_bot(fake: FakeBotsServer, executor: FakeExecutor, settings: BotConfig = FAST, capacity: int = 1, **kw):
    channel = grpc.insecure_channel(fake.address)
    identity = BotIdentity("main", "bot-1", capacity, PROPS)
    bot = Bot(SessionClient(bots_pb2_grpc.BotsStub(channel), identity), executor, settings, **kw)
    thread = threading.Thread(target=lambda: setattr(running, "code", bot.run()), name="bot")
    running = Running(bot, thread)
    thread.start()
    try:
        yield running
    finally:
        if thread.is_alive():
            bot.request_stop()
            bot.request_stop()  # abort whatever still runs
            thread.join(10)
        channel.close()


def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def sent_leases(fake: FakeBotsServer) -> list[bots_pb2.Lease]:
    return [lease for call in fake.calls_of("UpdateBotSession") for lease in call.request.bot_session.leases]


@pytest.fixture
def fake():
    with FakeBotsServer(keepalive=1.0) as server:
        yield server


@pytest.fixture
def executor():
    return FakeExecutor()


# -- registration ---------------------------------------------------------------------------


def test_registers_with_status_ok_properties_on_device_zero_and_capacity(fake, executor):
    with running_bot(fake, executor, capacity=3):
        until(lambda: fake.calls_of("UpdateBotSession"))
    create = fake.calls_of("CreateBotSession")[0].request
    assert create.parent == "main"
    session = create.bot_session
    assert session.bot_id == "bot-1" and session.status == bots_pb2.OK and not session.name
    assert [(p.key, p.value) for p in session.worker.devices[0].properties] == list(PROPS)
    assert {c.key: c.value for c in session.worker.configs} == {"capacity": "3"}


# -- leases and results ------------------------------------------------------------------


def test_results_are_action_results_with_status_ok_for_any_exit_code(fake, executor):
    with running_bot(fake, executor, capacity=2):
        zero, three = fake.queue(action("exit:0")), fake.queue(action("exit:3"))
        failed = fake.queue(action("status:9"))  # what the executor says for a missing input
        assert fake.wait_result(zero)[0].code == code_pb2.OK
        status, result = fake.wait_result(three)
        assert status.code == code_pb2.OK and result.exit_code == 3
        assert fake.wait_result(failed)[0].code == code_pb2.FAILED_PRECONDITION
    completed = [lease for lease in sent_leases(fake) if lease.state == bots_pb2.COMPLETED]
    assert completed and all(lease.result.Is(re_pb2.ActionResult.DESCRIPTOR) for lease in completed)


def test_echoes_the_session_version_in_every_update(fake, executor):
    with running_bot(fake, executor, capacity=2):
        for i in range(4):
            fake.wait_result(fake.queue(action(f"exit:0:{i}")))
        until(lambda: len(fake.calls_of("UpdateBotSession")) >= 8)
    assert fake.stale_versions == 0


def test_payload_digest_form_is_executed_too(fake, executor):
    digest = executor.register(action("exit:5"))
    with running_bot(fake, executor):
        assert fake.wait_result(fake.queue(digest.to_proto()))[1].exit_code == 5


def test_runs_up_to_capacity_at_once(fake, executor):
    with running_bot(fake, executor, capacity=2):
        ids = [fake.queue(action(f"block:{i}")) for i in range(4)]
        until(lambda: executor.running == 2)
        for i in range(4):
            executor.release(f"block:{i}")
        for lease_id in ids:
            fake.wait_result(lease_id)
    assert executor.max_running == 2


def test_a_crashing_action_never_stops_the_bot(fake, executor):
    with running_bot(fake, executor):
        bug = fake.queue(action("raise"))
        assert fake.wait_result(bug)[0].code == code_pb2.INTERNAL  # requeued until attempts ran out
        assert fake.wait_result(fake.queue(action("exit:0")))[0].code == code_pb2.OK
    assert executor.started.count("raise") == fake.max_attempts


def test_a_lease_that_is_not_an_action_is_refused_without_running(fake, executor):
    payload = Any()
    payload.Pack(re_pb2.Command(arguments=["true"]))
    with running_bot(fake, executor):
        assert fake.wait_result(fake.queue(payload))[0].code == code_pb2.INVALID_ARGUMENT
    assert executor.started == []


# -- promptness, pacing, keepalive --------------------------------------------------------


def test_a_finished_lease_is_reported_without_waiting_for_the_next_heartbeat(executor):
    # Heartbeat and long-poll both 30 s: only the cancel-and-resend path can report in time.
    slow = BotConfig(heartbeat_seconds=30, poll_deadline_seconds=30)
    with FakeBotsServer(keepalive=30) as fake:
        blocker, quick = fake.queue(action("block:long")), fake.queue(action("exit:0"))
        with running_bot(fake, executor, settings=slow, capacity=2) as bot:
            assert fake.wait_result(quick, timeout=5)[0].code == code_pb2.OK
            executor.release("block:long")
            assert fake.wait_result(blocker, timeout=5)[0].code == code_pb2.OK
            started = time.monotonic()
            assert bot.stop() == 0  # stopping cancels the outstanding 24 s long-poll too
            assert time.monotonic() - started < 5


def test_an_idle_bot_long_polls_instead_of_spinning(fake, executor):
    with running_bot(fake, executor):
        until(lambda: fake.calls_of("UpdateBotSession"))
        before = len(fake.calls)
        time.sleep(2.0)
        calls = len(fake.calls) - before
    # The fake holds each call 0.8 s (0.8 x keepalive 1 s): about 2-3 calls in 2 s.
    assert 1 <= calls <= 4


def test_against_a_scheduler_that_never_holds_calls_the_bot_paces_itself(executor):
    with FakeBotsServer(keepalive=1.0, min_hold=1000) as fake:  # never long-polls
        settings = BotConfig(heartbeat_seconds=0.2)
        with running_bot(fake, executor, settings=settings):
            until(lambda: fake.calls_of("UpdateBotSession"))
            before = len(fake.calls)
            time.sleep(2.0)
            calls = len(fake.calls) - before
    assert calls <= 2.0 / 0.2 + 2  # one per heartbeat, not hundreds


def test_failing_scheduler_gets_capped_exponential_backoff(fake, executor):
    waits: list[float] = []

    def recording_wait(event: threading.Event, timeout: float) -> bool:
        waits.append(timeout)
        return event.wait(0.001)  # virtual time: record, do not sleep

    fake.fail("CreateBotSession", *[grpc.StatusCode.UNAVAILABLE] * 8)
    settings = BotConfig(backoff=RetryPolicy(initial_backoff=0.25, max_backoff=2.0, jitter=0.2))
    with running_bot(fake, executor, settings=settings, wait=recording_wait) as bot:
        until(lambda: bot.bot.sessions_created == 1)
    backoffs = waits[:8]
    assert len(fake.calls_of("CreateBotSession")) == 9
    assert all(0.2 <= wait <= 2.0 for wait in backoffs)
    assert backoffs[3] > backoffs[0] and max(backoffs) > 1.5  # grows, then stays at the cap
    assert sum(backoffs) > 8  # 8 failures spread over > 8 s of (virtual) time: no spinning


def test_heartbeats_keep_the_session_alive_through_a_long_action(executor):
    with FakeBotsServer(keepalive=1.0, reap=True) as fake:
        settings = BotConfig(heartbeat_seconds=0.3)
        with running_bot(fake, executor, settings=settings) as bot:
            lease_id = fake.queue(action("block:long"))
            executor.wait_started("block:long")
            time.sleep(2.5)  # 2.5 x keepalive
            executor.release("block:long")
            assert fake.wait_result(lease_id)[0].code == code_pb2.OK
            assert fake.reaped == 0 and bot.bot.sessions_created == 1


# -- cancellation -------------------------------------------------------------------------


def test_a_lease_that_vanishes_is_killed_and_never_reported(fake, executor):
    with running_bot(fake, executor) as bot:
        lease_id = fake.queue(action("block:c"))
        executor.wait_started("block:c")
        fake.cancel(lease_id)
        until(lambda: executor.cancelled == ["block:c"], timeout=5)
        after = fake.wait_result(fake.queue(action("exit:0")))  # the bot carries on
        assert after[0].code == code_pb2.OK
        assert bot.bot.sessions_created == 1
    assert lease_id not in fake.results
    states = {lease.state for lease in sent_leases(fake)}
    assert states <= {bots_pb2.ACTIVE, bots_pb2.COMPLETED}  # never PENDING, never CANCELLED


# -- faults ---------------------------------------------------------------------------------


def test_lost_session_is_recreated_and_the_running_lease_goes_on_once(fake, executor):
    with running_bot(fake, executor) as bot:
        lease_id = fake.queue(action("block:d"))
        executor.wait_started("block:d")
        fake.expire("bot-1")  # as the reaper does: the job is requeued under the same id
        until(lambda: bot.bot.sessions_created == 2)
        until(lambda: fake.holder(lease_id) == "bot-1")  # given back to us while still running
        executor.release("block:d")
        assert fake.wait_result(lease_id)[0].code == code_pb2.OK
    assert executor.started.count("block:d") == 1


def test_a_result_finished_while_the_session_was_lost_is_reported_when_the_lease_returns(fake, executor):
    with running_bot(fake, executor) as bot:
        lease_id = fake.queue(action("block:e"))
        executor.wait_started("block:e")
        fake.fail("CreateBotSession", grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
        fake.expire("bot-1")
        executor.release("block:e")  # finishes while the bot has no session
        assert fake.wait_result(lease_id)[0].code == code_pb2.OK
        assert bot.bot.sessions_created == 2
    assert executor.started.count("block:e") == 1


def test_a_result_finished_between_two_sessions_is_reported_when_the_lease_returns(fake, executor):
    # The other order: the bot has noticed the loss (and cannot create a session yet)
    # when the lease finishes; the new session is handed the same lease back.
    with running_bot(fake, executor) as bot:
        lease_id = fake.queue(action("block:e2"))
        executor.wait_started("block:e2")
        fake.fail("CreateBotSession", *[grpc.StatusCode.UNAVAILABLE] * 3)
        fake.expire("bot-1")
        until(lambda: len(fake.calls_of("CreateBotSession")) >= 2)  # a re-create was refused
        executor.release("block:e2")
        assert fake.wait_result(lease_id)[0].code == code_pb2.OK
        assert bot.bot.sessions_created == 2
    assert executor.started.count("block:e2") == 1


def test_unreachable_scheduler_keeps_running_leases(fake, executor):
    with running_bot(fake, executor) as bot:
        lease_id = fake.queue(action("block:f"))
        executor.wait_started("block:f")
        fake.fail("UpdateBotSession", *[grpc.StatusCode.UNAVAILABLE] * 5)
        until(lambda: len(fake.calls_of("UpdateBotSession")) >= 6)
        assert executor.cancelled == []
        executor.release("block:f")
        assert fake.wait_result(lease_id)[0].code == code_pb2.OK
        assert bot.bot.sessions_created == 1


# -- shutdown -------------------------------------------------------------------------------


def test_stop_drains_running_leases_reports_them_and_terminates(fake, executor):
    with running_bot(fake, executor, capacity=2) as bot:
        lease_id = fake.queue(action("block:g"))
        executor.wait_started("block:g")
        bot.bot.request_stop()
        until(lambda: any(c.request.bot_session.status == bots_pb2.BOT_TERMINATING
                          for c in fake.calls_of("UpdateBotSession")))
        late = fake.queue(action("exit:0"))  # a terminating bot is given nothing new
        executor.release("block:g")
        bot.thread.join(10)
        assert bot.code == 0
    assert fake.results[lease_id][0].code == code_pb2.OK
    assert late not in fake.results and "exit:0" not in executor.started
    assert fake.calls_of("UpdateBotSession")[-1].request.bot_session.status == bots_pb2.BOT_TERMINATING


def test_an_idle_bot_whose_scheduler_is_gone_exits_at_once_on_stop(fake, executor):
    # Nothing to report: one failed BOT_TERMINATING is enough, not the whole grace period.
    settings = BotConfig(heartbeat_seconds=0.05, shutdown_grace_seconds=30, final_report_seconds=30)
    with running_bot(fake, executor, settings=settings) as bot:
        until(lambda: bot.bot.sessions_created == 1)
        fake.fail("UpdateBotSession", *[grpc.StatusCode.UNAVAILABLE] * 1000)
        stopped = time.monotonic()
        bot.bot.request_stop()
        bot.thread.join(10)
        assert not bot.thread.is_alive() and bot.code == 0
    assert time.monotonic() - stopped < 5


@pytest.mark.parametrize("how", ["second request", "grace period"])
def test_abort_kills_running_leases_and_hands_them_back(fake, executor, how):
    settings = BotConfig(heartbeat_seconds=0.05, shutdown_grace_seconds=0.3 if how == "grace period" else 30)
    with running_bot(fake, executor, settings=settings) as bot:
        lease_id = fake.queue(action("block:h"))
        executor.wait_started("block:h")
        bot.bot.request_stop()
        if how == "second request":
            bot.bot.request_stop()
        bot.thread.join(10)
        assert bot.code == 0
    assert executor.cancelled == ["block:h"]
    handed_back = [lease for lease in sent_leases(fake) if lease.id == lease_id and lease.state == bots_pb2.COMPLETED]
    assert [lease.status.code for lease in handed_back] == [code_pb2.UNAVAILABLE]  # requeued, not failed
    assert lease_id not in fake.results
