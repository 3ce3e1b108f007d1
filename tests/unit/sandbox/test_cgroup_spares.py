"""SpareCgroups (sandbox/cgroup_spares.py) on plain directories standing in for hierarchies,
and the controllers taking their cgroups from it."""

from __future__ import annotations

import itertools
import shutil
import time

from reapi_worker.sandbox import ResourceLimits
from reapi_worker.sandbox.cgroup_spares import SpareCgroups
from reapi_worker.sandbox.cgroups import CgroupV1Controller, CgroupV2Controller


def until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.005)


def test_spares_exist_under_every_parent_and_are_made_again_once_taken(tmp_path):
    parents = [tmp_path / "memory", tmp_path / "pids"]
    for p in parents:
        p.mkdir()
    names = (f"spare-{n}" for n in itertools.count())
    spares = SpareCgroups([*parents, parents[0]], lambda: next(names), count=2, remove_dir=shutil.rmtree)
    assert spares.parents == tuple(parents)  # one directory per hierarchy
    until(lambda: spares.ready() == 2)
    first = spares.take()
    assert first is not None
    taken, prepared = first
    assert prepared is None and all((p / taken).is_dir() for p in parents)
    until(lambda: spares.ready() == 2)  # made again
    assert len(list(parents[1].iterdir())) == 3  # the one taken, and two ready
    assert spares.take() != first


def test_when_they_cannot_be_made_nothing_is_ready_and_nothing_is_left_half_made(tmp_path):
    good, missing = tmp_path / "good", tmp_path / "missing"
    good.mkdir()
    spares = SpareCgroups([good, missing], lambda: "x", count=2)
    time.sleep(0.1)
    assert spares.take() is None
    assert list(good.iterdir()) == []


def test_v1_actions_use_a_spare_and_make_only_what_it_lacks(tmp_path):
    parents = {c: tmp_path / c / "reapi-worker" for c in ("memory", "pids", "cpuacct")}
    parents["cpu"] = tmp_path / "cpu" / "reapi-worker"  # not co-mounted here: never made ahead
    for p in parents.values():
        p.mkdir(parents=True)
    controller = CgroupV1Controller(parents, remove_dir=shutil.rmtree, spares=1)
    assert controller.spares is not None
    until(lambda: controller.spares.ready() == 1)
    (ready,) = [d.name for d in parents["memory"].iterdir()]
    with controller.confine(ResourceLimits(memory_bytes=1 << 20, cpu_cores=1)) as confinement:
        dirs = confinement.dirs  # type: ignore[attr-defined]
        assert {d.name for d in dirs.values()} == {ready}
        assert (dirs["memory"] / "memory.limit_in_bytes").read_text() == str(1 << 20)
        assert (dirs["cpu"] / "cpu.cfs_quota_us").read_text() == "100000"
    assert not any(d.exists() for d in dirs.values())


def test_v2_actions_use_a_spare(tmp_path):
    parent = tmp_path / "reapi-worker"
    parent.mkdir()
    controller = CgroupV2Controller(parent, frozenset({"memory", "pids"}), remove_dir=shutil.rmtree, spares=1)
    assert controller.spares is not None
    until(lambda: controller.spares.ready() == 1)
    (ready,) = list(parent.iterdir())
    with controller.confine(ResourceLimits(max_pids=3)) as confinement:
        assert confinement.path == ready  # type: ignore[attr-defined]
        assert (ready / "pids.max").read_text() == "5"


def test_closing_removes_the_spares_and_makes_no_more(tmp_path):
    parent = tmp_path / "pids"
    parent.mkdir()
    names = (f"spare-{n}" for n in itertools.count())
    spares = SpareCgroups([parent], lambda: next(names), count=3, remove_dir=shutil.rmtree)
    until(lambda: spares.ready() == 3)
    taken = spares.take()[0]  # type: ignore[index]
    spares.close()
    time.sleep(0.05)
    assert [d.name for d in parent.iterdir()] == [taken]  # the one taken is its taker's
    assert spares.take() is None and spares.held() == set()


def test_a_spare_is_prepared_with_the_last_actions_bounds_and_used_only_for_equal_ones(tmp_path):
    parents = {c: tmp_path / c / "reapi-worker" for c in ("memory", "pids", "cpuacct")}
    for p in parents.values():
        p.mkdir(parents=True)
    controller = CgroupV1Controller(parents, remove_dir=shutil.rmtree, spares=1)
    assert controller.spares is not None
    bounds = ResourceLimits(memory_bytes=1 << 20, max_pids=3)
    until(lambda: controller.spares.ready() == 1)
    with controller.confine(bounds):
        pass  # the first action: no bounds known yet, its spare gets its limits written now
    until(lambda: controller.spares.ready() == 1)
    (prepared,) = controller.spares.held()
    assert (parents["memory"] / prepared / "memory.limit_in_bytes").read_text() == str(1 << 20)
    assert (parents["pids"] / prepared / "pids.max").read_text() == "5"
    with controller.confine(ResourceLimits(memory_bytes=1 << 20, max_pids=3, open_files=9)) as same:
        assert same.dirs["memory"].name == prepared  # type: ignore[attr-defined]
    until(lambda: controller.spares.ready() == 1)
    (unfit,) = controller.spares.held()
    with controller.confine(ResourceLimits(max_pids=7)) as other:
        dirs = other.dirs  # type: ignore[attr-defined]
        assert dirs["pids"].name != unfit and not (parents["pids"] / unfit).exists()  # removed, not reused
        assert (dirs["pids"] / "pids.max").read_text() == "9"
        assert not (dirs["memory"] / "memory.limit_in_bytes").exists()  # no limit it did not ask for
