"""Health with a real disk: a worker whose disk fills up stops taking work and takes it
again when space returns (worker/health/disks.py, worker/bot.py, worker/metrics.py).

A real ``reapi-worker bot`` process, the real BuildGrid 0.4.4 and a real full file system:
a 64 MiB tmpfs (we are root) holds the worker's cache and build root, and the test fills
it with a plain file, which eviction cannot free. Watermarks are fractions (low 40%,
critical 30%) so the figures do not depend on what the worker itself writes there.

1. healthy: ``/healthz`` 200, an action runs, ``/metrics`` counts it;
2. the disk below 30% free: ``/healthz`` 503 naming the disk, the bot reports UNHEALTHY,
   an action submitted now stays QUEUED and the worker runs nothing;
3. the file deleted: ``/healthz`` 200 again, the queued action runs on this worker.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot_fixtures import Farm, Worker, small_tmpfs, stage_name, staged_builds, until
from conftest import require, require_tool

pytestmark = [pytest.mark.buildgrid, pytest.mark.bwrap]

DISK_SIZE = 64 << 20
CRITICAL_FREE = 0.30
#: How long an action submitted to an unhealthy worker is watched staying in the queue.
QUEUED_FOR_SECONDS = 5.0


@pytest.fixture
def farm(buildgrid):
    require_tool("bwrap")
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    farm = Farm(buildgrid)
    yield farm
    farm.close()


@pytest.fixture
def small_disk(farm):
    with small_tmpfs(farm, DISK_SIZE, "reapi-health-disk-") as top:
        yield top


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def healthz(port: int) -> tuple[int, dict]:
    status, body = get(port, "/healthz")
    return status, json.loads(body)


def samples(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of ``/metrics``: (sample name, its labels) -> value."""
    status, body = get(port, "/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def sample(port: int, name: str, **labels: str) -> float:
    return samples(port)[(name, frozenset(labels.items()))]


def messages(worker: Worker, starting: str) -> list[str]:
    return [e["message"] for e in worker.entries() if e.get("message", "").startswith(starting)]


def fill(path: str, leaving: float) -> None:
    """Write zeros to ``path`` until its file system has less than ``leaving`` (a fraction)
    free. A plain file, outside the cache: eviction cannot free it."""
    chunk = bytes(1 << 20)
    with open(path, "wb") as stream:
        while True:
            st = os.statvfs(os.path.dirname(path))
            if st.f_bavail < st.f_blocks * leaving:
                return
            stream.write(chunk)
            stream.flush()


def test_a_full_disk_stops_the_worker_taking_work_until_space_returns(farm, small_disk):
    port = free_port()
    worker = farm.start_worker(
        "disk", 1,
        # After start_worker's own --cache-dir and --build-root: argparse keeps the last.
        "--cache-dir", os.path.join(small_disk, "cache"), "--build-root", os.path.join(small_disk, "builds"),
        "--disk-low-free", "40%", "--disk-critical-free", f"{CRITICAL_FREE:.0%}",
        "--health-interval-seconds", "0.5", "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
    )
    worker.wait_registered()
    for name in ("cache", "builds"):  # the later flags took effect: both are on the small disk
        assert os.stat(os.path.join(small_disk, name)).st_dev == os.stat(small_disk).st_dev

    # 1. Healthy: it takes work, and the metrics count it.
    status, document = healthz(port)
    assert status == 200 and document["status"] == "ok", document
    first = farm.execute(farm.action("echo first > out.txt", outputs=("out.txt",)))
    assert first.ok, first.response.status
    assert farm.read_output(first, "out.txt") == b"first\n"
    assert first.response.result.execution_metadata.worker == worker.bot_id
    assert sample(port, "reapi_worker_leases_finished_total", outcome="completed", code="OK") == 1
    assert sample(port, "reapi_worker_phase_duration_seconds_count", phase="run") == 1
    assert len(worker.leases()) == 1

    # 2. The disk fills below the critical watermark: no work.
    filler = os.path.join(small_disk, "filler")
    fill(filler, leaving=CRITICAL_FREE - 0.05)

    def unhealthy_document() -> dict | None:
        status, document = healthz(port)
        return document if status == 503 else None

    document = until(unhealthy_document, 5, "/healthz to answer 503")
    assert document["status"] == "unhealthy"
    assert any(small_disk in reason and "critical" in reason for reason in document["reasons"]), document
    assert sample(port, "reapi_worker_healthy") == 0
    # The bot reads health at each call; an idle one is in a long-poll (about 8 s here).
    unhealthy = until(lambda: messages(worker, "reporting UNHEALTHY"), 15, "the bot to report UNHEALTHY")
    assert small_disk in unhealthy[-1]

    stages: list[str] = []
    result: dict = {}
    second_digest = farm.action("echo second > out.txt", outputs=("out.txt",))
    thread = threading.Thread(target=lambda: result.setdefault("e", farm.execute(
        second_digest, on_operation=lambda op: stages.append(stage_name(op)))), daemon=True)
    thread.start()
    until(lambda: stages, 10, "the second action to be queued")
    time.sleep(QUEUED_FOR_SECONDS)  # nothing to wait for: watching that nothing happens
    assert set(stages) == {"QUEUED"}, stages
    assert len(worker.leases()) == 1  # ran nothing
    assert not [m for m in messages(worker, "lease ") if "handed back" in m]  # nor was given any
    assert not staged_builds(worker, os.path.join(small_disk, "builds"))

    # 3. Space returns: it takes the queued action.
    os.unlink(filler)
    until(lambda: healthz(port)[0] == 200, 5, "/healthz to answer 200 again")
    thread.join(30)
    assert not thread.is_alive(), f"the queued action did not finish: {stages}"
    second = result["e"]
    assert second.ok, second.response.status
    assert farm.read_output(second, "out.txt") == b"second\n"
    assert second.response.result.execution_metadata.worker == worker.bot_id
    assert "EXECUTING" in stages
    assert [e["outcome"] for e in worker.leases()] == ["completed", "completed"]
    until(lambda: messages(worker, "healthy again"), 5, "the bot to log that it is healthy again")
    assert sample(port, "reapi_worker_healthy") == 1
    assert sample(port, "reapi_worker_leases_finished_total", outcome="completed", code="OK") == 2
    assert worker.process.poll() is None
