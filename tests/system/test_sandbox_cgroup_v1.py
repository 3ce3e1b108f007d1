"""The cgroup v1 controller against this machine's real hierarchies (v2 is unit-tested on a
fake tree; modern hosts run it, this machine kind does not)."""

from __future__ import annotations

import os
import select
import time

import pytest
from conftest import require

from reapi_worker.sandbox import ResourceLimits, SandboxSetupError
from reapi_worker.sandbox.cgroups import CgroupV1Controller
from reapi_worker.sandbox.spawner import ChildSetup, Spawner


SPAWNER = Spawner()


class Joined:
    """A process spawned the way the runner spawns bubblewrap (through the spawner, joined by
    itself on v1), held by a shell reading its stdin until then."""

    def __init__(self, confinement, command: tuple[str, ...]) -> None:
        go_r, self._go = os.pipe()
        out = os.open(os.devnull, os.O_WRONLY)
        spawned = SPAWNER.spawn(
            ["/bin/sh", "-c", 'read go && exec "$@"', "sh", *command], (go_r, out, out),
            ChildSetup(rlimits=confinement.rlimits, join_tasks=confinement.join_tasks,
                       home_tasks=confinement.home_tasks),
            env={"PATH": os.environ["PATH"]},
        )
        os.close(go_r)
        os.close(out)
        self.pid, self._pidfd = spawned.pid, spawned.pidfd
        confinement.join(self.pid)
        os.write(self._go, b"go\n")
        os.close(self._go)

    def exited(self, seconds: float) -> bool:
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(seconds * 1000))


def spawn_joined(confinement, *command: str) -> Joined:
    return Joined(confinement, command)


@pytest.fixture(scope="module")
def v1() -> CgroupV1Controller:
    require(os.geteuid() == 0, "creating cgroups needs root here")
    try:
        return CgroupV1Controller.from_self()
    except SandboxSetupError as e:
        require(False, f"no cgroup v1 on this host: {e}")
        raise


def test_limits_are_written_to_the_real_control_files_and_removed_after(v1):
    require({"memory", "pids", "cpu"} <= v1.enforces, "memory, pids and cpu hierarchies")
    confinement = v1.confine(ResourceLimits(memory_bytes=96 << 20, max_pids=7, cpu_cores=0.5))
    dirs = confinement.dirs  # type: ignore[attr-defined]
    try:
        assert int((dirs["memory"] / "memory.limit_in_bytes").read_text()) == 96 << 20
        assert int((dirs["pids"] / "pids.max").read_text()) == 9
        assert int((dirs["cpu"] / "cpu.cfs_quota_us").read_text()) == 50_000
        assert int((dirs["cpu"] / "cpu.cfs_period_us").read_text()) == 100_000
    finally:
        confinement.close()
    assert not any(d.exists() for d in dirs.values())


def test_joined_processes_and_their_daemons_are_killed_through_the_cgroup(v1):
    """The second kill line on its own: no pid namespace here, just the cgroup."""
    with v1.confine(ResourceLimits()) as confinement:
        proc = spawn_joined(confinement, "sh", "-c", "(sleep 299 &); sleep 299")
        procs = next(iter(confinement.dirs.values())) / "cgroup.procs"  # type: ignore[attr-defined]
        deadline = time.monotonic() + 5
        while len(procs.read_text().split()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(procs.read_text().split()) >= 2  # the shell and the double-forked sleep
        for d in set(confinement.dirs.values()):  # type: ignore[attr-defined]
            assert str(proc.pid) in (d / "cgroup.procs").read_text().split()  # the whole process, everywhere
        confinement.kill_all()
        assert procs.read_text().split() == []
        assert proc.exited(5)


def test_figures_are_read_from_the_real_cgroup(v1):
    with v1.confine(ResourceLimits()) as confinement:
        proc = spawn_joined(confinement, "python3", "-c", "x = bytearray(32 << 20); x[::4096] = b'x' * (8 << 10)")
        assert proc.exited(30)
        usage = confinement.usage()
    assert usage.memory_peak_bytes >= 32 << 20
    assert usage.cpu_seconds > 0 and usage.user_cpu_seconds is not None
