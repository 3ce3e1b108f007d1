"""Cgroup discovery and both controllers against a fake cgroup tree (plain directories).

The kernel's side of a fake tree is played by the test: it writes the files the kernel
would (``memory.events``, ``memory.peak`` ...). ``remove_dir=shutil.rmtree`` stands in for
``rmdir`` on cgroupfs, which removes a cgroup together with its control files.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from pathlib import Path

import pytest

from reapi_worker.host.mountinfo import parse_mountinfo
from reapi_worker.sandbox import ResourceLimits, SandboxSetupError
from reapi_worker.sandbox.cgroups import (
    ACTIONS_DIR,
    CgroupMount,
    CgroupV1Controller,
    CgroupV2Controller,
    cgroup_mounts,
    host_dir,
    join_cgroups,
    open_files_rlimit,
    parse_proc_cgroup,
)
from reapi_worker.sandbox.rlimits import RlimitController, action_rlimits

# This machine kind: v1 hierarchies, the memory one confining the worker, and an idle v2 mount.
MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 31 0:39 /ctr /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
51 23 0:40 / /mnt/with\\040space rw - cgroup2 cgroup2 rw
"""
PROC_CGROUP = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/319e
2:cpuacct:/
1:cpu:/
0::/
"""


def test_mountinfo_gives_each_hierarchy_its_controllers_and_root():
    mounts = cgroup_mounts(parse_mountinfo(MOUNTINFO))
    by_point = {m.mount_point: m for m in mounts}
    assert by_point["/sys/fs/cgroup/memory"] == CgroupMount("/sys/fs/cgroup/memory", "/", 1, frozenset({"memory"}))
    assert by_point["/sys/fs/cgroup/cpu,cpuacct"].controllers == {"cpu", "cpuacct"}
    assert by_point["/sys/fs/cgroup/cpu,cpuacct"].root == "/ctr"
    assert by_point["/sys/fs/cgroup/systemd"].controllers == frozenset()  # name= only
    assert by_point["/sys/fs/cgroup/unified"].version == 2
    assert "/mnt/with space" in by_point
    assert "/sys/fs/cgroup" not in by_point


def test_proc_cgroup_maps_each_controller_to_its_path():
    paths = parse_proc_cgroup(PROC_CGROUP)
    assert paths["memory"] == "/process_api/319e"
    assert paths["pids"] == "/"
    assert paths[""] == "/"
    assert "name=systemd" not in paths


def test_host_dir_follows_the_mount_root():
    full = CgroupMount("/sys/fs/cgroup/memory", "/", 1, frozenset({"memory"}))
    assert host_dir(full, "/process_api/319e") == Path("/sys/fs/cgroup/memory/process_api/319e")
    namespaced = CgroupMount("/sys/fs/cgroup", "/ctr", 2, frozenset())
    assert host_dir(namespaced, "/ctr") == Path("/sys/fs/cgroup")
    assert host_dir(namespaced, "/ctr/sub") == Path("/sys/fs/cgroup/sub")
    assert host_dir(namespaced, "/other") is None


def test_join_writes_the_pid_into_every_file(tmp_path):
    files = [tmp_path / "a.procs", tmp_path / "b procs"]
    join_cgroups(files, 4321)
    assert [f.read_text() for f in files] == ["4321", "4321"]


def test_join_names_the_cgroup_it_cannot_join(tmp_path):
    missing = tmp_path / "missing" / "cgroup.procs"
    with pytest.raises(SandboxSetupError, match="cannot join cgroup .*missing"):
        join_cgroups([tmp_path / "a.procs", missing], 4321)


def test_the_open_files_limit_is_an_rlimit_of_the_spawned_process_only_when_bounded():
    assert open_files_rlimit(None) == ()
    assert open_files_rlimit(123) == ((resource.RLIMIT_NOFILE, 123),)


# --- v2 on a fake tree --------------------------------------------------------------------


@pytest.fixture
def v2_tree(tmp_path):
    base = tmp_path / "cgroup" / "worker.slice"
    base.mkdir(parents=True)
    (base / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma\n")
    (base / "cgroup.subtree_control").write_text("")
    mounts = [CgroupMount(str(tmp_path / "cgroup"), "/", 2, frozenset())]
    return base, mounts, {"": "/worker.slice"}


def test_v2_delegates_controllers_and_creates_one_cgroup_per_action(v2_tree):
    base, mounts, own = v2_tree
    controller = CgroupV2Controller.from_self(mounts, own, remove_dir=shutil.rmtree)
    assert controller.enforces == {"memory", "pids", "cpu"}
    assert controller.parent == base / ACTIONS_DIR
    assert (base / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (base / ACTIONS_DIR / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"

    confinement = controller.confine(ResourceLimits(memory_bytes=64 << 20, max_pids=10, cpu_cores=1.5))
    path = confinement.path  # type: ignore[attr-defined]
    assert path.parent == base / ACTIONS_DIR and path.name.startswith(f"{os.getpid()}-")
    assert (path / "memory.max").read_text() == str(64 << 20)
    assert (path / "memory.swap.max").read_text() == "0"
    assert (path / "pids.max").read_text() == "12"  # + bubblewrap's monitor and init
    assert (path / "cpu.max").read_text() == "150000 100000"
    assert confinement.join_tasks == ()  # the worker joins the process itself
    confinement.join(4321)
    assert (path / "cgroup.procs").read_text() == "4321"

    # The kernel's part: an OOM kill and the figures.
    assert not confinement.oom_killed()
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n")
    (path / "memory.peak").write_text("67108864\n")
    (path / "pids.peak").write_text("5\n")
    (path / "cpu.stat").write_text("usage_usec 250000\nuser_usec 200000\nsystem_usec 50000\n")
    assert confinement.oom_killed()
    usage = confinement.usage()
    assert (usage.memory_peak_bytes, usage.pids_peak, usage.cpu_seconds) == (64 << 20, 5, 0.25)
    assert (usage.user_cpu_seconds, usage.system_cpu_seconds) == (0.2, 0.05)

    confinement.close()
    confinement.close()  # idempotent
    assert not path.exists()


def test_v2_unlimited_actions_get_a_cgroup_without_limit_files(v2_tree):
    base, mounts, own = v2_tree
    controller = CgroupV2Controller.from_self(mounts, own, remove_dir=shutil.rmtree)
    with controller.confine(ResourceLimits()) as confinement:
        path = confinement.path  # type: ignore[attr-defined]
        assert sorted(p.name for p in path.iterdir()) == []
        usage = confinement.usage()
        assert usage.memory_peak_bytes is None and usage.pids_peak is None and usage.cpu_seconds is None
    assert not path.exists()


def test_v2_without_delegated_memory_and_pids_is_refused(v2_tree):
    base, mounts, own = v2_tree
    (base / "cgroup.controllers").write_text("cpu io\n")
    with pytest.raises(SandboxSetupError, match="does not delegate"):
        CgroupV2Controller.from_self(mounts, own)


def test_v2_needs_the_worker_in_a_v2_hierarchy(v2_tree):
    _, mounts, _ = v2_tree
    with pytest.raises(SandboxSetupError):
        CgroupV2Controller.from_self(mounts, {"memory": "/x"})


# --- v1 on a fake tree --------------------------------------------------------------------


@pytest.fixture
def v1_tree(tmp_path):
    mounts = []
    for name, controllers in (("memory", {"memory"}), ("pids", {"pids"}), ("cpu,cpuacct", {"cpu", "cpuacct"})):
        (tmp_path / name / "worker").mkdir(parents=True)
        mounts.append(CgroupMount(str(tmp_path / name), "/", 1, frozenset(controllers)))
    own = {"memory": "/worker", "pids": "/worker", "cpu": "/worker", "cpuacct": "/worker"}
    return tmp_path, mounts, own


def test_v1_uses_each_hierarchy_once_and_cpu_only_when_limited(v1_tree):
    root, mounts, own = v1_tree
    controller = CgroupV1Controller.from_self(mounts, own, remove_dir=shutil.rmtree)
    assert controller.enforces == {"memory", "pids", "cpu"}
    with controller.confine(ResourceLimits()) as confinement:
        dirs = confinement.dirs  # type: ignore[attr-defined]
        assert set(dirs) == {"memory", "pids", "cpuacct"}
        assert confinement.join_tasks == tuple(str(dirs[c] / "tasks") for c in ("memory", "pids", "cpuacct"))
        assert confinement.rlimits == ()

    with controller.confine(ResourceLimits(memory_bytes=1 << 20, max_pids=3, cpu_cores=0.5)) as confinement:
        dirs = confinement.dirs  # type: ignore[attr-defined]
        assert dirs["cpu"] == dirs["cpuacct"]  # co-mounted: one directory
        assert (dirs["memory"] / "memory.limit_in_bytes").read_text() == str(1 << 20)
        assert (dirs["pids"] / "pids.max").read_text() == "5"
        assert (dirs["cpu"] / "cpu.cfs_period_us").read_text() == "100000"
        assert (dirs["cpu"] / "cpu.cfs_quota_us").read_text() == "50000"
        (dirs["memory"] / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
        (dirs["memory"] / "memory.max_usage_in_bytes").write_text("1048576\n")
        (dirs["cpuacct"] / "cpuacct.usage").write_text("1500000000\n")
        (dirs["cpuacct"] / "cpuacct.usage_user").write_text("1000000000\n")
        (dirs["cpuacct"] / "cpuacct.usage_sys").write_text("500000000\n")
        assert confinement.oom_killed()
        usage = confinement.usage()
        assert (usage.memory_peak_bytes, usage.pids_peak, usage.cpu_seconds) == (1 << 20, None, 1.5)
        assert (usage.user_cpu_seconds, usage.system_cpu_seconds) == (1.0, 0.5)
    assert not any(p.exists() for p in dirs.values())


def test_v1_without_memory_or_pids_is_refused(v1_tree):
    _, mounts, own = v1_tree
    cpu_only = [m for m in mounts if "cpu" in m.controllers]
    with pytest.raises(SandboxSetupError, match="no usable cgroup v1"):
        CgroupV1Controller.from_self(cpu_only, own)


# --- rlimits ------------------------------------------------------------------------------


def test_rlimits_limit_data_processes_and_open_files():
    limits = ResourceLimits(memory_bytes=1000, max_pids=4, cpu_cores=2, open_files=99)
    assert action_rlimits(limits) == (
        (resource.RLIMIT_DATA, 1000), (resource.RLIMIT_NPROC, 6), (resource.RLIMIT_NOFILE, 99),
    )
    assert action_rlimits(ResourceLimits()) == ()


def test_rlimit_controller_enforces_no_cpu_and_cannot_see_ooms():
    controller = RlimitController()
    assert controller.enforces == {"memory", "pids"}
    with controller.confine(ResourceLimits(memory_bytes=10)) as confinement:
        assert not confinement.oom_killed()
        assert confinement.usage() is None
