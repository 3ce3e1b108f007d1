"""The spawner (sandbox/spawner.py): a real helper process forking real children, which set
their own limits, cgroups, network namespace and identity before they exec."""

from __future__ import annotations

import os
import select
import signal
import threading

import pytest
from conftest import require

from reapi_worker.sandbox import SandboxSetupError
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


def test_the_child_writes_its_own_thread_into_every_tasks_file(spawner, tmp_path):
    files = [tmp_path / "a.tasks", tmp_path / "b tasks"]
    for f in files:
        f.write_text("")
    out, _, _ = run(spawner, tmp_path, "echo ran", ChildSetup(join_tasks=tuple(map(str, files))))
    assert out == "ran\n"
    # "0" is "the calling thread" to the kernel: no pid to get wrong, and no global lock.
    assert [f.read_text() for f in files] == ["0", "0"]


def test_a_step_that_fails_is_reported_and_the_command_never_runs(spawner, tmp_path):
    out, err, _ = run(spawner, tmp_path, "echo ran", ChildSetup(join_tasks=(str(tmp_path / "missing" / "tasks"),)))
    assert out == ""
    assert "reapi-worker sandbox: cannot join cgroup" in err and "missing" in err


def test_a_missing_program_is_reported_on_stderr(spawner, tmp_path):
    fds = [os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_WRONLY),
           os.open(tmp_path / "err", os.O_WRONLY | os.O_CREAT)]
    wait(spawner.spawn([str(tmp_path / "nothing")], fds))
    for fd in fds:
        os.close(fd)
    assert "cannot exec" in (tmp_path / "err").read_text()


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


def test_a_dead_spawner_is_replaced_by_the_next_call(spawner, tmp_path):
    run(spawner, tmp_path, "true")
    process = spawner._process
    assert process is not None
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    out, _, _ = run(spawner, tmp_path, "echo again")
    assert out == "again\n"
    assert spawner._process is not None and spawner._process.pid != process.pid


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
