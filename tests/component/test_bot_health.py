"""The session loop and health: an unhealthy bot says UNHEALTHY, takes no work, does not
spin, and takes work again once healthy; every call's success or failure reaches the
health object; lease and session events reach the metrics (fake Bots server on loopback).
"""

from __future__ import annotations

import dataclasses
import threading

import grpc

from fakes.bots_server import FakeBotsServer
from fakes.executor import action
from test_bot_protocol import FAST, executor, fake, running_bot, until  # noqa: F401 (fixtures)

from reapi_worker.protos import bots_pb2, code_pb2


class SwitchableHealth:
    """A health object whose verdict a test sets; records every scheduler contact."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reasons: tuple[str, ...] = ()
        self.contacts: list[tuple[bool, str]] = []

    def set_unhealthy(self, *reasons: str) -> None:
        with self._lock:
            self._reasons = reasons

    def healthy(self) -> tuple[bool, tuple[str, ...]]:
        with self._lock:
            return not self._reasons, self._reasons

    def record_scheduler_contact(self, ok: bool, detail: str = "") -> None:
        with self._lock:
            self.contacts.append((ok, detail))


class CountingEvents:
    def __init__(self) -> None:
        self.received = 0
        self.finished: list[int] = []
        self.reconnects = 0

    def record_lease_received(self) -> None:
        self.received += 1

    def record_lease_finished(self, code: int) -> None:
        self.finished.append(code)

    def record_session_reconnect(self) -> None:
        self.reconnects += 1


def statuses_sent(fake: FakeBotsServer) -> list[int]:
    return [call.request.bot_session.status for call in fake.calls_of("UpdateBotSession")]


def test_an_unhealthy_bot_reports_unhealthy_and_is_given_no_work(fake, executor):
    health = SwitchableHealth()
    health.set_unhealthy("cache disk /var/cache: 1% free, below the critical watermark 5%")
    with running_bot(fake, executor, health=health):
        lease_id = fake.queue(action("exit:0:a"))
        until(lambda: len(fake.calls_of("UpdateBotSession")) >= 5)
        assert fake.calls_of("CreateBotSession")[0].request.bot_session.status == bots_pb2.UNHEALTHY
        assert set(statuses_sent(fake)) == {bots_pb2.UNHEALTHY}
        assert executor.started == [] and fake.holder(lease_id) is None


def test_an_unhealthy_bot_paces_its_calls_instead_of_spinning(fake, executor):
    # The scheduler answers a non-OK bot at once: the bot must pace itself.
    health = SwitchableHealth()
    health.set_unhealthy("sandbox broken")
    settings = dataclasses.replace(FAST, heartbeat_seconds=0.2)
    with running_bot(fake, executor, settings=settings, health=health):
        until(lambda: len(fake.calls_of("UpdateBotSession")) >= 3)
        first = fake.calls_of("UpdateBotSession")[0].time
        until(lambda: len(fake.calls_of("UpdateBotSession")) >= 8, timeout=15)
        calls = fake.calls_of("UpdateBotSession")
    rate = (len(calls) - 1) / (calls[-1].time - first)
    assert rate < 1 / 0.2 * 1.5, f"{rate:.1f} calls/s while unhealthy"


def test_recovery_takes_the_waiting_work(fake, executor):
    health = SwitchableHealth()
    health.set_unhealthy("scheduler silent")
    with running_bot(fake, executor, health=health):
        lease_id = fake.queue(action("exit:0:b"))
        until(lambda: len(fake.calls_of("UpdateBotSession")) >= 3)
        assert executor.started == []
        health.set_unhealthy()
        assert fake.wait_result(lease_id)[0].code == code_pb2.OK
        assert statuses_sent(fake)[-1] == bots_pb2.OK


def test_a_lease_that_arrives_after_turning_unhealthy_is_handed_back(fake, executor):
    # The scheduler may assign a lease in the answer to the last OK call; the bot, now
    # unhealthy, must not run it but hand it back (UNAVAILABLE: requeued).
    health = SwitchableHealth()
    events = CountingEvents()
    with running_bot(fake, executor, capacity=2, health=health, events=events):
        blocker = fake.queue(action("block:c"))
        executor.wait_started("block:c")
        health.set_unhealthy("disk full")
        until(lambda: statuses_sent(fake)[-1:] == [bots_pb2.UNHEALTHY])
        # Deliver one more lease behind the scheduler's back, as if assigned just before.
        fake.force_assign("bot-1", action("exit:0:late"))
        until(lambda: events.finished.count(code_pb2.UNAVAILABLE) == 1)
        assert not any(salt.startswith("exit:0:late") for salt in executor.started)
        executor.release("block:c")
        assert fake.wait_result(blocker)[0].code == code_pb2.OK
    assert events.received == 2


def test_scheduler_contact_is_reported_both_ways(fake, executor):
    health = SwitchableHealth()
    with running_bot(fake, executor, health=health):
        until(lambda: any(ok for ok, _ in health.contacts))
        fake.fail("UpdateBotSession", grpc.StatusCode.UNAVAILABLE)
        until(lambda: any(not ok for ok, _ in health.contacts))
        failed_at = next(i for i, (ok, _) in enumerate(health.contacts) if not ok)
        until(lambda: any(ok for ok, _ in health.contacts[failed_at:]))  # the next call succeeds
    assert "UNAVAILABLE" in health.contacts[failed_at][1]


def test_events_count_leases_and_reconnects(fake, executor):
    events = CountingEvents()
    with running_bot(fake, executor, events=events) as bot:
        fake.wait_result(fake.queue(action("exit:0:d")))
        fake.expire("bot-1")
        until(lambda: bot.bot.sessions_created == 2)
        fake.wait_result(fake.queue(action("exit:0:e")))
    assert events.received == 2
    assert events.reconnects == 1
    assert events.finished == []  # executed leases are counted by the executor's wrapper


def test_a_lease_given_in_a_long_poll_sent_while_healthy_is_refused_if_health_turned(fake, executor):
    # The bot long-polls as OK; health turns bad while the call is out; the scheduler then
    # assigns a job in that call's answer. It must be handed back, not run.
    health = SwitchableHealth()
    events = CountingEvents()
    with running_bot(fake, executor, health=health, events=events):
        until(lambda: len(fake.calls_of("UpdateBotSession")) >= 1)
        health.set_unhealthy("cache disk: below the critical watermark")
        lease_id = fake.queue(action("exit:0:during-poll"))
        until(lambda: events.finished.count(code_pb2.UNAVAILABLE) >= 1)
        assert not any(salt.startswith("exit:0:during-poll") for salt in executor.started)
        assert lease_id not in fake.results or fake.results[lease_id][0].code != code_pb2.OK
