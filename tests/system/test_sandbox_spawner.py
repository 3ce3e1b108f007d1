"""The spawner (sandbox/spawner.py): a real helper process starting real children with their
limits, cgroups, network namespace and identity in place from their first instruction."""

from __future__ import annotations

import os
import pathlib
import select
import signal
import threading

import pytest
from conftest import require

from reapi_worker.sandbox import ResourceLimits, SandboxSetupError
from reapi_worker.sandbox.cgroups import CgroupV1Controller, parse_proc_cgroup
from reapi_worker.sandbox.identity import RunAs
from reapi_worker.sandbox.spawner import ChildSetup, SpawnedProcess, Spawner

SH = "/bin/sh"


@pytest.fixture
def spawner():
    made = Spawner()
    yield made
    made.close()


def run(spawner: Spawner, tmp_path, script: str, setup: ChildSetup = ChildSetup(), env=None, extra_fds=()):
    """Run ``sh -c script`` through the spawner; returns (stdout, stderr, the process)."""
    out, err = tmp_path / "out", tmp_path / "err"
    fds = [os.open(os.devnull, os.O_RDONLY), os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
           os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), *extra_fds]
    try:
        child = spawner.spawn([SH, "-c", script], fds, setup, env=env)
    finally:
        for fd in fds[:3]:
            os.close(fd)
    wait(child)
    return out.read_text(), err.read_text(), child


def wait(child: SpawnedProcess, seconds: float = 10) -> None:
    poller = select.poll()
    poller.register(child.pidfd, select.POLLIN)
    assert poller.poll(seconds * 1000), "the child did not exit"
    os.close(child.pidfd)


def test_the_child_gets_exactly_its_descriptors_environment_and_directory(spawner, tmp_path):
    r, w = os.pipe()
    out, _, _ = run(spawner, tmp_path, 'echo "$MARK $(pwd)"; env | sort; ls /proc/self/fd; echo via3 >&3',
                    env={"MARK": "m"}, extra_fds=[w])
    os.close(w)
    lines = out.splitlines()
    assert lines[0] == "m /"
    # Only what was asked for (sh adds PWD, SHLVL and _ itself), nothing of the worker's.
    assert {line.split("=")[0] for line in lines[1:] if "=" in line} <= {"MARK", "PWD", "SHLVL", "_"}
    fds = {line for line in lines[1:] if line.isdigit()}
    assert fds <= {"0", "1", "2", "3", "4"}  # 4 is ls's own directory descriptor
    assert os.read(r, 100) == b"via3\n"
    os.close(r)


def test_rlimits_are_set_soft_and_hard_before_exec(spawner, tmp_path):
    import resource

    out, _, _ = run(spawner, tmp_path, "ulimit -Sn; ulimit -Hn",
                    ChildSetup(rlimits=((resource.RLIMIT_NOFILE, 123),)))
    assert out.split() == ["123", "123"]


@pytest.fixture
def v1_confinement():
    require(os.geteuid() == 0, "creating cgroups needs root here")
    try:
        controller = CgroupV1Controller.from_self()
    except SandboxSetupError as e:
        require(False, f"no cgroup v1 on this host: {e}")
        raise
    with controller.confine(ResourceLimits(max_pids=5)) as confinement:
        yield confinement


def test_the_child_is_born_in_its_v1_cgroups_and_the_spawner_goes_home(spawner, tmp_path, v1_confinement):
    setup = ChildSetup(join_tasks=v1_confinement.join_tasks, home_tasks=v1_confinement.home_tasks)
    out, _, _ = run(spawner, tmp_path, "cat /proc/self/cgroup", setup)
    mine = parse_proc_cgroup(pathlib.Path("/proc/self/cgroup").read_text())
    child = parse_proc_cgroup(out)
    for controller, directory in v1_confinement.dirs.items():
        assert child[controller].endswith("/" + directory.name), (controller, child)
    assert spawner._process is not None
    theirs = parse_proc_cgroup(pathlib.Path(f"/proc/{spawner._process.pid}/cgroup").read_text())
    assert theirs == mine  # back where it was started: the worker's own cgroups


def test_a_step_that_fails_makes_no_child_and_leaves_the_spawner_home(spawner, tmp_path, v1_confinement):
    missing = str(tmp_path / "missing" / "tasks")
    homes = v1_confinement.home_tasks
    setup = ChildSetup(join_tasks=(*v1_confinement.join_tasks, missing), home_tasks=(*homes, homes[0]))
    fds = [os.open(os.devnull, os.O_RDONLY)] * 3
    with pytest.raises(SandboxSetupError, match="cannot join cgroup .*missing"):
        spawner.spawn([SH, "-c", "echo ran > " + str(tmp_path / "ran")], fds, setup)
    os.close(fds[0])
    assert not (tmp_path / "ran").exists()
    assert spawner._process is not None and spawner._process.poll() is None
    mine = parse_proc_cgroup(pathlib.Path("/proc/self/cgroup").read_text())
    assert parse_proc_cgroup(pathlib.Path(f"/proc/{spawner._process.pid}/cgroup").read_text()) == mine


