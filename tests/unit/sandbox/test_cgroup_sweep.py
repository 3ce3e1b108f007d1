"""sandbox/cgroup_sweep.py: cgroups of dead workers are removed, a live worker's never.
On a directory tree standing in for a hierarchy (a directory that holds a file fails
rmdir with ENOTEMPTY and is left); killing what a dead worker left in a real cgroup is
tests/system/test_bot_crash_recovery.py's."""

from __future__ import annotations

import os
import subprocess
import sys

from reapi_worker.sandbox import cgroup_sweep
from reapi_worker.sandbox.cgroup_sweep import sweep_dead_action_cgroups, worker_is_alive


def test_cgroups_of_dead_workers_go_and_a_live_workers_stay(tmp_path):
    memory, pids = tmp_path / "memory" / "reapi-worker", tmp_path / "pids" / "reapi-worker"
    for parent in (memory, pids):
        for name in ("100-0", "100-1", "200-0", "300-0", "not-a-cgroup"):
            (parent / name).mkdir(parents=True)
    (memory / "300-0" / "stuck").write_text("")  # cannot be removed: left, logged
    removed = sweep_dead_action_cgroups([memory, pids, memory], is_alive=lambda pid: pid == 200, settle_seconds=0)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == [
        "memory/reapi-worker/100-0", "memory/reapi-worker/100-1",
        "pids/reapi-worker/100-0", "pids/reapi-worker/100-1", "pids/reapi-worker/300-0",
    ]
    assert sorted(os.listdir(memory)) == ["200-0", "300-0", "not-a-cgroup"]


def test_any_live_process_is_an_owner_and_we_are_once_we_named_one():
    """Tests, benchmarks and ``run-action`` run sandboxes in processes of their own: any
    live pid may own action cgroups, whatever its command line. Our own pid owns none until
    we named one: before, it is a restarted worker that got its old pid back; after, a
    second sweep in this process (another controller) must not take ours."""
    # Not monkeypatch: restoring "named none" afterwards would be a lie once this process's
    # runners have made cgroups, and a later sweep would take theirs.
    cgroup_sweep._named_own = False
    try:
        assert not worker_is_alive(os.getpid())
    finally:
        cgroup_sweep.note_own_cgroup()
    assert worker_is_alive(os.getpid())
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert worker_is_alive(other.pid)
    finally:
        other.kill()
        other.wait()
    assert not worker_is_alive(other.pid)
