"""A disk that fills up while an action runs: the lease is retried, never a stored result
(worker/faults.py, storage/local_cas.py, storage/bounded_staging.py).

Real parts: a ``reapi-worker bot`` process, the real BuildGrid 0.4.4 (its ActionCache is
asked afterwards), real bubblewrap, and a real 64 MiB tmpfs holding the worker's cache and
build root, filled to ENOSPC by the test with a plain file that eviction cannot free.

1. an action starts (it sleeps, then writes a 4 MB output);
2. while it runs the disk is filled to the last byte;
3. capturing the output into the cache meets ENOSPC, evicts what it can, still has no room:
   the lease is reported UNAVAILABLE — BuildGrid requeues it, its ActionCache has no entry,
   the client's Execute has not completed; the worker turns unhealthy (disk critical) and
   every blob left in its cache still matches its digest;
4. the filler is deleted: the action runs again and succeeds with the right output.
"""

from __future__ import annotations

import hashlib
import os
import threading

import grpc
import pytest

from bot_fixtures import INSTANCE, Farm, small_tmpfs, stage_name, staged_builds, until
from conftest import require, require_tool

from reapi_worker.protos import re_grpc, re_pb2

pytestmark = [pytest.mark.buildgrid, pytest.mark.bwrap]

DISK_SIZE = 64 << 20
OUTPUT_BYTES = 4_000_000
EXPECTED = (b"abcdefg\n" * (OUTPUT_BYTES // 8 + 1))[:OUTPUT_BYTES]


@pytest.fixture
def farm(buildgrid):
    require_tool("bwrap")
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    farm = Farm(buildgrid)
    yield farm
    farm.close()


@pytest.fixture
def small_disk(farm):
    with small_tmpfs(farm, DISK_SIZE, "reapi-enospc-disk-") as top:
        yield top


def fill_to_enospc(path: str) -> None:
    """Write zeros to ``path`` until the file system refuses a single byte more."""
    with open(path, "wb", buffering=0) as stream:
        for size in (1 << 20, 4096, 1):
            chunk = bytes(size)
            try:
                while True:
                    stream.write(chunk)
            except OSError as error:
                assert error.errno == 28, error  # ENOSPC


def cache_is_intact(cache_dir: str) -> int:
    """Every blob file in the cache hashes to its name; returns how many there are."""
    count = 0
    objects = os.path.join(cache_dir, "objects")
    for shard in os.listdir(objects):
        for name in os.listdir(os.path.join(objects, shard)):
            with open(os.path.join(objects, shard, name), "rb") as stream:
                assert hashlib.sha256(stream.read()).hexdigest() == name.removesuffix(".x"), name
            count += 1
    return count


def action_cache_entry(farm: Farm, digest) -> re_pb2.ActionResult | None:
    stub = re_grpc.ActionCacheStub(farm._channel)
    try:
        return stub.GetActionResult(re_pb2.GetActionResultRequest(instance_name=INSTANCE, action_digest=digest.to_proto()))
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND, error
        return None


@pytest.mark.parametrize("bound", ["16M", "off"])
def test_a_disk_filled_mid_action_requeues_the_lease_and_stores_no_result(farm, small_disk, bound):
    """``16M``: the action writes to its own bound, the capture meets the full disk (exact).
    ``off``: the action itself meets ENOSPC on the shared disk; the free-space check after
    the run catches it here, as the disk is still full (the racy fallback)."""
    cache_dir = os.path.join(small_disk, "cache")
    worker = farm.start_worker(
        "enospc", 1,
        "--cache-dir", cache_dir, "--build-root", os.path.join(small_disk, "builds"),
        "--build-dir-size", bound, "--disk-low-free", "10%", "--disk-critical-free", "5%",
        "--health-interval-seconds", "0.5",
    )
    worker.wait_registered()
    # Some cached blobs to check afterwards (and for the store to evict when it can).
    warm = farm.execute(farm.action("echo warm > out.txt", outputs=("out.txt",)))
    assert warm.ok and farm.read_output(warm, "out.txt") == b"warm\n"

    digest = farm.action(
        f"sleep 3; yes abcdefg | head -c {OUTPUT_BYTES} > out.bin", outputs=("out.bin",),
    )
    stages: list[str] = []
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("e", farm.execute(
        digest, on_operation=lambda op: stages.append(stage_name(op)))), daemon=True)
    thread.start()
    until(lambda: staged_builds(worker, os.path.join(small_disk, "builds")), 20, "the action to be staged")

    filler = os.path.join(small_disk, "filler")
    fill_to_enospc(filler)  # mid-action: the command is still sleeping

    def refused() -> list[dict]:
        return [e for e in worker.leases("completed") if e.get("status") == "UNAVAILABLE"]

    entries = until(refused, 30, "the lease to be reported UNAVAILABLE")
    # Without a bound, whichever of the worker's own writes (the action's stderr file) or
    # its after-run free-space check meets the full disk first names it.
    whys = ["No space left on device"] if bound != "off" else ["No space left on device", "may have met a full disk"]
    assert any(why in entries[0]["field_message"] for why in whys), entries[0]
    assert entries[0]["action"] == str(digest)
    # Requeued, not answered: BuildGrid stored nothing and the client is still waiting.
    assert action_cache_entry(farm, digest) is None
    assert thread.is_alive() and "result" not in result
    # Every blob left is sound. How many are left is the disk check's business: below the low
    # watermark it evicts what it may, and on a disk this full that can be all of them.
    cache_is_intact(cache_dir)

    os.unlink(filler)
    thread.join(120)
    assert not thread.is_alive(), f"the action did not complete after space returned: {stages}"
    execution = result["e"]
    assert execution.ok, execution.response.status
    assert execution.response.result.exit_code == 0
    assert farm.read_output(execution, "out.bin") == EXPECTED
    assert [e.get("status") for e in worker.leases("completed") if e["action"] == str(digest)] == ["UNAVAILABLE", "OK"]
    assert cache_is_intact(cache_dir) > 0
    assert worker.process.poll() is None
