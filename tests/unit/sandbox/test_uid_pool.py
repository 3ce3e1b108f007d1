"""UidPool: one host uid per concurrent action (sandbox/uid_pool.py). In-process: leases,
exhaustion, retirement, thread safety, host-wide claims (real flocks in a temporary
directory), and the ids a pool must refuse."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from conftest import require_tool

from reapi_worker.protos.errors import ResourceExhausted
from reapi_worker.sandbox.errors import SandboxSetupError
from reapi_worker.sandbox.identity import RunAs
from reapi_worker.sandbox.uid_pool import SharedUid, UidPool, parse_uid_range
from reapi_worker.worker.faults import lease_status
from reapi_worker.protos import code_pb2

IDS = range(300000, 300004)


def test_each_lease_has_its_own_uid_with_the_gid_of_the_same_number():
    pool = UidPool(IDS)
    leases = [pool.lease() for _ in IDS]
    assert sorted(lease.run_as.uid for lease in leases) == list(IDS)
    assert all(lease.run_as == RunAs(lease.run_as.uid, lease.run_as.uid) for lease in leases)
    assert pool.free == 0


def test_exhaustion_is_the_workers_shortage_reported_unavailable_never_a_result():
    pool = UidPool(IDS)
    for _ in IDS:
        pool.lease()
    with pytest.raises(ResourceExhausted, match="no sandbox uid free.*sandbox_uid_range") as error:
        pool.lease()
    assert lease_status(error.value).code == code_pb2.UNAVAILABLE


def test_a_released_uid_rests_behind_every_other_free_one():
    pool = UidPool(IDS)
    first = pool.lease()
    first.release()
    seen = [pool.lease().run_as.uid for _ in IDS]
    assert seen[-1] == first.run_as.uid
    assert sorted(seen) == list(IDS)


def test_releasing_twice_gives_the_uid_back_once():
    pool = UidPool(IDS)
    lease = pool.lease()
    lease.release()
    lease.release()
    assert pool.free == len(IDS)


def test_a_retired_uid_is_never_leased_again():
    pool = UidPool(range(300000, 300002))
    stuck = pool.lease()
    stuck.retire("its build directory could not be removed")
    stuck.release()  # too late: done once
    other = pool.lease()
    assert other.run_as.uid != stuck.run_as.uid
    assert pool.retired == {stuck.run_as.uid}
    with pytest.raises(ResourceExhausted, match="1 retired"):
        pool.lease()


def test_concurrent_leases_never_share_a_uid_and_every_uid_comes_back():
    pool = UidPool(range(300000, 300008))
    held: set[int] = set()
    held_lock = threading.Lock()
    clashes: list[int] = []
    start = threading.Barrier(8)

    def action() -> None:
        start.wait()
        for _ in range(500):
            lease = pool.lease()  # 8 threads, 8 uids: never exhausted
            uid = lease.run_as.uid
            with held_lock:
                if uid in held:
                    clashes.append(uid)
                held.add(uid)
            with held_lock:
                held.discard(uid)
            lease.release()

    threads = [threading.Thread(target=action) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert clashes == []
    assert pool.free == 8


def test_the_pool_refuses_the_workers_own_uid_the_cache_owner():
    me = os.geteuid()
    with pytest.raises(SandboxSetupError, match="the worker's own id"):
        UidPool([me + 1, me])


def test_the_pool_refuses_ids_its_user_namespace_does_not_map():
    # A container with remapped ids, for real: a user namespace mapping only its root. A
    # pool there must be refused when it is built, not fail each action's setpriv later.
    require_tool("unshare")
    script = (
        "from reapi_worker.sandbox.uid_pool import UidPool\n"
        "from reapi_worker.sandbox.errors import SandboxSetupError\n"
        "try:\n    UidPool([300000])\nexcept SandboxSetupError as e:\n    print(e)\n"
    )
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", sys.executable, "-c", script], capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "uid 300000, which this worker's user namespace does not map" in done.stdout


def test_an_empty_pool_is_refused():
    with pytest.raises(SandboxSetupError, match="empty"):
        UidPool([])


def test_two_workers_on_one_host_claim_disjoint_ranges(tmp_path):
    candidates = [range(300000, 300004), range(300004, 300008)]
    with UidPool.claim(candidates, str(tmp_path)) as first, UidPool.claim(candidates, str(tmp_path)) as second:
        assert first.ids == tuple(candidates[0])
        assert second.ids == tuple(candidates[1])
        with pytest.raises(SandboxSetupError, match="held by another worker"):
            UidPool.claim(candidates, str(tmp_path))
    # Closed: the ids are free for the next worker.
    with UidPool.claim(candidates, str(tmp_path)) as again:
        assert again.ids == tuple(candidates[0])


def test_an_overlapping_range_is_not_claimed_twice(tmp_path):
    with UidPool.claim([range(300000, 300004)], str(tmp_path)):
        with pytest.raises(SandboxSetupError, match="held by another worker"):
            UidPool.claim([range(300003, 300010)], str(tmp_path))
        # A failed claim holds nothing: the free part of it is still claimable.
        with UidPool.claim([range(300004, 300010)], str(tmp_path)) as rest:
            assert rest.ids[0] == 300004


def test_a_shared_identity_never_runs_out_and_protects_hardlinks_only_for_another_uid():
    me = RunAs(os.geteuid(), os.getegid())
    shared = SharedUid(me)
    assert all(shared.lease().run_as == me for _ in range(3))
    assert shared.protects_hardlinks is False
    assert SharedUid(RunAs(os.geteuid() + 1, os.getegid() + 1)).protects_hardlinks is True


@pytest.mark.parametrize("text", ["", "5", "5-", "-5", "a-b", "9-5", "1 - x"])
def test_a_malformed_range_is_refused(text):
    with pytest.raises(ValueError):
        parse_uid_range(text)


def test_a_range_is_inclusive():
    assert parse_uid_range("200000-200063") == range(200000, 200064)
