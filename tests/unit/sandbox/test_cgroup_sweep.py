"""sandbox/cgroup_sweep.py: cgroups of dead workers are removed, a live worker's and
non-empty ones never. On a directory tree standing in for a hierarchy (rmdir of a cgroup
that holds processes fails EBUSY; here a directory that holds a file fails ENOTEMPTY)."""

from __future__ import annotations

import os
import subprocess
import sys

from reapi_worker.sandbox.cgroup_sweep import sweep_dead_action_cgroups, worker_is_alive


def test_only_empty_cgroups_of_dead_workers_go(tmp_path):
    memory, pids = tmp_path / "memory" / "reapi-worker", tmp_path / "pids" / "reapi-worker"
    for parent in (memory, pids):
        for name in ("100-0", "100-1", "200-0", "300-0", "not-a-cgroup"):
            (parent / name).mkdir(parents=True)
    (memory / "300-0" / "busy").write_text("")  # still holds something: left alone
    removed = sweep_dead_action_cgroups([memory, pids, memory], is_alive=lambda pid: pid == 200)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == [
        "memory/reapi-worker/100-0", "memory/reapi-worker/100-1",
        "pids/reapi-worker/100-0", "pids/reapi-worker/100-1", "pids/reapi-worker/300-0",
    ]
    assert sorted(os.listdir(memory)) == ["200-0", "300-0", "not-a-cgroup"]


def started(*argv: str) -> subprocess.Popen:
    """A child that has exec'ed ``argv`` (before that its cmdline is ours)."""
    process = subprocess.Popen([sys.executable, *argv])
    while True:
        with open(f"/proc/{process.pid}/cmdline", "rb") as stream:
            if argv[-1].encode() in stream.read():
                return process


def test_liveness_is_a_running_reapi_worker_other_than_us():
    assert not worker_is_alive(os.getpid())  # a restarted worker that got its old pid back
    other = started("-c", "import time; time.sleep(60)", "someone-else")
    try:
        assert not worker_is_alive(other.pid)  # a live process, but no worker: a reused pid
    finally:
        other.kill()
        other.wait()
    worker = started("-c", "import time; time.sleep(60)", "reapi-worker")
    try:
        assert worker_is_alive(worker.pid)
    finally:
        worker.kill()
        worker.wait()
    assert not worker_is_alive(worker.pid)
