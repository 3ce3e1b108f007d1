"""Each per-action bound exceeded by a hostile action, with an innocent action running beside
it: real bubblewrap, real cgroups (v1 on this machine kind), real tmpfs, real FUSE.

Every hostile action stops itself at a ceiling, so a bound that failed to hold could not
hurt the machine: the fork bomb forks a fixed number of sleepers, the hog stops at 512 MiB,
the flood writes at most 64 MiB, the /tmp filler at most 64 MiB. The innocent action must
end exactly as it would alone: status OK, exit 0, its own output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import require, require_tool
import executor_fixtures
from executor_fixtures import Farm, make_farm, shared_fuse_mount
from fakes.cas_server import FakeCasServer

from reapi_worker.protos import code_pb2, re_pb2
from reapi_worker.sandbox.bubblewrap import BubblewrapRunner
from reapi_worker.sandbox.request import ResourceLimits
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.worker.compose import open_executor
from reapi_worker.worker.config import load_config
from reapi_worker.worker.executor import Executor, ExecutorConfig, Outcome

MiB = 1 << 20


def _sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def bounded_farm(limits: ResourceLimits, staging: str = "hardlink") -> Farm:
    """A farm whose executor runs every action under ``limits``."""
    require_tool("bwrap")
    runner = BubblewrapRunner()
    require(runner.controller.kind.startswith("cgroup"), "per-action bounds need a cgroup controller")
    farm = make_farm(staging=staging)
    config = ExecutorConfig(
        build_root=farm.build_root, worker_name="test-worker", max_action_timeout=30,
        limits=limits,
    )
    assert farm.store is not None
    farm.executor = Executor(farm.store, farm.stager, runner, config)
    return farm


@pytest.fixture
def farms():
    made: list[Farm] = []

    def make(limits: ResourceLimits, staging: str = "hardlink") -> Farm:
        made.append(bounded_farm(limits, staging))
        return made[-1]

    yield make
    for farm in made:
        farm.close()


INNOCENT = "seq 1 2000 > /tmp/numbers && sort -n /tmp/numbers | tail -n 1 > out.txt && echo innocent done"


def run_beside_innocent(farm: Farm, hostile: list[str], **hostile_fields) -> tuple[Outcome, Outcome]:
    """Run the hostile action and the innocent one at the same time; check the innocent one."""
    hostile_action = farm.action(hostile, **hostile_fields)
    innocent_action = farm.action(_sh(INNOCENT), output_paths=["out.txt"])
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(farm.executor.execute, hostile_action)
        good = pool.submit(farm.executor.execute, innocent_action)
        bad_outcome, good_outcome = bad.result(), good.result()
    assert good_outcome.status.code == code_pb2.OK, good_outcome.status
    assert good_outcome.result.exit_code == 0
    assert farm.text(good_outcome.result.stdout_digest) == "innocent done\n"
    (out,) = good_outcome.result.output_files
    assert farm.cache.read(Digest.from_proto(out.digest)) == b"2000\n"
    return bad_outcome, good_outcome


def test_fork_bomb_is_stopped_by_the_pids_bound_and_named(farms):
    farm = farms(ResourceLimits(max_pids=32))
    bomb = "i=0; while [ $i -lt 300 ]; do sleep 60 & i=$((i+1)); done; wait"
    outcome, _ = run_beside_innocent(farm, _sh(bomb))
    assert outcome.status.code == code_pb2.RESOURCE_EXHAUSTED, outcome.status
    assert "action_pids" in outcome.status.message and "32" in outcome.status.message
    assert outcome.result.exit_code != 0
    assert "fork" in farm.text(outcome.result.stderr_digest).lower()


def test_memory_hog_is_reported_as_out_of_memory(farms):
    farm = farms(ResourceLimits(memory_bytes=64 * MiB))
    hog = "import sys\nblocks = []\nfor _ in range(512):\n    blocks.append(bytearray(1 << 20))\nprint('never')"
    outcome, _ = run_beside_innocent(farm, ["/usr/bin/python3", "-c", hog])
    assert outcome.status.code == code_pb2.RESOURCE_EXHAUSTED, outcome.status
    assert "out of memory" in outcome.status.message and "64 MiB" in outcome.status.message
    assert outcome.result.exit_code == 137
    assert farm.text(outcome.result.stdout_digest) == ""


def test_huge_stdout_is_cut_at_its_bound_and_the_action_killed(farms):
    farm = farms(ResourceLimits(stream_bytes=1 * MiB))
    outcome, _ = run_beside_innocent(farm, _sh("head -c 67108864 /dev/zero | tr '\\0' x; echo never >&2"))
    assert outcome.status.code == code_pb2.RESOURCE_EXHAUSTED, outcome.status
    assert "action_stream_size" in outcome.status.message and "1 MiB" in outcome.status.message
    assert outcome.result.stdout_digest.size_bytes == 1 * MiB
    assert farm.text(outcome.result.stdout_digest) == "x" * MiB
    assert "never" not in farm.text(outcome.result.stderr_digest)


def test_stdout_exactly_at_its_bound_is_an_ordinary_result(farms):
    farm = farms(ResourceLimits(stream_bytes=4096))
    outcome = farm.run(_sh("head -c 4096 /dev/zero | tr '\\0' y; echo fine >&2"))
    assert outcome.status.code == code_pb2.OK, outcome.status
    assert (outcome.result.exit_code, outcome.result.stdout_digest.size_bytes) == (0, 4096)
    assert farm.text(outcome.result.stderr_digest) == "fine\n"


def test_tmp_filled_past_its_size_is_named(farms):
    require(os.geteuid() == 0, "seeing a full /tmp after the run needs a root worker")
    farm = farms(ResourceLimits(tmp_bytes=8 * MiB))
    outcome, _ = run_beside_innocent(farm, _sh("head -c 67108864 /dev/zero > /tmp/fill"))
    assert outcome.status.code == code_pb2.RESOURCE_EXHAUSTED, outcome.status
    assert "action_tmp_size" in outcome.status.message and "8 MiB" in outcome.status.message
    assert "No space left on device" in farm.text(outcome.result.stderr_digest)


def test_tmp_within_its_size_is_an_ordinary_result(farms):
    farm = farms(ResourceLimits(tmp_bytes=8 * MiB))
    outcome = farm.run(_sh("head -c 4194304 /dev/zero > /tmp/half && df -k /tmp | tail -n 1"))
    assert outcome.status.code == code_pb2.OK, outcome.status
    assert farm.text(outcome.result.stdout_digest).split()[1] == "8192"  # 1K-blocks: the size


def test_a_failing_action_with_room_in_tmp_keeps_its_own_result(farms):
    farm = farms(ResourceLimits(tmp_bytes=8 * MiB))
    outcome = farm.run(_sh("echo small > /tmp/f; exit 3"))
    assert outcome.status.code == code_pb2.OK, outcome.status
    assert outcome.result.exit_code == 3


def test_open_files_bound_is_each_processs_rlimit(farms):
    farm = farms(ResourceLimits(open_files=200))
    outcome = farm.run(_sh("ulimit -Sn; ulimit -Hn"))
    assert farm.text(outcome.result.stdout_digest) == "200\n200\n"


# -- FUSE: many opens against the per-action quota ------------------------------------------


def require_fuse() -> None:
    require_tool("fusermount3")
    require(os.geteuid() == 0 and os.path.exists("/dev/fuse"), "FUSE staging needs root and /dev/fuse")


@pytest.fixture(params=executor_fixtures.FUSE_BACKENDS)
def fuse_quota(request):
    """The shared mount on each backend, with a quota of 40 open files per action."""
    require_fuse()
    executor_fixtures.fuse_backend = request.param
    mount = shared_fuse_mount()
    mount.limit_open_files(40)
    yield mount
    mount.limit_open_files(None)
    executor_fixtures.fuse_backend = "auto"


HOLD_OPEN = """
import errno, os
held = []
try:
    for i in range(300):
        held.append(open(f"in/{i % 150}", "rb"))
