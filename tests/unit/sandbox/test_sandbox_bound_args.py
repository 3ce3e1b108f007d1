"""How the bounds reach the sandbox, as argument lists: the /tmp size, each process's
RLIMIT_NOFILE under cgroups (a shell prefix) and under the rlimit fallback (prlimit)."""

from __future__ import annotations

import subprocess

from reapi_worker.sandbox import ResourceLimits, SandboxRequest
from reapi_worker.sandbox.bwrap_args import ControlFds, HostLayout, bwrap_arguments
from reapi_worker.sandbox.cgroups import limit_prefix, self_join_prefix
from reapi_worker.sandbox.rlimits import rlimit_prefix

LAYOUT = HostLayout(entries=(), env_shim=None)


def _options(limits: ResourceLimits) -> list[str]:
    request = SandboxRequest(
        arguments=("true",), environment={}, input_root="/b", stdout_path="/o", stderr_path="/e", limits=limits,
    )
    return list(bwrap_arguments(request, LAYOUT, ControlFds(3, 4, 5)).options)


def test_tmp_is_sized_only_when_bounded():
    sized = _options(ResourceLimits(tmp_bytes=8 << 20))
    at = sized.index("--tmpfs")
    assert sized[at - 2 : at + 2] == ["--size", str(8 << 20), "--tmpfs", "/tmp"]  # --size binds to the next tmpfs
    assert "--size" not in _options(ResourceLimits())


def test_the_cgroup_prefix_sets_the_open_files_limit_before_exec():
    argv = [*limit_prefix(123), "/bin/sh", "-c", "ulimit -Sn; ulimit -Hn"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["123", "123"]


def test_the_v1_joining_shell_sets_the_open_files_limit_before_exec(tmp_path):
    tasks = tmp_path / "tasks"
    argv = [*self_join_prefix([str(tasks)], open_files=123), "/bin/sh", "-c", "ulimit -Sn; ulimit -Hn"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["123", "123"]
    assert tasks.read_text().strip() == "0"  # and it still joined the cgroup
    assert "ulimit" not in " ".join(self_join_prefix([str(tasks)]))


def test_the_rlimit_fallback_sets_open_files_too():
    prefix = rlimit_prefix("/usr/bin/prlimit", ResourceLimits(open_files=99))
    assert prefix == ("/usr/bin/prlimit", "--nofile=99:99", "--")
