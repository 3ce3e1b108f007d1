"""kill -9 of a worker mid-action, then a restart: nothing is left behind and the action
completes (storage/build_root.py, sandbox/cgroup_sweep.py).

Real parts: ``reapi-worker bot`` processes killed with SIGKILL, the real BuildGrid 0.4.4,
real bubblewrap, real per-action tmpfs and overlay mounts (the build-directory bound).
A second, live worker shares the build root all along: its part must never be touched.
"""

from __future__ import annotations

import glob
import os
import threading

import pytest

from bot_fixtures import Farm, build_root_parts, staged_builds, trash_entries, until
from conftest import require, require_tool

from reapi_worker.storage.fuse import kernel_mounts

pytestmark = [pytest.mark.buildgrid, pytest.mark.bwrap]


@pytest.fixture
def farm(buildgrid):
    require_tool("bwrap")
    require(os.geteuid() == 0, "per-action mounts need root")
    farm = Farm(buildgrid)
    farm.others = []
    yield farm
    for other in farm.others:
        other.close()
    farm.close()


SCRIPT = "sleep 5; echo survived > out.txt"


def processes_running(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as stream:
                if marker.encode() in stream.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def part_of(build_root: str, pid: int) -> str:
    """The build-root part of the worker process ``pid`` (its owner file holds the pid)."""
    for part in build_root_parts(build_root):
        with open(os.path.join(build_root, ".owners", os.path.basename(part)[2:])) as owner:
            if owner.read().split() == [str(pid)]:
                return part
    raise AssertionError(f"no part of {build_root} belongs to {pid}")


def action_cgroups_of(pid: int) -> list[str]:
    return glob.glob(f"/sys/fs/cgroup/**/reapi-worker/{pid}-*", recursive=True)


def test_a_worker_killed_mid_action_leaves_nothing_after_its_restart(farm):
    shared = os.path.join(farm.top, "shared-builds")
    common = ("--build-root", shared, "--build-dir-size", "16M")
    # The neighbour advertises another farm's ISA token: it never takes this farm's action.
    other = Farm(farm.address)
    farm.others.append(other)
    neighbour = other.start_worker("neighbour", 1, *common)
    victim = farm.start_worker("victim", 1, *common)
    neighbour.wait_registered()
    victim.wait_registered()
    until(lambda: len(build_root_parts(shared)) == 2, 10, "both workers to claim their part")
    neighbour_part = part_of(shared, neighbour.process.pid)
    marker = os.path.join(neighbour_part, "neighbour-was-here")
    os.mkdir(marker)  # stands for a live worker's build directory

    digest = farm.action(SCRIPT, outputs=("out.txt",))
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("e", farm.execute(digest)), daemon=True)
    thread.start()
    until(lambda: [n for n in staged_builds(victim, shared) if n != "neighbour-was-here"], 20, "the action to be staged")
    until(lambda: kernel_mounts.mounts_under(shared), 10, "the action's mounts")
    until(lambda: processes_running(SCRIPT), 10, "the action's command to run")
    victim_pid = victim.process.pid
    victim.process.kill()
    victim.process.wait(10)
    assert action_cgroups_of(victim_pid)  # what a killed worker leaves: its action's cgroups
    parts_before = set(build_root_parts(shared))
    assert len(parts_before) == 2  # the dead worker's part is still there, with its mounts
    assert kernel_mounts.mounts_under(shared)

    # Same bot id: BuildGrid closes the dead session at once and requeues its lease.
    restarted = farm.start_worker("victim-again", 1, *common, "--bot-id", victim.bot_id)
    restarted.wait_registered()
    thread.join(120)
    assert not thread.is_alive(), "the action did not complete after the restart"
    execution = result["e"]
    assert execution.ok, execution.response.status
    assert farm.read_output(execution, "out.txt") == b"survived\n"

    swept = [e for e in restarted.entries() if e.get("message", "").startswith("swept ")]
    assert swept and "1 leftover" in swept[0]["message"], restarted.log_text()
    until(lambda: not trash_entries(restarted), 30, "the dead worker's part to be removed")
    parts = set(build_root_parts(shared))
    assert neighbour_part in parts and os.path.isdir(marker)  # the live neighbour untouched
    dead_part = (parts_before - {neighbour_part}).pop()
    assert dead_part not in parts and len(parts) == 2  # the dead part is gone, ours is new
    until(lambda: staged_builds(restarted, shared) == ["neighbour-was-here"], 10, "the build directory to go")
    assert kernel_mounts.mounts_under(shared) == []  # no overlay, no tmpfs left
    assert action_cgroups_of(victim_pid) == []
    # No process of the killed worker's action is left (its sandbox is killed if it lingers).
    until(lambda: not processes_running(SCRIPT), 10, "the first run's processes to be gone")
    assert neighbour.process.poll() is None and restarted.process.poll() is None