except OSError as e:
    print(len(held), errno.errorcode[e.errno])
else:
    print(len(held), "all")
"""


def test_many_opens_through_fuse_never_exhaust_the_worker(farms, fuse_quota):
    """Where the daemon holds a descriptor per open file (pyfuse3, kernel-passthrough),
    the quota makes the action past it get EMFILE, and no other action notices; the
    page-cache mode (kernel) is told of no open, holds no descriptor for them
    (test_fuse_kernel_backend.py), so there is nothing to bound and every open works."""
    farm = farms(ResourceLimits(), staging="fuse")
    inputs = {f"in/{i}": f"blob {i}\n".encode() for i in range(150)}
    innocent_script = "cat " + " ".join(f"in/{i}" for i in range(30)) + " > out.txt && echo innocent done"
    hostile = farm.action(["/usr/bin/python3", "-c", HOLD_OPEN], inputs)
    innocent = farm.action(_sh(innocent_script), inputs, output_paths=["out.txt"])
    with ThreadPoolExecutor(2) as pool:
        bad, good = pool.submit(farm.executor.execute, hostile), pool.submit(farm.executor.execute, innocent)
        bad_outcome, good_outcome = bad.result(), good.result()
    assert bad_outcome.status.code == code_pb2.OK, bad_outcome.status
    expected = "300 all\n" if fuse_quota.backend_in_use == "kernel" else "40 EMFILE\n"
    assert farm.text(bad_outcome.result.stdout_digest) == expected
    assert good_outcome.status.code == code_pb2.OK, good_outcome.status
    (out,) = good_outcome.result.output_files
    assert farm.cache.read(Digest.from_proto(out.digest)) == b"".join(f"blob {i}\n".encode() for i in range(30))
    assert fuse_quota.open_files() == 0 and fuse_quota.open_descriptors() == 0


SAME_BLOB = """
held = [open("in/same", "rb") for _ in range(30)]
print(sum(len(f.read()) for f in held))
"""


def test_opens_of_one_blob_share_one_descriptor(farms, fuse_quota):
    farm = farms(ResourceLimits(), staging="fuse")
    outcome = farm.run(["/usr/bin/python3", "-c", SAME_BLOB], {"in/same": b"z" * 1000})
    assert outcome.status.code == code_pb2.OK, outcome.status
    assert farm.text(outcome.result.stdout_digest) == "30000\n"


# -- the defaults, with no bound configured -------------------------------------------------


def test_a_worker_configured_with_no_bound_runs_every_action_bounded():
    """From a config that names no bound, through the composition root, to the sandbox."""
    require_tool("bwrap")
    top = tempfile.mkdtemp(prefix="reapi-worker-test-", dir="/tmp")
    os.chmod(top, 0o755)
    try:
        with FakeCasServer() as cas:
            cfg = load_config(None, {
                "remote": f"grpc://{cas.address}", "cache_dir": os.path.join(top, "cache"),
                "build_root": os.path.join(top, "builds"), "concurrency": 2,
            })
            expected = cfg.action_bounds.limits
            script = "ulimit -n; df -k /tmp | tail -n 1 | awk '{print $2}'; head -c 300000000 /dev/zero"
            command = re_pb2.Command(arguments=["/bin/sh", "-c", script], environment_variables=[
                re_pb2.Command.EnvironmentVariable(name="PATH", value="/usr/bin:/bin")])
            empty_root = cas.put(serialize(re_pb2.Directory()))
            action = re_pb2.Action(
                command_digest=cas.put(serialize(command)).to_proto(), input_root_digest=empty_root.to_proto(),
                do_not_cache=True,
            )
            with open_executor(cfg) as graph:
                outcome = graph.executor.execute(cas.put(serialize(action)), action)
                stdout_size = outcome.result.stdout_digest.size_bytes
                with open(graph.cache.path(Digest.from_proto(outcome.result.stdout_digest)), "rb") as stream:
                    head = stream.read(4096)
        assert None not in (expected.memory_bytes, expected.max_pids, expected.cpu_cores, expected.tmp_bytes)
        # 300 MB of output against the 256 MiB default: cut, killed, and named.
        assert outcome.status.code == code_pb2.RESOURCE_EXHAUSTED, outcome.status
        assert "action_stream_size" in outcome.status.message
        assert stdout_size == expected.stream_bytes == 256 * MiB
        open_files, tmp_kib = head.split(b"\0", 1)[0].split()[:2]
        assert int(open_files) == expected.open_files
        assert int(tmp_kib) * 1024 == expected.tmp_bytes
    finally:
        shutil.rmtree(top, ignore_errors=True)
