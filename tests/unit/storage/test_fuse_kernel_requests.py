"""The /dev/fuse backend's request handling, byte for byte, without a mount: requests are
built as the kernel lays them out, answers recorded by a stand-in for the session.

What must hold: every request that expects an answer gets exactly one (an errno for a
malformed or hostile one), none is answered that must not be, and nothing a request carries
stops the handler (the real mount's tests are tests/system/test_fuse_kernel_backend.py).
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time

import pytest

from reapi_worker.protos import re_pb2
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.fuse import kernel_requests
from reapi_worker.storage.fuse import protocol as fuse
from reapi_worker.storage.fuse.inodes import ROOT_INODE, ActionRoot, InodeTable
from reapi_worker.storage.fuse.kernel_requests import KernelRequests
from reapi_worker.storage.local_cas import LocalCAS


class FakeSession:
    """Records replies; hands out backing ids unless ``passthrough`` is off."""

    def __init__(self, passthrough: bool = True) -> None:
        self.passthrough = passthrough
        self.replies: list[tuple[int, int, bytes]] = []
        self.open_ids: set[int] = set()
        self.closed: list[int] = []
        self._next = 7

    def reply(self, unique: int, error: int, *payload: bytes) -> None:
        self.replies.append((unique, error, b"".join(payload)))

    def backing_open(self, fd: int) -> int | None:
        os.fstat(fd)  # a real descriptor
        self._next += 1
        self.open_ids.add(self._next)
        return self._next

    def backing_close(self, backing: int) -> None:
        self.open_ids.remove(backing)
        self.closed.append(backing)


class FakePrefetcher:
    """Records what the page-cache mode offers to prefetch."""

    def __init__(self) -> None:
        self.files: list[str] = []
        self.directories: list[object] = []

    def offer_files(self, root, files) -> None:  # type: ignore[no-untyped-def]
        self.files += [str(file.digest) for file in files]

    def offer_directories(self, root, directories) -> None:  # type: ignore[no-untyped-def]
        self.directories += directories

    def wait_for(self, node) -> None:  # type: ignore[no-untyped-def]
        pass  # never parsing anything


class Rig:
    def __init__(self, tmp_path, passthrough: bool = True, per_action: int | None = None,  # type: ignore[no-untyped-def]
                 page_cache: bool = False) -> None:
        self.cache = LocalCAS(str(tmp_path / "cache"), max_bytes=1 << 30)
        tree = CasDirectory.empty(self.cache)
        tree.mkdir("d")
        tree.write_bytes("d/f", b"hello")
        tree.write_bytes("g", b"world")
        tree.symlink("link", "g")
        self.table = InodeTable(per_action)
        self.root = ActionRoot("tok", CasDirectory.from_digest(self.cache, tree.digest()), self.cache, 0, 0, 5.0)
        self.table.add_root(self.root)
        self.session = FakeSession(passthrough)
        self.prefetcher = FakePrefetcher()
        self.requests = KernelRequests(self.table, 0, 0, self.session, page_cache=page_cache,  # type: ignore[arg-type]
                                       prefetcher=self.prefetcher)  # type: ignore[arg-type]
        self._unique = 100

    def send(self, opcode: int, nodeid: int, body: bytes = b"", *, pid: int = 0, length: int | None = None) -> bool:
        self._unique += 2
        size = fuse.IN_HEADER.size + len(body) if length is None else length
        header = fuse.IN_HEADER.pack(size, opcode, self._unique, nodeid, 0, 0, pid, 0, 0)
        return self.requests.handle(memoryview(header + body))

    def ask(self, opcode: int, nodeid: int, body: bytes = b"", **kwargs) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
        """Send and return the one reply to it (error, payload)."""
        before = len(self.session.replies)
        self.send(opcode, nodeid, body, **kwargs)
        assert len(self.session.replies) == before + 1, self.session.replies[before:]
        unique, error, payload = self.session.replies[-1]
        assert unique == self._unique
        return error, payload

    def lookup(self, parent: int, name: str) -> int:
        error, payload = self.ask(fuse.LOOKUP, parent, name.encode() + b"\0")
        assert error == 0
        return fuse.ENTRY_OUT_HEAD.unpack_from(payload)[0]

    def open(self, ino: int, flags: int = os.O_RDONLY) -> tuple[int, bytes]:
        return self.ask(fuse.OPEN, ino, fuse.OPEN_IN.pack(flags, 0))


@pytest.fixture
def rig(tmp_path):  # type: ignore[no-untyped-def]
    made = Rig(tmp_path)
    yield made
    made.cache.close()


def test_lookup_answers_an_entry_with_attributes_and_a_cached_miss(rig):
    root = rig.lookup(ROOT_INODE, "tok")
    d = rig.lookup(root, "d")
    error, payload = rig.ask(fuse.LOOKUP, d, b"f\0")
    ino, _, entry_valid, attr_valid, _, _ = fuse.ENTRY_OUT_HEAD.unpack_from(payload)
    attr = fuse.ATTR.unpack_from(payload, fuse.ENTRY_OUT_HEAD.size)
    assert error == 0 and attr[0] == ino and attr[1] == 5 and attr[9] == 0o100644 and entry_valid >= 3600
    error, payload = rig.ask(fuse.LOOKUP, d, b"absent\0")
    assert error == 0 and fuse.ENTRY_OUT_HEAD.unpack_from(payload)[0] == 0  # negative entry, cached
    assert rig.ask(fuse.LOOKUP, ROOT_INODE, b"other-token\0")[0] == -errno.ENOENT  # roots: never cached


def test_open_registers_one_backing_id_per_blob_and_closes_it_with_the_last_release(rig):
    g = rig.lookup(rig.lookup(ROOT_INODE, "tok"), "g")
    replies = [rig.open(g) for _ in range(2)]
    handles = []
    for error, payload in replies:
        fh, flags, backing = fuse.OPEN_OUT.unpack(payload)
        assert error == 0 and flags & fuse.FOPEN_PASSTHROUGH and not flags & fuse.FOPEN_KEEP_CACHE
        handles.append((fh, backing))
    assert handles[0][1] == handles[1][1] and rig.session.open_ids == {handles[0][1]}
    rig.ask(fuse.RELEASE, g, fuse.RELEASE_IN.pack(handles[0][0]) + bytes(16))
    assert rig.session.closed == []
    rig.ask(fuse.RELEASE, g, fuse.RELEASE_IN.pack(handles[1][0]) + bytes(16))
    assert rig.session.closed == [handles[0][1]] and rig.session.open_ids == set()
    assert rig.table.open_files.descriptors == 0


def test_without_passthrough_reads_are_answered_from_the_blob(tmp_path):
    rig = Rig(tmp_path, passthrough=False)
    d = rig.lookup(rig.lookup(ROOT_INODE, "tok"), "d")
    error, payload = rig.open(rig.lookup(d, "f"))
    fh, flags, backing = fuse.OPEN_OUT.unpack(payload)
    assert error == 0 and not flags & fuse.FOPEN_PASSTHROUGH and backing == 0
    assert rig.ask(fuse.READ, 0, fuse.READ_IN.pack(fh, 1, 3) + bytes(20)) == (0, b"ell")
    assert rig.ask(fuse.READ, 0, fuse.READ_IN.pack(fh, 1 << 62, 3) + bytes(20)) == (0, b"")  # past the end
    assert rig.ask(fuse.READ, 0, fuse.READ_IN.pack(fh + 1000, 0, 3) + bytes(20))[0] == -errno.EBADF
    rig.cache.close()


def test_opening_for_writing_is_erofs_and_write_requests_are_erofs(rig):
    g = rig.lookup(rig.lookup(ROOT_INODE, "tok"), "g")
    assert rig.open(g, os.O_WRONLY)[0] == -errno.EROFS
    assert rig.open(g, os.O_RDONLY | os.O_TRUNC)[0] == -errno.EROFS
    for opcode in (fuse.SETATTR, fuse.MKDIR, fuse.UNLINK, fuse.RENAME2, fuse.WRITE, fuse.CREATE, fuse.SETXATTR):
        assert rig.ask(opcode, g, bytes(64))[0] == -errno.EROFS
    for opcode in (fuse.FLUSH, fuse.GETXATTR, fuse.LISTXATTR, fuse.IOCTL, fuse.STATX, 4000):
        assert rig.ask(opcode, g, bytes(64))[0] == -errno.ENOSYS


@pytest.mark.parametrize("opcode, body", [
    (fuse.LOOKUP, b"no terminating nul"),
    (fuse.LOOKUP, b"\0"),  # an empty name
    (fuse.LOOKUP, b"a/b\0"),
    (fuse.LOOKUP, b"\xff\xfe\0"),  # not UTF-8: still a name, absent
    (fuse.OPEN, b"\1"),  # truncated
    (fuse.READ, b"\0" * 7),
    (fuse.READDIRPLUS, b""),
    (fuse.RELEASE, b"\0\0"),
    (fuse.GETATTR, b""),
    (fuse.OPENDIR, b""),
])
def test_malformed_requests_get_an_errno_and_the_handler_keeps_serving(rig, opcode, body):
    root = rig.lookup(ROOT_INODE, "tok")
    error, _ = rig.ask(opcode, root, body)
    assert error in (0, -errno.EINVAL, -errno.EISDIR, -errno.EBADF, -errno.ENOTDIR)
    assert rig.lookup(root, "g") > 0  # still serving


def test_hostile_node_ids_and_handles_are_errors(rig):
    for opcode in (fuse.GETATTR, fuse.OPEN, fuse.OPENDIR, fuse.READLINK):
        assert rig.ask(opcode, 987654321, bytes(16))[0] == -errno.ESTALE
    assert rig.ask(fuse.LOOKUP, 987654321, b"x\0")[0] == -errno.ESTALE
    assert rig.ask(fuse.READDIRPLUS, 0, fuse.READ_IN.pack(987654321, 0, 4096) + bytes(20))[0] == -errno.ESTALE
    root = rig.lookup(ROOT_INODE, "tok")
    assert rig.ask(fuse.READLINK, root)[0] == -errno.EINVAL
    assert rig.ask(fuse.OPEN, root, bytes(8))[0] == -errno.EISDIR
    error, payload = rig.ask(fuse.READLINK, rig.lookup(root, "link"))
    assert (error, payload) == (0, b"g")


def test_requests_without_a_reply_get_none_even_when_malformed(rig):
    g = rig.lookup(rig.lookup(ROOT_INODE, "tok"), "g")
    for opcode, body in [(fuse.FORGET, b""), (fuse.FORGET, struct.pack("<Q", 1 << 63)), (fuse.INTERRUPT, b"\1"),
                         (fuse.BATCH_FORGET, struct.pack("<II", 1 << 30, 0) + fuse.FORGET_ONE.pack(g, 1))]:
        rig.send(opcode, 0, body)
    assert rig.session.replies[-1][0] != rig._unique  # none of those answered
    assert rig.table.get(g) is None  # the batch's one real entry was forgotten all the same
    assert rig.send(fuse.DESTROY, 0) is False  # the loop ends after DESTROY (answered)
    assert rig.session.replies[-1][:2] == (rig._unique, 0)


def test_a_header_shorter_than_a_header_or_lying_about_its_length_is_survived(rig):
    assert rig.requests.handle(memoryview(b"\0" * 10)) is True
    rig.send(fuse.LOOKUP, ROOT_INODE, b"tok\0", length=10_000)  # longer than what was read
    rig.send(fuse.LOOKUP, ROOT_INODE, b"tok\0", length=3)  # shorter than the header
    assert rig.lookup(ROOT_INODE, "tok") > 0


def test_readdirplus_lists_in_pages_counting_a_lookup_per_file_sent(rig):
    root = rig.lookup(ROOT_INODE, "tok")
    error, payload = rig.ask(fuse.OPENDIR, root, bytes(8))
    assert error == 0
    head = fuse.ENTRY_OUT_HEAD.size + fuse.ATTR.size + fuse.DIRENT_HEAD.size
    names, offset = [], 0
    while True:  # a page holds one entry
        error, payload = rig.ask(fuse.READDIRPLUS, root, fuse.READ_IN.pack(root, offset, head + 8) + bytes(20))
        if not payload:
            break
        ino, offset, namelen, kind = fuse.DIRENT_HEAD.unpack_from(payload, fuse.ENTRY_OUT_HEAD.size + fuse.ATTR.size)
        names.append((payload[head:head + namelen].decode(), kind))
        assert len(payload) % 8 == 0
    assert names == [("d", 4), ("g", 8), ("link", 10)]
    g = rig.table.lookup(root, "g")
    assert g.nlookup == 2  # the READDIRPLUS entry and this lookup


def test_a_full_quota_is_emfile_for_that_opener(tmp_path):
    rig = Rig(tmp_path, per_action=1)
    root = rig.lookup(ROOT_INODE, "tok")
    g, f = rig.lookup(root, "g"), rig.lookup(rig.lookup(root, "d"), "f")
    me = os.getpid()
    assert rig.ask(fuse.OPEN, g, fuse.OPEN_IN.pack(0, 0), pid=me)[0] == 0
    assert rig.ask(fuse.OPEN, f, fuse.OPEN_IN.pack(0, 0), pid=me)[0] == -errno.EMFILE
    rig.cache.close()


def test_a_bug_in_a_handler_is_eio_recorded_on_the_roots(rig, monkeypatch):
    root = rig.lookup(ROOT_INODE, "tok")

    def broken(*args):  # type: ignore[no-untyped-def]
        raise RuntimeError("injected")

    monkeypatch.setattr(rig.requests, "_attr", broken)
    assert rig.ask(fuse.GETATTR, root, bytes(16))[0] == -errno.EIO
    assert "injected" in str(rig.root.failure)


def _wait_for_reply(rig: Rig, count: int) -> tuple[int, int, bytes]:
    deadline = time.monotonic() + 10
    while len(rig.session.replies) < count and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(rig.session.replies) == count
    return rig.session.replies[-1]


def test_a_directory_loaded_in_a_thread_answers_later_for_the_name_asked(rig, monkeypatch):
    """Not in the local cache: loaded in a thread, answered from it — for the name the
    request carried, though the loop reuses its buffer meanwhile."""
    root = rig.lookup(ROOT_INODE, "tok")
    d = rig.lookup(root, "d")
    may_load = threading.Event()
    real_deadline = kernel_requests._with_deadline

    def held(work, timeout):  # type: ignore[no-untyped-def]
        assert may_load.wait(10)
        return real_deadline(work, timeout)

    monkeypatch.setattr(kernel_requests, "is_local", lambda store, digest: False)
    monkeypatch.setattr(kernel_requests, "_with_deadline", held)
    before = len(rig.session.replies)
    buffer = bytearray(fuse.IN_HEADER.pack(fuse.IN_HEADER.size + 2, fuse.LOOKUP, 555, d, 0, 0, 0, 0, 0) + b"f\0")
    assert rig.requests.handle(memoryview(buffer))
    assert len(rig.session.replies) == before  # deferred
    buffer[fuse.IN_HEADER.size] = ord("x")  # the loop's next request lands in the same buffer
    may_load.set()
    unique, error, payload = _wait_for_reply(rig, before + 1)
    ino = fuse.ENTRY_OUT_HEAD.unpack_from(payload)[0]
    assert (unique, error) == (555, 0) and ino != 0 and fuse.ATTR.unpack_from(payload, 40)[1] == 5  # "f"


def test_a_directory_missing_everywhere_is_eio_and_recorded_as_missing(tmp_path):
    rig = Rig(tmp_path)
    root = rig.lookup(ROOT_INODE, "tok")
    d_digest = rig.root.tree.entries()["d"].digest()
    os.unlink(rig.cache.object_path(d_digest))  # the cache lost it; no remote to ask
    d = rig.lookup(root, "d")
    before = len(rig.session.replies)
    rig.send(fuse.LOOKUP, d, b"f\0")
    unique, error, _ = _wait_for_reply(rig, before + 1)
    assert error == -errno.EIO
    assert d_digest in getattr(rig.root.failure, "digests", ())
    rig.cache.close()


# -- the page-cache mode --------------------------------------------------------------------


@pytest.fixture
def cached(tmp_path):  # type: ignore[no-untyped-def]
    made = Rig(tmp_path, page_cache=True)
    yield made
    made.cache.close()


def test_page_cache_mode_refuses_open_and_opendir_with_enosys_so_the_kernel_stops_sending_them(cached):
    root = cached.lookup(ROOT_INODE, "tok")
    g = cached.lookup(root, "g")
    assert cached.open(g)[0] == -errno.ENOSYS  # FUSE_NO_OPEN_SUPPORT
    assert cached.ask(fuse.OPENDIR, root, bytes(8))[0] == -errno.ENOSYS  # FUSE_NO_OPENDIR_SUPPORT
    assert cached.open(g, os.O_WRONLY)[0] == -errno.EROFS
    assert cached.table.open_files.descriptors == 0


def test_page_cache_mode_reads_by_node_id_holding_no_descriptor(cached):
    root = cached.lookup(ROOT_INODE, "tok")
    g = cached.lookup(root, "g")
    assert cached.ask(fuse.READ, g, fuse.READ_IN.pack(0, 1, 3) + bytes(20)) == (0, b"orl")  # handle 0: no OPEN
    assert cached.ask(fuse.READ, g, fuse.READ_IN.pack(0, 1 << 62, 3) + bytes(20)) == (0, b"")
    assert cached.ask(fuse.READ, root, fuse.READ_IN.pack(0, 0, 3) + bytes(20))[0] == -errno.EISDIR
    assert cached.ask(fuse.READ, 987654, fuse.READ_IN.pack(0, 0, 3) + bytes(20))[0] == -errno.ESTALE
    assert cached.table.open_files.descriptors == 0 and len(os.listdir("/proc/self/fd")) < 200
    g_digest = cached.root.tree.entries()["g"].digest  # type: ignore[union-attr]
    assert g_digest in cached.table.take_opened(cached.cache)  # the cache's LRU still learns of it


def test_page_cache_mode_lists_by_node_id_loading_the_directory_and_offers_the_listing(cached):
    root = cached.lookup(ROOT_INODE, "tok")
    d = cached.lookup(root, "d")  # not loaded: no OPENDIR will load it
    assert cached.root.tree.entries()["d"].loaded_entries() is None  # type: ignore[union-attr]
    error, payload = cached.ask(fuse.READDIRPLUS, d, fuse.READ_IN.pack(0, 0, 4096) + bytes(20))
    head = fuse.ENTRY_OUT_HEAD.size + fuse.ATTR.size + fuse.DIRENT_HEAD.size
    assert error == 0 and payload[head:head + 1] == b"f"
    error, payload = cached.ask(fuse.READDIRPLUS, root, fuse.READ_IN.pack(0, 0, 4096) + bytes(20))
    assert error == 0 and payload.count(b"link") == 1
    entries = cached.root.tree.entries()
    assert cached.prefetcher.files == [str(entries["d"].loaded_entries()["f"].digest),  # type: ignore[union-attr]
                                       str(entries["g"].digest)]  # type: ignore[union-attr]
    assert cached.prefetcher.directories == [entries["d"]]  # a listed directory: loaded ahead
    assert cached.ask(fuse.READDIR, root, fuse.READ_IN.pack(0, 0, 4096) + bytes(20))[0] == 0
    assert cached.ask(fuse.READDIRPLUS, cached.lookup(root, "g"), fuse.READ_IN.pack(0, 0, 4096) + bytes(20))[0] == \
        -errno.ENOTDIR


def test_page_cache_mode_fetches_a_missing_blob_on_read_and_records_it(tmp_path):
    rig = Rig(tmp_path, page_cache=True)
    ghost = Digest.of_bytes(b"never stored")
    proto = re_pb2.Directory(files=[re_pb2.FileNode(name="ghost", digest=ghost.to_proto())])
    rig.table.add_root(ActionRoot("ghosts", CasDirectory.from_digest(rig.cache, rig.cache.write(serialize(proto))),
                                  rig.cache, 0, 0, 5.0))
    ino = rig.lookup(rig.lookup(ROOT_INODE, "ghosts"), "ghost")  # no remote to ask
    before = len(rig.session.replies)
    rig.send(fuse.READ, ino, fuse.READ_IN.pack(0, 0, 5) + bytes(20))
    unique, error, _ = _wait_for_reply(rig, before + 1)
    failure = rig.table.roots()[-1].failure
    assert error == -errno.EIO and ghost in getattr(failure, "digests", ()), failure
    rig.cache.close()


def test_page_cache_mode_answers_malformed_and_hostile_requests_with_an_errno(cached):
    root = cached.lookup(ROOT_INODE, "tok")
    g = cached.lookup(root, "g")
    allowed = (0, -errno.EINVAL, -errno.EISDIR, -errno.ESTALE, -errno.ENOTDIR, -errno.ENOSYS)
    for opcode, node, body in [
        (fuse.READ, g, b"\0" * 7), (fuse.READDIRPLUS, root, b""), (fuse.READDIR, root, b"\1"), (fuse.OPEN, g, b""),
        (fuse.READ, 987654321, fuse.READ_IN.pack(0, 0, 10) + bytes(20)),
        (fuse.READ, g, fuse.READ_IN.pack(0, (1 << 64) - 1, 1 << 31) + bytes(20)),  # past any offset pread takes
        (fuse.READ, ROOT_INODE, fuse.READ_IN.pack(0, 0, 10) + bytes(20)),
        (fuse.READDIRPLUS, 987654321, fuse.READ_IN.pack(0, 0, 4096) + bytes(20)),
        (fuse.READDIRPLUS, root, fuse.READ_IN.pack(0, 1 << 40, 4096) + bytes(20)),  # past the end: empty
        (fuse.READDIRPLUS, root, fuse.READ_IN.pack(0, 0, 0) + bytes(20)),  # no room for an entry
    ]:
        error, _ = cached.ask(opcode, node, body)
        assert error in allowed, (opcode, node, error)
    assert cached.ask(fuse.READ, g, fuse.READ_IN.pack(0, 0, 5) + bytes(20)) == (0, b"world")  # still serving
