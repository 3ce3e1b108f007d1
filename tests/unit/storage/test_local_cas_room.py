"""LocalCAS keeps its file system from filling by itself: a write that meets ENOSPC evicts
and retries, the free-space watermark is kept as it writes, and when nothing can be
evicted the error is ResourceExhausted with nothing stored and nothing corrupted.

On a real 8 MiB tmpfs (root only): ENOSPC comes from the kernel, not from a fake."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from conftest import require
from reapi_worker.protos.errors import ResourceExhausted
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.local_cas import LocalCAS

DISK = 8 << 20
BLOB = 1 << 20


@pytest.fixture
def small_disk(tmp_path):
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    point = tmp_path / "disk"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(point)], check=True)
    try:
        yield str(point)
    finally:
        subprocess.run(["umount", "--lazy", str(point)], check=True)


def blob(i: int, size: int = BLOB) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (size // 32)


def free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def assert_intact(cas: LocalCAS, digests: list[Digest]) -> int:
    """Every blob still present matches its digest; returns how many are present."""
    present = [d for d in digests if not cas.find_missing([d])]
    for digest in present:
        assert Digest.of_bytes(cas.read(digest)) == digest
    return len(present)


def test_writes_past_the_disk_evict_old_blobs_and_succeed(small_disk):
    # max_bytes far above the disk: only the store's own room-making can save the writes.
    with LocalCAS(os.path.join(small_disk, "cache"), max_bytes=1 << 30) as cas:
        digests = [cas.write(blob(i)) for i in range(24)]  # 24 MiB through an 8 MiB disk
        present = assert_intact(cas, digests)
        assert 0 < present < 24
        assert not cas.find_missing(digests[-1:])  # the newest one is there
        assert cas.stats().evictions >= 24 - present


def test_a_stream_that_meets_enospc_midway_resumes_after_eviction(small_disk):
    import io

    with LocalCAS(os.path.join(small_disk, "cache"), max_bytes=1 << 30) as cas:
        old = [cas.write(blob(i)) for i in range(6)]
        big = blob(99, 4 * BLOB)
        digest = cas.write_stream(io.BytesIO(big))  # no room for 4 MiB until 3+ blobs go
        assert digest == Digest.of_bytes(big)
        assert cas.read(digest) == big
        assert_intact(cas, old)


def test_with_everything_pinned_the_write_fails_cleanly(small_disk):
    root = os.path.join(small_disk, "cache")
    with LocalCAS(root, max_bytes=1 << 30) as cas:
        digests = []
        with cas.pin_set() as pins:
            for i in range(40):
                try:
                    digest = cas.write(blob(i))
                except ResourceExhausted as error:
                    assert "No space left" in str(error) and root in str(error)
                    break
                pins.add([digest])
                digests.append(digest)
            else:
                pytest.fail("an 8 MiB disk took 40 MiB of pinned blobs")
            assert assert_intact(cas, digests) == len(digests)  # nothing pinned was evicted
        assert os.listdir(os.path.join(root, "tmp")) == []  # no partial blob left behind
        cas.write(blob(1000))  # released: room can be made again


def test_the_cache_keeps_its_free_space_watermark_as_it_writes(small_disk):
    keep = 3 << 20
    with LocalCAS(os.path.join(small_disk, "cache"), max_bytes=1 << 30, keep_free_bytes=keep) as cas:
        assert cas.flush_bytes < BLOB  # the watermark is checked at every flush
        for i in range(20):
            cas.write(blob(i))
            # At most one blob and one flush's worth below the mark, never the disk full.
            assert free(small_disk) >= keep - BLOB - cas.flush_bytes
        assert free(small_disk) > 0
