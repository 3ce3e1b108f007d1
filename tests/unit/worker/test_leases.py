"""LeaseRunner on the fake executor: slots, hand-back, abort, cancellation, the log line."""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest
from google.protobuf.any_pb2 import Any

from fakes.executor import FakeExecutor, action

from reapi_worker.protos import bots_pb2, code_pb2, re_pb2
from reapi_worker.worker.leases import LeaseRunner
from reapi_worker.worker.logs import JsonFormatter


def lease(lease_id: str, payload) -> bots_pb2.Lease:
    packed = Any()
    packed.Pack(payload)
    return bots_pb2.Lease(id=lease_id, payload=packed, state=bots_pb2.ACTIVE)


@pytest.fixture
def executor():
    return FakeExecutor()


def wait_reports(runner: LeaseRunner, count: int, timeout: float = 10.0) -> dict:
    reports: dict = {}
    done = threading.Event()
    deadline = threading.Event()
    timer = threading.Timer(timeout, deadline.set)
    timer.start()
    try:
        while len(reports) < count and not deadline.is_set():
            reports.update(runner.take_reports())
            done.wait(0.01)
    finally:
        timer.cancel()
    assert len(reports) >= count, reports
    return reports


def test_runs_at_most_concurrency_actions_at_once(executor):
    runner = LeaseRunner(executor, concurrency=2)
    for i in range(5):
        runner.start(lease(f"l{i}", action(f"block:{i}")))
    executor.wait_started("block:0")
    executor.wait_started("block:1")
    assert runner.running_count() == 2 and len(runner.active()) == 5
    for i in range(5):
        executor.release(f"block:{i}")
    reports = wait_reports(runner, 5)
    assert runner.join(10)
    assert executor.max_running == 2
    assert all(r.status.code == code_pb2.OK for r in reports.values())


def test_hand_back_waiting_never_runs_them_and_reports_unavailable(executor):
    runner = LeaseRunner(executor, concurrency=1)
    runner.start(lease("running", action("block:r")))
    executor.wait_started("block:r")
    runner.start(lease("waiting", action("block:w")))
    assert runner.hand_back_waiting() == ["waiting"]
    reports = wait_reports(runner, 1)
    assert reports["waiting"].status.code == code_pb2.UNAVAILABLE
    executor.release("block:r")
    reports = wait_reports(runner, 1)
    assert reports["running"].status.code == code_pb2.OK
    assert runner.join(10)
    assert executor.started == ["block:r"]


def test_abort_running_kills_and_reports_unavailable(executor):
    runner = LeaseRunner(executor, concurrency=1)
    runner.start(lease("a", action("block:a")))
    executor.wait_started("block:a")
    runner.abort_running()
    reports = wait_reports(runner, 1)
    assert reports["a"].status.code == code_pb2.UNAVAILABLE  # requeued, never failed
    assert executor.cancelled == ["block:a"]


def test_vanished_lease_is_killed_and_nothing_reported(executor):
    runner = LeaseRunner(executor, concurrency=1)
    runner.start(lease("v", action("block:v")))
    executor.wait_started("block:v")
    runner.cancel("v")
    assert runner.join(10)
    assert executor.cancelled == ["block:v"]
    assert runner.take_reports() == {} and not runner.active()


def test_executor_bug_is_reported_internal_and_the_runner_goes_on(executor):
    runner = LeaseRunner(executor, concurrency=1)
    runner.start(lease("bug", action("raise")))
    runner.start(lease("fine", action("exit:0")))
    reports = wait_reports(runner, 2)
    assert reports["bug"].status.code == code_pb2.INTERNAL  # INTERNAL: the scheduler requeues it
    assert reports["fine"].status.code == code_pb2.OK


def test_payload_may_be_an_action_digest(executor):
    runner = LeaseRunner(executor, concurrency=1)
    digest = executor.register(action("exit:4"))
    runner.start(lease("d", digest.to_proto()))
    reports = wait_reports(runner, 1)
    assert reports["d"].result.exit_code == 4


def test_payload_of_another_type_is_invalid_argument(executor):
    runner = LeaseRunner(executor, concurrency=1)
    runner.start(lease("x", re_pb2.Command(arguments=["true"])))
    reports = wait_reports(runner, 1)
    assert reports["x"].status.code == code_pb2.INVALID_ARGUMENT
    assert "build.bazel.remote.execution.v2.Command" in reports["x"].status.message
    assert executor.started == []


def test_one_json_log_line_per_lease_with_digest_and_phases(executor):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("reapi_worker.lease")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        runner = LeaseRunner(executor, concurrency=1)
        runner.start(lease("j", action("exit:2")))
        wait_reports(runner, 1)
        runner.join(10)
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 1
    entry = lines[0]
    assert entry["lease"] == "j" and entry["exit_code"] == 2 and entry["status"] == "OK"
    assert "/" in entry["action"] and {"fetch_s", "run_s", "upload_s", "total_s"} <= set(entry)
