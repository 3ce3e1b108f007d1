"""How the bounds reach the sandbox: the /tmp size as bubblewrap options, each process's
RLIMIT_NOFILE as an rlimit the spawned process sets on itself, under cgroups and under the
rlimit fallback alike."""

from __future__ import annotations

import resource

from reapi_worker.sandbox import ResourceLimits, SandboxRequest
from reapi_worker.sandbox.bwrap_args import ControlFds, HostLayout, bwrap_arguments
from reapi_worker.sandbox.cgroups import CgroupV1Confinement, CgroupV2Confinement
from reapi_worker.sandbox.rlimits import RlimitController

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


def test_every_controller_gives_the_open_files_limit_to_the_spawned_process(tmp_path):
    limits = ResourceLimits(open_files=123)
    v1 = CgroupV1Confinement({"pids": tmp_path}, remove_dir=lambda _: None, open_files=123)
    v2 = CgroupV2Confinement(tmp_path, remove_dir=lambda _: None, open_files=123)
    for confinement in (v1, v2, RlimitController().confine(limits)):
        assert (resource.RLIMIT_NOFILE, 123) in confinement.rlimits
