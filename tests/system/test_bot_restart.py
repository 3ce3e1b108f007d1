"""Restart the scheduler under running workers: they reconnect and every operation completes.

Uses a BuildGrid of its own (a free port, its own PostgreSQL and state directory) so the
session-wide one other tests share is not disturbed; ``BGD_KEEP_STATE=1`` keeps its
database and CAS across the restart, as a production restart would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading

import pytest

from bot_fixtures import Farm, stage_name, until
from conftest import BUILDGRID_HARNESS, require, require_tool

pytestmark = pytest.mark.buildgrid


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


PORT = _free_port()  # one per test process: several engineers' runs share this host


def _harness(command: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BUILDGRID_HARNESS), command], env={**os.environ, "BGD_PORT": PORT, **env},
        stdout=subprocess.PIPE, text=True, timeout=300,
    )


@pytest.fixture
def private_buildgrid(buildgrid):  # the shared one first: it installs the venv
    started = _harness("start")
    require(started.returncode == 0, "a second BuildGrid could not be started")
    yield started.stdout.strip()
    _harness("stop")


def test_workers_reconnect_after_a_scheduler_restart_and_every_operation_completes(private_buildgrid):
    require_tool("bwrap")
    farm = Farm(private_buildgrid)
    try:
        workers = [farm.start_worker(name, 2, "--max-backoff-seconds", "1") for name in ("a", "b")]
        for worker in workers:
            worker.wait_registered()
        digests = [farm.action(f"sleep 3; echo {i} > out.txt", outputs=("out.txt",)) for i in range(6)]
        executing: set[int] = set()
        results: dict[int, object] = {}
        lock = threading.Lock()

        def run(i: int) -> None:
            def watch(operation) -> None:
                if stage_name(operation) == "EXECUTING":
                    with lock:
                        executing.add(i)
            results[i] = farm.execute(digests[i], on_operation=watch)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        until(lambda: len(executing) >= 4, 30, "four actions to run")  # both workers full, two queued

        restarted = _harness("restart", BGD_KEEP_STATE="1")
        assert restarted.returncode == 0

        for thread in threads:
            thread.join(120)
        for i in range(6):
            execution = results[i]
            assert execution.ok, execution.response.status
            assert farm.read_output(execution, "out.txt") == f"{i}\n".encode()
        for worker in workers:
            assert worker.process.poll() is None, worker.log_text()
        failures = [e for w in workers for e in w.entries() if "failed" in e.get("message", "")]
        assert failures  # they did lose the scheduler, and came back
        ran = {e["action"] for w in workers for e in w.leases("completed")}
        assert ran >= {str(d) for d in digests}
        for worker in workers:
            assert worker.stop() == 0
        if os.environ.get("SHOW_LOGS"):
            for worker in workers:
                print(worker.log_text())
    finally:
        farm.close()
