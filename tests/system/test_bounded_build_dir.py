"""The per-action build-directory bound (storage/bounded_staging.py) with real parts: real
bubblewrap, real tmpfs and overlay mounts, the executor as the bot runs it; and a deep tree
left by an action (storage/tree_removal.py).

What must hold: an action that writes past its bound — files or stdout — gets
RESOURCE_EXHAUSTED naming the bound, with its exit code and stderr, and never touches the
worker's disk; one that stays within it gets its outputs; a 5,000-level tree an action
leaves is removed and the executor keeps working.
"""

from __future__ import annotations

import os

import pytest

from conftest import require, require_tool
from executor_fixtures import make_farm

from reapi_worker.protos import code_pb2

BOUND = 4 << 20

DEEP = (
    "import os\n"
    "for _ in range(5000):\n"
    "    os.mkdir('d'); os.chdir('d')\n"
    "open('leaf', 'w').write('x')\n"
)


@pytest.fixture(params=["hardlink", "fuse"])
def bounded(request):
    require_tool("bwrap")
    require(os.geteuid() == 0, "a bounded build directory mounts a tmpfs: root only")
    if request.param == "fuse":
        require_tool("fusermount3")
        require(os.path.exists("/dev/fuse"), "FUSE staging needs /dev/fuse")
    farm = make_farm(max_action_timeout=60, staging=request.param, bound_bytes=BOUND)
    yield farm
    farm.close()


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def build_dirs(farm) -> list[str]:
    farm.remover.drain()
    return [n for n in os.listdir(farm.build_root) if n != ".trash"]


def test_writing_past_the_bound_is_resource_exhausted_naming_it(bounded):
    outcome = bounded.run(
        sh("echo starting; head -c 6000000 /dev/zero > out/big; echo status $? >&2; exit 3"),
        {"input.txt": b"kept"}, output_paths=["out/big"],
    )
    assert outcome.status.code == code_pb2.RESOURCE_EXHAUSTED, outcome.status
    assert "build directory bound of 4 MiB" in outcome.status.message
    assert outcome.result.exit_code == 3  # the action's own account of it is kept
    assert bounded.text(outcome.result.stdout_digest) == "starting\n"
    # stderr shares the full bound: what came after the bound was hit is lost with it.
    assert not outcome.result.output_files  # nothing half-written is captured
    assert build_dirs(bounded) == []
    after = bounded.run(sh("echo fine > out.txt"), output_paths=["out.txt"])
    assert after.ok and after.result.exit_code == 0


def test_stdout_counts_against_the_bound(bounded):
    outcome = bounded.run(sh("head -c 6000000 /dev/zero"))
    assert outcome.status.code == code_pb2.RESOURCE_EXHAUSTED, outcome.status
    assert "build directory bound" in outcome.status.message


def test_writing_up_to_the_bound_is_a_normal_result(bounded):
    size = BOUND - (256 << 10)  # the stdout and stderr files and directories take a little
    outcome = bounded.run(sh(f"head -c {size} /dev/zero > out.bin && echo done"), output_paths=["out.bin"])
    assert outcome.ok, outcome.status
    assert outcome.result.exit_code == 0
    assert [(f.path, f.digest.size_bytes) for f in outcome.result.output_files] == [("out.bin", size)]


def test_the_action_writes_to_a_file_system_of_its_bound_only(bounded):
    # An overlay reports its upper layer's file system: the action's tmpfs, the bound plus
    # one page — not the worker's disk.
    outcome = bounded.run(sh("echo x > made-here && stat -f -c '%S %b' made-here"))
    assert outcome.ok, outcome.status
    page = os.sysconf("SC_PAGE_SIZE")
    assert bounded.text(outcome.result.stdout_digest) == f"{page} {BOUND // page + 1}\n"


def test_a_deep_tree_left_in_a_bounded_build_directory_goes_with_it(bounded):
    outcome = bounded.run(["/usr/bin/python3", "-c", DEEP])
    assert outcome.ok and outcome.result.exit_code == 0, bounded.text(outcome.result.stderr_digest)
    assert build_dirs(bounded) == []
    assert bounded.run(["/bin/true"]).ok


def test_a_deep_tree_left_by_an_action_is_removed_and_the_executor_keeps_working():
    require_tool("bwrap")
    farm = make_farm(max_action_timeout=60, staging="hardlink")  # unbounded: the remover's job
    try:
        outcome = farm.run(["/usr/bin/python3", "-c", DEEP])
        assert outcome.ok and outcome.result.exit_code == 0, farm.text(outcome.result.stderr_digest)
        assert build_dirs(farm) == []
        assert os.listdir(os.path.join(farm.build_root, ".trash")) == []
        again = farm.run(sh("echo again"))
        assert again.ok and farm.text(again.result.stdout_digest) == "again\n"
    finally:
        farm.close()


def test_attack_the_overlay_s_options_in_mountinfo_name_no_worker_path(bounded):
    # overlayfs prints its layers in every mountinfo line of its mount, which the sandbox
    # can read: they are named by descriptor, never by the worker's build paths.
    outcome = bounded.run(sh("cat /proc/self/mountinfo"))
    assert outcome.ok and outcome.result.exit_code == 0
    mountinfo = bounded.text(outcome.result.stdout_digest)
    overlays = [line for line in mountinfo.splitlines() if " - overlay " in line]
    assert overlays and all("lowerdir=/proc/self/fd/" in line for line in overlays), overlays
    assert bounded.top not in mountinfo and bounded.build_root not in mountinfo