def test_a_missing_program_is_a_set_up_failure_naming_it(spawner, tmp_path):
    fds = [os.open(os.devnull, os.O_RDONLY)] * 3
    with pytest.raises(SandboxSetupError, match="nothing"):
        spawner.spawn([str(tmp_path / "nothing")], fds)
    os.close(fds[0])


def test_as_root_the_child_drops_to_the_identity_with_no_groups(spawner, tmp_path):
    require(os.geteuid() == 0, "switching uid needs root")
    out, _, _ = run(spawner, tmp_path, "id -u; id -g; id -G; grep CapEff /proc/self/status",
                    ChildSetup(run_as=RunAs(65534, 65533)))
    uid, gid, groups, caps = out.splitlines()
    assert (uid, gid, groups) == ("65534", "65533", "65533")
    assert caps.split()[1] == "0000000000000000"  # root's capabilities went with the uid


def test_as_root_the_child_can_have_a_network_namespace_of_its_own(spawner, tmp_path):
    require(os.geteuid() == 0, "a network namespace made before the uid switch needs root")
    out, _, _ = run(spawner, tmp_path, "readlink /proc/self/ns/net", ChildSetup(new_network=True, run_as=RunAs(65534, 65534)))
    assert out.strip() != os.readlink("/proc/self/ns/net")
    plain, _, _ = run(spawner, tmp_path, "readlink /proc/self/ns/net")
    assert plain.strip() == os.readlink("/proc/self/ns/net")


def test_the_child_is_the_spawners_and_is_reaped_there(spawner, tmp_path):
    _, _, child = run(spawner, tmp_path, "true")
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)  # not the caller's child: nothing for it to reap
    deadline = 50
    while os.path.exists(f"/proc/{child.pid}") and deadline:
        with open(f"/proc/{child.pid}/stat") as stat:
            if stat.read().split(") ")[1][0] != "Z":
                break
        deadline -= 1
        threading.Event().wait(0.02)
    assert not os.path.exists(f"/proc/{child.pid}") or deadline, "left a zombie"


def test_a_long_command_line_goes_through_whole(spawner, tmp_path):
    words = [f"w{i:07d}" for i in range(120_000)]  # ~1 MB: far past one socket buffer
    fds = [os.open(os.devnull, os.O_RDONLY), os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
           os.open(os.devnull, os.O_WRONLY)]
    wait(spawner.spawn([SH, "-c", 'for last; do :; done; echo "$#" "$1" "$last"', "sh", *words], fds))
    for fd in fds:
        os.close(fd)
    assert (tmp_path / "out").read_text().split() == ["120000", words[0], words[-1]]


def test_many_threads_spawn_at_once(spawner, tmp_path):
    results: list[str] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            (tmp_path / str(i)).mkdir()
            out, _, _ = run(spawner, tmp_path / str(i), f"echo {i}")
            results.append(out.strip())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results, key=int) == [str(i) for i in range(24)]


def test_a_dead_spawner_is_replaced_by_the_next_call_and_logged(spawner, tmp_path, caplog):
    run(spawner, tmp_path, "true")
    process = spawner._process
    assert process is not None
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    out, _, _ = run(spawner, tmp_path, "echo again")
    assert out == "again\n"
    assert spawner._process is not None and spawner._process.pid != process.pid
    assert f"sandbox spawner (pid {process.pid}) exited with status -9" in caplog.text


def test_a_spawner_that_dies_mid_call_fails_that_call_only(spawner, tmp_path, monkeypatch):
    run(spawner, tmp_path, "true")
    process = spawner._process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)  # alive to poll(), but it will never answer
    threading.Timer(0.3, lambda: os.kill(process.pid, signal.SIGKILL)).start()
    fds = [os.open(os.devnull, os.O_RDONLY)] * 3
    with pytest.raises(SandboxSetupError, match="spawner"):
        spawner.spawn([SH, "-c", "true"], fds)
    os.close(fds[0])
    out, _, _ = run(spawner, tmp_path, "echo again")
    assert out == "again\n"


def test_closing_stops_the_spawner(tmp_path):
    spawner = Spawner()
    run(spawner, tmp_path, "true")
    process = spawner._process
    assert process is not None
    spawner.close()
    assert process.poll() is not None


def test_rlimits_reach_every_child_of_another_uid_however_fast_it_execs(spawner, tmp_path):
    """``posix_spawn`` returns once the child's exec has replaced its memory, which is before
    the kernel commits its new credentials: a ``prlimit`` that then compared ids with the
    half-made child failed now and then (EPERM). 200 spawns in a row find that race."""
    require(os.geteuid() == 0, "switching uid needs root")
    import resource

    setup = ChildSetup(rlimits=((resource.RLIMIT_NOFILE, 77),), run_as=RunAs(65534, 65534))
    for _ in range(200):
        fds = [os.open(os.devnull, os.O_RDONLY)] * 3
        child = spawner.spawn(["/bin/true"], fds, setup)
        os.close(fds[0])
        wait(child)
    out, _, _ = run(spawner, tmp_path, "ulimit -Hn", setup)
    assert out.strip() == "77"
