"""The page-cache mode's prefetcher without a mount: what it pushes, within which bounds,
never ahead of a pending request, never fetching (the real mount's tests are
tests/system/test_fuse_kernel_backend.py)."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from reapi_worker.protos import re_pb2
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.fuse import kernel_prefetch
from reapi_worker.storage.fuse.inodes import ActionRoot, FileInode
from reapi_worker.storage.fuse.kernel_prefetch import Prefetcher
from reapi_worker.storage.local_cas import LocalCAS


class FakeSession:
    """A pipe stands for /dev/fuse (readable: a request is pending); stores are recorded,
    and a node id in ``unknown`` gets ENOENT (the kernel has no inode for it yet) that many
    times (-1: always)."""

    def __init__(self) -> None:
        self.fd, self.requests_w = os.pipe()
        self.idle = threading.Event()
        self.idle.set()
        self.stored: dict[int, bytes] = {}
        self.unknown: dict[int, int] = {}
        self.enoent: Counter[int] = Counter()  # by node id

    def store(self, nodeid: int, data: bytes) -> int:
        if self.unknown.get(nodeid, 0) != 0:
            self.unknown[nodeid] -= 1
            self.enoent[nodeid] += 1
            return errno.ENOENT
        self.stored[nodeid] = data
        return 0

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.requests_w)


class Rig:
    def __init__(self, tmp_path, **bounds: int) -> None:  # type: ignore[no-untyped-def]
        self.cache = LocalCAS(str(tmp_path / "cache"), max_bytes=1 << 30)  # no remote: nothing can be fetched
        self.session = FakeSession()
        self.prefetcher = Prefetcher(self.session, **bounds)
        self.prefetcher.start()
        self.root = ActionRoot("tok", CasDirectory.empty(self.cache), self.cache, 0, 0, 5.0)
        self._ino = 100

    def file(self, data: bytes, stored: bool = True) -> FileInode:
        digest = self.cache.write(data) if stored else Digest.of_bytes(data)
        self._ino += 1
        return FileInode(self._ino, self.cache, digest, False, 5.0, 0, 0)

    def close(self) -> None:
        self.prefetcher.stop()
        self.session.close()
        self.cache.close()


@pytest.fixture
def rig(tmp_path) -> Iterator[Rig]:  # type: ignore[no-untyped-def]
    made = Rig(tmp_path)
    yield made
    made.close()


def settled(condition: Callable[[], bool]) -> bool:
    """Whether ``condition`` holds within 10 s (the prefetcher works in its own thread)."""
    deadline = time.monotonic() + 10
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def test_small_local_files_are_pushed_whole_once(rig):
    small, empty = rig.file(b"small input\n"), rig.file(b"")
    big = rig.file(b"x" * (kernel_prefetch.FILE_BYTES + 1))
    absent = rig.file(b"only on the remote", stored=False)
    rig.prefetcher.offer_files(rig.root, [small, empty, big, absent])
    rig.prefetcher.offer_files(rig.root, [small])  # listed again: not pushed again
    assert settled(lambda: rig.prefetcher.pushed == 1)
    assert rig.session.stored == {small.ino: b"small input\n"}
    assert settled(lambda: not rig.prefetcher._files)
    assert rig.prefetcher.pushed == 1 and rig.cache.find_missing([absent.digest]) == {absent.digest}  # never fetched


def test_a_root_gets_its_budget_in_pages_and_no_more(tmp_path):
    rig = Rig(tmp_path, root_bytes=3 * 4096 + 100)
    try:
        files = [rig.file(b"ten bytes%d" % i) for i in range(3)] + [rig.file(b"x" * 4097)]  # a page, a page, a page, 2
        rig.prefetcher.offer_files(rig.root, files)
        assert settled(lambda: rig.prefetcher.pushed == 3)
        assert sorted(rig.session.stored) == [file.ino for file in files[:3]] and rig.root.pushed_bytes == 3 * 4096
        rig.prefetcher.offer_files(rig.root, [rig.file(b"past it")])
        assert rig.root.pushed_bytes == 3 * 4096 and not rig.prefetcher._files
    finally:
        rig.close()


def test_the_queue_is_bounded(tmp_path):
    rig = Rig(tmp_path, queue_items=3)
    try:
        os.write(rig.session.requests_w, b"r")  # a request pending: nothing is taken off the queue
        files = [rig.file(b"file %d" % i) for i in range(10)]
        rig.prefetcher.offer_files(rig.root, files)
        assert sum(file.offered for file in files) <= 4  # 3 queued, and maybe 1 taken off already
        os.read(rig.session.fd, 1)
        assert settled(lambda: rig.prefetcher.pushed == sum(file.offered for file in files))
    finally:
        rig.close()


def test_nothing_is_pushed_while_a_request_is_pending(rig):
    os.write(rig.session.requests_w, b"r")
    rig.session.idle.clear()
    rig.prefetcher.offer_files(rig.root, [rig.file(b"waits")])
    time.sleep(0.1)
    assert rig.prefetcher.pushed == 0  # the loop has not read it yet
    os.read(rig.session.fd, 1)  # the loop read it...
    rig.session.idle.set()  # ...and found /dev/fuse empty
    assert settled(lambda: rig.prefetcher.pushed == 1)


def test_an_inode_the_kernel_does_not_know_yet_is_retried_then_left_to_its_read(rig):
    late, never = rig.file(b"late"), rig.file(b"never")
    rig.session.unknown = {late.ino: kernel_prefetch.TRIES - 1, never.ino: -1}
    rig.prefetcher.offer_files(rig.root, [late, never])
    assert settled(lambda: late.ino in rig.session.stored)  # on its last try
    assert settled(lambda: rig.session.enoent[never.ino] == kernel_prefetch.TRIES and not rig.prefetcher._files)
    assert never.ino not in rig.session.stored and rig.session.enoent[never.ino] == kernel_prefetch.TRIES


def directory(rig: Rig, files: dict[str, bytes] = {}, subdirectories: dict[str, CasDirectory] = {}) -> CasDirectory:
    proto = re_pb2.Directory(
        files=[re_pb2.FileNode(name=name, digest=rig.cache.write(data).to_proto()) for name, data in files.items()],
        directories=[re_pb2.DirectoryNode(name=name, digest=node.digest().to_proto())
                     for name, node in subdirectories.items()])
    return CasDirectory.from_digest(rig.cache, rig.cache.write(serialize(proto)))


def test_listed_directories_and_their_subdirectories_are_loaded_if_local_never_fetched(rig):
    grandchild = directory(rig, {"g": b"g"})
    child = directory(rig, {"c": b"c"}, {"grand": grandchild})
    local = directory(rig, {"f": b"f"}, {"child": child})
    local = CasDirectory.from_digest(rig.cache, local.digest())  # nothing loaded below it yet
    remote_only = CasDirectory.from_digest(rig.cache, Digest.of_bytes(b"a Directory only the remote has"))
    rig.prefetcher.offer_directories(rig.root, [remote_only, local])
    assert settled(lambda: local.loaded_entries() is not None)
    loaded_child = local.loaded_entries()["child"]  # type: ignore[index]
    assert settled(lambda: loaded_child.loaded_entries() is not None)  # type: ignore[union-attr]
    assert settled(lambda: not rig.prefetcher._directories)
    assert loaded_child.loaded_entries()["grand"].loaded_entries() is None  # type: ignore[union-attr]  # two levels
    assert remote_only.loaded_entries() is None and rig.prefetcher.loaded == 2


def test_a_request_for_a_directory_being_parsed_waits_for_that_parse(rig, monkeypatch):
    node = directory(rig, {"f": b"f"})
    parsing, release = threading.Event(), threading.Event()
    real_entries = CasDirectory.entries

    def slow_entries(self):  # type: ignore[no-untyped-def]
        parsing.set()
        assert release.wait(10)
        return real_entries(self)

    monkeypatch.setattr(CasDirectory, "entries", slow_entries)
    rig.prefetcher.offer_directories(rig.root, [node])
    assert parsing.wait(10)
    waited = threading.Thread(target=rig.prefetcher.wait_for, args=(node,))
    waited.start()
    waited.join(0.1)
    assert waited.is_alive()  # still parsing
    release.set()
    waited.join(10)
    assert not waited.is_alive() and node.loaded_entries() is not None


def test_what_is_queued_for_a_removed_root_is_dropped(rig):
    os.write(rig.session.requests_w, b"r")  # hold the queue
    files = [rig.file(b"file %d" % i) for i in range(5)]
    rig.prefetcher.offer_files(rig.root, files)
    rig.root.removed = True
    os.read(rig.session.fd, 1)
    assert settled(lambda: not rig.prefetcher._files)
    assert rig.prefetcher.pushed <= 1  # at most the one taken before the removal


def test_a_file_read_before_its_push_is_not_pushed(rig):
    os.write(rig.session.requests_w, b"r")  # hold the queue
    overtaken, other = rig.file(b"read first"), rig.file(b"not read")
    rig.prefetcher.offer_files(rig.root, [rig.file(b"maybe taken already"), overtaken, other])
    overtaken.read = True  # a READ served it meanwhile
    os.read(rig.session.fd, 1)
    assert settled(lambda: other.ino in rig.session.stored)
    assert overtaken.ino not in rig.session.stored


def test_after_the_loop_queued_requests_are_refused_until_the_prefetcher_is_out(tmp_path):
    """KernelSession.refuse_until, on a socket pair standing for /dev/fuse (one message
    per read, as the device gives): a READ nobody would answer any more gets EIO, so a
    push waiting on its page gets through; FORGET gets no answer, as ever."""
    from reapi_worker.storage.fuse import protocol as fuse
    from reapi_worker.storage.fuse.kernel_session import KernelSession

    kernel_end, daemon_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    session = KernelSession(str(tmp_path))
    session.fd = daemon_end.fileno()
    for unique, opcode in ((11, fuse.FORGET), (12, fuse.READ)):
        kernel_end.send(fuse.IN_HEADER.pack(fuse.IN_HEADER.size + 24, opcode, unique, 5, 0, 0, 0, 0, 0) + bytes(24))
    done = threading.Event()
    refusing = threading.Thread(target=session.refuse_until, args=(done, 10.0))
    refusing.start()
    answer = kernel_end.recv(100)
    assert fuse.OUT_HEADER.unpack(answer) == (fuse.OUT_HEADER.size, -errno.EIO, 12)  # the READ; FORGET: none
    done.set()  # the prefetcher is out
    refusing.join(10)
    assert not refusing.is_alive()
    session.fd = -1  # the socket is closed below, the session's own pipe here
    session.close(1.0)
    kernel_end.close()
    daemon_end.close()
