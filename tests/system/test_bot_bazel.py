"""A real client: Bazel builds and tests a small C/C++ workspace remotely through BuildGrid
and our workers, and its outputs equal a local build's, byte for byte.

Bazel is Debian's ``bazel-bootstrap`` (4.2). It runs offline: the repositories it would
download (rules_cc, rules_java, the coverage tools) are local stand-ins in the workspace
(tests/system/bazel_workspace/third_party/). Its actions ask for ``ISA=<token>`` so only
this test's worker takes them.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from bot_fixtures import INSTANCE, Farm
from conftest import REPO, require_tool

pytestmark = pytest.mark.buildgrid

WORKSPACE = REPO / "tests" / "system" / "bazel_workspace"
OUTPUTS = ("hello", "greet/libgreet.a", "greet/greet_test")


def _bazel(workspace: str, output_root: str, *args: str) -> subprocess.CompletedProcess:
    # --nohome_rc: nothing of the developer's own config; Debian's /etc/bazel/bazelrc stays
    # (it points Bazel at its install base). Same action environment for both builds.
    command = ["bazel", "--nohome_rc", f"--output_user_root={output_root}", "--max_idle_secs=30", *args]
    if args[0] in ("build", "test"):
        command += ["--incompatible_strict_action_env", "--show_progress_rate_limit=60"]
    return subprocess.run(command, cwd=workspace, capture_output=True, text=True, timeout=600)


@pytest.fixture
def farm(buildgrid):
    require_tool("bwrap")
    require_tool("bazel")
    farm = Farm(buildgrid)
    yield farm
    for root in ("root-remote", "root-local"):
        path = os.path.join(farm.top, root)
        if os.path.isdir(path):
            subprocess.run(["bazel", "--nohome_rc", f"--output_user_root={path}", "shutdown"],
                           cwd=os.path.join(farm.top, root.replace("root-", "ws-")), capture_output=True, timeout=120)
            subprocess.run(["chmod", "-R", "u+w", path], check=False)  # Bazel leaves read-only trees
    farm.close()


def test_bazel_builds_and_tests_remotely_with_outputs_equal_to_a_local_build(farm):
    worker = farm.start_worker("bazel", 2)
    worker.wait_registered()
    remote_ws = os.path.join(farm.top, "ws-remote")
    local_ws = os.path.join(farm.top, "ws-local")
    shutil.copytree(WORKSPACE, remote_ws)
    shutil.copytree(WORKSPACE, local_ws)

    remote = _bazel(
        remote_ws, os.path.join(farm.top, "root-remote"), "test", "//...",
        f"--remote_executor=grpc://{farm.address}", f"--remote_instance_name={INSTANCE}",
        f"--remote_default_exec_properties=ISA={farm.token}",
        "--spawn_strategy=remote", "--test_output=errors",
    )
    assert remote.returncode == 0, remote.stderr[-4000:]
    assert "2 tests pass" in remote.stderr + remote.stdout
    ran = worker.leases("completed")
    # Compiles, links and both tests ran on our worker (Bazel's own bookkeeping stays local).
    assert len(ran) >= 6 and all(entry["status"] == "OK" for entry in ran)

    local = _bazel(local_ws, os.path.join(farm.top, "root-local"), "build", "//...", "--spawn_strategy=local")
    assert local.returncode == 0, local.stderr[-4000:]
    for path in OUTPUTS:
        with open(os.path.join(remote_ws, "bazel-bin", path), "rb") as built_remotely, \
                open(os.path.join(local_ws, "bazel-bin", path), "rb") as built_locally:
            assert built_remotely.read() == built_locally.read(), f"{path} differs"
    hello = subprocess.run([os.path.join(remote_ws, "bazel-bin", "hello")], capture_output=True, text=True, timeout=30)
    assert hello.stdout == "hello, farm\n"
