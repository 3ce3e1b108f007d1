"""LocalCAS: atomic verified entry, executable variants, LRU eviction, pins across processes,
disk full, and a shared size counter.

Eviction tests use blobs of exactly 1,000 bytes, max_bytes=10,000 and a low watermark of 0.5,
and set each blob's mtime (the recorded recency) explicitly, so the expected survivors are
exact. Other processes are real ones (``python -c``), never mocks.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import pathlib
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from conftest import require

from reapi_worker.protos.errors import (
    DataLoss,
    Internal,
    InvalidArgument,
    MissingBlobs,
    NotFound,
    ResourceExhausted,
)
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.local_cas import LocalCAS

T = TypeVar("T")

# A second process sharing the cache: "pin" pins the digests given and waits for stdin to
# close; "write" streams its stdin into the cache (and is killed mid-way by the test).
CHILD = r"""
import sys
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.local_cas import LocalCAS
root, mode, max_bytes, *digests = sys.argv[1:]
cas = LocalCAS(root, max_bytes=int(max_bytes), anonymous_temp_files=mode != "write-named")
if mode == "pin":
    pins = cas.pin_set()
    pins.add(Digest.parse(d) for d in digests)
    print("ready", flush=True)
    sys.stdin.read()
    pins.release()
else:
    print("ready", flush=True)
    cas.write_stream(open(0, "rb", buffering=0))
cas.close()
"""


def blob(i: int, size: int = 1000) -> bytes:
    return (f"blob {i:06d} ".encode() * size)[:size]


def files_in(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def wait_for(condition: Callable[[], T], what: str) -> T:
    """Poll until ``condition()`` is truthy. Not a timing assertion: the limit only stops a
    broken test from hanging."""
    deadline = time.monotonic() + 60
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.01)
    return result


def child(root: pathlib.Path, mode: str, *digests: Digest, max_bytes: int = 10_000) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), mode, str(max_bytes), *map(str, digests)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n", "child failed to start"
    return proc


@pytest.fixture
def root(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "cas"


@pytest.fixture
def cas(root: pathlib.Path) -> Iterator[LocalCAS]:
    with LocalCAS(root) as store:
        yield store


@pytest.fixture
def small(root: pathlib.Path) -> Iterator[LocalCAS]:
    """10 blobs of 1,000 bytes fill it; the 11th evicts down to 5,000 bytes. Every use
    refreshes recency (recency_interval=0)."""
    with LocalCAS(root, max_bytes=10_000, low_watermark=0.5, recency_interval=0) as store:
        yield store


def fill_aged(cas: LocalCAS, count: int = 10) -> list[Digest]:
    """Write ``count`` 1,000-byte blobs, blob i last used i seconds after blob 0."""
    digests = [cas.write(blob(i)) for i in range(count)]
    base = time.time() - 10_000
    for i, digest in enumerate(digests):
        os.utime(cas.object_path(digest), (base + i, base + i))
    return digests


def survivors(cas: LocalCAS, digests: list[Digest]) -> list[int]:
    missing = cas.find_missing(digests)
    return [i for i, digest in enumerate(digests) if digest not in missing]


# ---- storing and reading ----------------------------------------------------------------


def test_write_read_and_find_missing(cas: LocalCAS) -> None:
    digest = cas.write(b"hello")
    assert digest == Digest.of_bytes(b"hello")
    assert cas.read(digest) == b"hello"
    absent = Digest.of_bytes(b"absent")
    assert cas.find_missing([digest, absent]) == {absent}
    assert cas.write_stream(io.BytesIO(b"streamed")) == Digest.of_bytes(b"streamed")
    assert cas.read(Digest.of_bytes(b"streamed")) == b"streamed"
    empty = cas.write(b"")
    assert cas.read(empty) == b"" and cas.find_missing([empty]) == set()


def test_absent_blobs_raise_missing_blobs_naming_every_one(cas: LocalCAS) -> None:
    present = cas.write(b"here")
    absent = [Digest.of_bytes(b"a"), Digest.of_bytes(b"b")]
    with pytest.raises(MissingBlobs) as raised:
        cas.fetch([present, *absent])
    assert raised.value.digests == sorted(absent)
    for call in (cas.read, cas.path):
        with pytest.raises(MissingBlobs):
            call(absent[0])
    cas.fetch([present])  # all local: no error


def test_digest_with_the_wrong_size_is_not_present(cas: LocalCAS) -> None:
    digest = cas.write(b"twelve bytes")
    wrong = Digest(digest.hash, digest.size_bytes + 1)
    assert cas.find_missing([wrong]) == {wrong}
    with pytest.raises(MissingBlobs):
        cas.read(wrong)
    with pytest.raises(MissingBlobs):
        cas.path(wrong)


def test_writing_a_present_blob_is_harmless_and_not_counted_twice(cas: LocalCAS) -> None:
    digest = cas.write(b"x" * 100)
    inode = os.stat(cas.path(digest)).st_ino
    assert cas.write(b"x" * 100) == digest
    assert cas.write_stream(io.BytesIO(b"x" * 100)) == digest
    assert os.stat(cas.path(digest)).st_ino == inode
    assert cas.stats().size_bytes == 100


def test_a_small_stream_already_cached_is_not_written_again(cas: LocalCAS) -> None:
    data = b"an output identical to an earlier one\n"
    digest = cas.write_stream(io.BytesIO(data))

    def no_store(*_args: object, **_kwargs: object) -> Digest:
        raise AssertionError("the bytes were written again")

    cas._store = no_store  # type: ignore[method-assign]
    assert cas.write_stream(io.BytesIO(data)) == digest


def test_a_stream_longer_than_one_chunk_is_stored_whole(cas: LocalCAS) -> None:
    data = os.urandom((5 << 20) // 2)  # 2.5 chunks
    digest = cas.write_stream(io.BytesIO(data))
    assert digest == Digest.of_bytes(data)
    assert cas.read(digest) == data


def test_write_file_stores_a_file_and_refuses_a_final_symlink(cas: LocalCAS, tmp_path: pathlib.Path) -> None:
    source = tmp_path / "source"
    source.write_bytes(b"file contents")
    assert cas.read(cas.write_file(source)) == b"file contents"
    (tmp_path / "link").symlink_to(source)
    with pytest.raises(InvalidArgument):
        cas.write_file(tmp_path / "link")
    with pytest.raises(NotFound):
        cas.write_file(tmp_path / "nothing")


def test_blob_files_are_read_only_and_object_path_matches_path(cas: LocalCAS) -> None:
    digest = cas.write(b"data")
    assert cas.path(digest) == cas.object_path(digest)
    assert stat.S_IMODE(os.stat(cas.path(digest)).st_mode) == 0o644


# ---- verification and atomicity ---------------------------------------------------------


def test_bytes_that_do_not_match_their_claimed_digest_never_enter(cas: LocalCAS, root: pathlib.Path) -> None:
    claimed = Digest.of_bytes(b"what the server promised")
    with pytest.raises(DataLoss) as raised:
        cas.insert(claimed, b"what the server sent")
    assert str(claimed) in raised.value.reason
    with pytest.raises(DataLoss):
        cas.insert_stream(claimed, io.BytesIO(b"what the server sent"))
    # Same hash, too many bytes: refused too, and the stream is not read to its end.
    stream = io.BytesIO(b"what the server promised" + b"!" * (3 << 20))
    with pytest.raises(DataLoss):
        cas.insert_stream(claimed, stream)
    assert stream.tell() < len(stream.getvalue())
    assert cas.find_missing([claimed]) == {claimed}
    assert files_in(root / "objects") == [] and files_in(root / "tmp") == []
    assert cas.stats().size_bytes == 0


def test_a_self_verifying_stream_is_still_held_to_its_size(cas: LocalCAS, root: pathlib.Path) -> None:
    claimed = Digest.of_bytes(b"twelve bytes")
    for sent in (b"eleven byte", b"thirteen byte"):
        with pytest.raises(DataLoss):
            cas.insert_stream(claimed, io.BytesIO(sent), stream_verifies=True)
    assert cas.find_missing([claimed]) == {claimed}
    assert files_in(root / "tmp") == []
    cas.insert_stream(claimed, io.BytesIO(b"twelve bytes"), stream_verifies=True)
    assert cas.read(claimed) == b"twelve bytes"


def test_bytes_that_match_their_claimed_digest_are_stored(cas: LocalCAS) -> None:
    first, second = Digest.of_bytes(b"one"), Digest.of_bytes(b"two")
    cas.insert(first, b"one")
    cas.insert_stream(second, io.BytesIO(b"two"))
    assert cas.read(first) == b"one" and cas.read(second) == b"two"


def test_a_crashed_writer_leaves_no_blob_and_its_temp_file_is_cleaned(root: pathlib.Path) -> None:
    """Named temp files: where the file system cannot make anonymous ones."""
    data = os.urandom(100_000)
    digest = Digest.of_bytes(data)
    writer = child(root, "write-named")
    try:
        assert writer.stdin is not None
        writer.stdin.write(data)  # all of it, but no EOF: the write never completes
        writer.stdin.flush()
        temp = wait_for(
            lambda: [p for p in files_in(root / "tmp") if p.stat().st_size == len(data)],
            "the writer's temp file",
        )[0]
        with LocalCAS(root) as other:  # opening sweeps only dead owners' files
            assert temp.exists()
            assert other.find_missing([digest]) == {digest}
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert temp.exists() and files_in(root / "objects") == []
    with LocalCAS(root) as cas:
        assert files_in(root / "tmp") == []
        assert cas.find_missing([digest]) == {digest}
        assert cas.stats().size_bytes == 0


def test_a_crashed_writer_of_an_anonymous_temp_file_leaves_nothing(root: pathlib.Path) -> None:
    data = os.urandom(100_000)
    digest = Digest.of_bytes(data)
    writer = child(root, "write")
    try:
        assert writer.stdin is not None
        writer.stdin.write(data)  # all of it, but no EOF: the write never completes
        writer.stdin.flush()

        def temp_files() -> list[str]:  # open, nameless, in tmp/, holding every byte
            fds = pathlib.Path(f"/proc/{writer.pid}/fd")
            return [str(fd) for fd in fds.iterdir()
                    if os.readlink(fd).startswith(str(root / "tmp") + "/#") and fd.stat().st_size == len(data)]

        wait_for(temp_files, "the writer's anonymous temp file")
        assert files_in(root / "tmp") == []
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert files_in(root / "tmp") == [] and files_in(root / "objects") == []
    with LocalCAS(root) as cas:
        assert cas.find_missing([digest]) == {digest}
        assert cas.stats().size_bytes == 0


def test_a_blob_just_stored_is_known_present_without_a_stat(cas: LocalCAS, monkeypatch: pytest.MonkeyPatch) -> None:
    """One presence pass per cold fetch: the check after the fetch costs no stat."""
    digests = [cas.write(blob(i)) for i in range(20)]
    stats: list[str] = []
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        stats.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    assert cas.find_missing(digests + [Digest.of_bytes(b"never stored")]) == {Digest.of_bytes(b"never stored")}
    assert len(stats) == 1  # only the absent one


# ---- executable variants ----------------------------------------------------------------


def test_executable_variant_is_a_separate_0755_inode(cas: LocalCAS) -> None:
    digest = cas.write(b"#!/bin/sh\necho hi\n")
    plain, executable = cas.path(digest), cas.path(digest, executable=True)
    assert executable == cas.object_path(digest, executable=True)
    plain_stat, exec_stat = os.stat(plain), os.stat(executable)
    assert plain_stat.st_ino != exec_stat.st_ino
    assert stat.S_IMODE(plain_stat.st_mode) == 0o644
    assert stat.S_IMODE(exec_stat.st_mode) == 0o755
    assert pathlib.Path(executable).read_bytes() == pathlib.Path(plain).read_bytes()
    assert os.stat(cas.path(digest, executable=True)).st_ino == exec_stat.st_ino
    assert cas.stats().size_bytes == 2 * digest.size_bytes  # the variant counts too


def test_executable_variant_of_an_absent_blob_is_missing(cas: LocalCAS) -> None:
    with pytest.raises(MissingBlobs):
        cas.path(Digest.of_bytes(b"nowhere"), executable=True)


# ---- LRU eviction -----------------------------------------------------------------------


def test_eviction_removes_least_recently_used_first_down_to_the_low_watermark(small: LocalCAS) -> None:
    digests = fill_aged(small)
    assert small.evict() == 0  # at max_bytes, not over it
    digests.append(small.write(blob(10)))
    assert survivors(small, digests) == [6, 7, 8, 9, 10]
    stats = small.stats()
    assert (stats.evictions, stats.bytes_evicted, stats.size_bytes) == (6, 6000, 5000)


def test_reading_a_blob_or_releasing_its_pins_records_use(small: LocalCAS) -> None:
    digests = fill_aged(small)
    small.read(digests[0])
    with small.pinned([digests[1]]):
        pass
    digests.append(small.write(blob(10)))
    assert survivors(small, digests) == [0, 1, 8, 9, 10]


def test_executable_variant_is_evicted_with_its_blob(small: LocalCAS, root: pathlib.Path) -> None:
    digests = fill_aged(small, 9)
    small.path(digests[0], executable=True)
    os.utime(small.object_path(digests[0], executable=True), (1, 1))
    digests.append(small.write(blob(10)))  # 11,000 bytes with the variant
    assert survivors(small, digests) == [5, 6, 7, 8, 9]  # blob 0 was 2,000 bytes
    assert not any(p.name.endswith(".x") for p in files_in(root / "objects"))


# ---- pins -------------------------------------------------------------------------------


def test_pinned_blobs_survive_eviction(small: LocalCAS) -> None:
    digests = fill_aged(small)
    with small.pinned(digests[:2]):
        digests.append(small.write(blob(10)))
        assert survivors(small, digests) == [0, 1, 8, 9, 10]


def test_a_pin_set_protects_blobs_that_arrive_after_it(small: LocalCAS) -> None:
    later = Digest.of_bytes(blob(0))
    with small.pin_set() as pins:
        pins.add([later])
        digests = fill_aged(small)  # blob 0 is the oldest
        digests.append(small.write(blob(10)))
        assert 0 in survivors(small, digests)
    with pytest.raises(Internal, match="after release"):
        pins.add([later])


def test_a_released_pin_set_protects_nothing_even_when_its_file_is_reused(
    small: LocalCAS, root: pathlib.Path
) -> None:
    digests = fill_aged(small)
    with small.pinned(digests[:2]):
        pass
    fill_aged(small)  # age them again: releasing recorded them as just used
    with small.pinned([digests[2]]):
        assert len(files_in(root / "pins")) == 1  # the released file, emptied and reused
        digests.append(small.write(blob(10)))
        assert survivors(small, digests) == [2, 7, 8, 9, 10]


def test_pins_of_another_process_survive_eviction(small: LocalCAS, root: pathlib.Path) -> None:
    digests = fill_aged(small)
    pinner = child(root, "pin", *digests[:3])
    try:
        digests.append(small.write(blob(10)))
        assert survivors(small, digests) == [0, 1, 2, 9, 10]
    finally:
        pinner.communicate(timeout=60)  # closes its stdin: it releases and exits
    assert pinner.returncode == 0
    assert files_in(root / "pins") == []


def test_pins_of_a_dead_process_are_cleaned(small: LocalCAS, root: pathlib.Path) -> None:
    digests = fill_aged(small)
    pinner = child(root, "pin", *digests[:3])
    pinner.send_signal(signal.SIGKILL)
    pinner.wait()
    assert len(files_in(root / "pins")) == 1 and len(files_in(root / "owners")) == 2
    digests.append(small.write(blob(10)))
    assert survivors(small, digests) == [6, 7, 8, 9, 10]
    assert files_in(root / "pins") == [] and len(files_in(root / "owners")) == 1


def test_pins_alone_over_max_bytes_are_resource_exhausted(small: LocalCAS) -> None:
    data = [blob(i) for i in range(11)]
    with small.pinned(Digest.of_bytes(d) for d in data):
        for d in data[:10]:
            small.write(d)
        with pytest.raises(ResourceExhausted, match="pinned"):
            small.write(data[10])
        assert small.find_missing(Digest.of_bytes(d) for d in data) == set()


# ---- size counter -----------------------------------------------------------------------


def test_size_counter_is_shared_and_rebuilt_when_lost(root: pathlib.Path) -> None:
    with LocalCAS(root, max_bytes=10_000) as first:
        with LocalCAS(root, max_bytes=10_000) as second:
            for i in range(3):
                first.write(blob(i))
            second.write(blob(0))  # already there: not counted again
            first.close()
            assert second.stats().size_bytes == 3000
    (root / "size").write_bytes(b"garbage")
    with LocalCAS(root, max_bytes=10_000) as reopened:
        assert reopened.stats().size_bytes == 3000


def test_an_overestimated_counter_is_resynced_by_an_eviction_pass(root: pathlib.Path) -> None:
    with LocalCAS(root, max_bytes=10_000) as cas:
        cas.write(blob(0))
    (root / "size").write_bytes(b"%020d %020d\n" % (99_999, 0))
    with LocalCAS(root, max_bytes=10_000) as cas:
        cas.write(blob(1))  # the counter says 100,999 > max: a pass scans 2,000
        stats = cas.stats()
        assert (stats.size_bytes, stats.evictions) == (2000, 0)


def test_invalid_parameters_are_refused(root: pathlib.Path) -> None:
    with pytest.raises(InvalidArgument):
        LocalCAS(root, max_bytes=0)
    with pytest.raises(InvalidArgument):
        LocalCAS(root, low_watermark=1.5)


# ---- disk full --------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 256 KiB tmpfs mounted for the test (needs root)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ).returncode == 0
    require(mounted, "mounting a tmpfs needs root")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_disk_full_is_resource_exhausted_and_leaves_no_temp_file(tiny_fs: pathlib.Path) -> None:
    root = tiny_fs / "cas"
    with LocalCAS(root) as cas:
        big = os.urandom(1 << 20)
        with pytest.raises(ResourceExhausted, match="No space left"):
            cas.write(big)
        with pytest.raises(ResourceExhausted):
            cas.write_stream(io.BytesIO(big))
        with pytest.raises(ResourceExhausted):
            cas.insert(Digest.of_bytes(big), big)
        assert files_in(root / "tmp") == []
        assert cas.find_missing([Digest.of_bytes(big)]) == {Digest.of_bytes(big)}
        assert cas.read(cas.write(b"small")) == b"small"  # still consistent and usable
        assert cas.stats().size_bytes == len(b"small")


# ---- threads ----------------------------------------------------------------------------


def test_many_threads_share_one_cache(root: pathlib.Path) -> None:
    with LocalCAS(root, max_bytes=256 << 10) as cas, cas.pin_set() as shared_pins:

        def work(thread: int) -> list[Digest]:
            pinned = []
            for i in range(40):
                data = os.urandom(1000 + (i * 37) % 1000)
                digest = Digest.of_bytes(data)
                if i % 8 == 0:
                    shared_pins.add([digest])
                    pinned.append(digest)
                assert cas.write(data) == digest
                if i % 8 == 0:
                    cas.path(digest, executable=True)
                for earlier in pinned:
                    assert Digest.of_bytes(cas.read(earlier)) == earlier
            return pinned

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            pinned = [d for result in pool.map(work, range(8)) for d in result]
        assert cas.stats().evictions > 0
        for digest in pinned:
            assert Digest.of_bytes(pathlib.Path(cas.path(digest, executable=True)).read_bytes()) == digest


def test_blobs_of_the_first_layout_get_today_s_modes_when_the_root_is_next_opened(tmp_path: pathlib.Path) -> None:
    root = str(tmp_path / "cas")
    with LocalCAS(root, max_bytes=1 << 20) as cas:
        digest = cas.write(b"#!/bin/sh\n")
        plain, executable = cas.path(digest), cas.path(digest, executable=True)
    # What a worker of the first layout left: 0444/0555 blobs, no marker.
    os.chmod(plain, 0o444)
    os.chmod(executable, 0o555)
    os.unlink(os.path.join(root, "modes-2"))
    with LocalCAS(root, max_bytes=1 << 20) as cas:
        assert stat.S_IMODE(os.stat(cas.path(digest)).st_mode) == 0o644
        assert stat.S_IMODE(os.stat(cas.path(digest, executable=True)).st_mode) == 0o755
        assert cas.read(digest) == b"#!/bin/sh\n"
    # Once done, never again: the marker says so.
    os.chmod(plain, 0o444)
    with LocalCAS(root, max_bytes=1 << 20):
        assert stat.S_IMODE(os.stat(plain).st_mode) == 0o444
