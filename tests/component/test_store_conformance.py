"""One suite over every store: the ContentStore contract (storage/content.py) over the
in-memory fake, LocalCAS, RemoteCAS and the fetch-through store; the LocalContent contract
over the two local ones. A store that passes can stand in for any other.

Component tier: RemoteCAS and the fetch-through store talk to the fake CAS server
(tests/fakes/cas_server.py), a real gRPC server on loopback.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from fakes.cas_server import FakeCasServer
from reapi_worker.protos.errors import DataLoss, Internal, InvalidArgument, MissingBlobs, NotFound
from reapi_worker.storage.content import ContentStore, LocalContent, MemoryStore
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.fetch_through import FetchThroughStore
from reapi_worker.storage.local_cas import LocalCAS
from reapi_worker.storage.remote_cas import RemoteCAS

ABSENT = Digest.of_bytes(b"never stored anywhere")


@dataclass
class Subject:
    """A store under test, and how to give it a blob only its remote holds (if it has one)."""

    store: ContentStore
    server: FakeCasServer | None = None

    def put_remote_only(self, data: bytes) -> Digest:
        assert self.server is not None
        return self.server.put(data)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeCasServer]:
    with FakeCasServer() as fake:
        yield fake


@pytest.fixture
def channel(server: FakeCasServer) -> Iterator[grpc.Channel]:
    channel = grpc.insecure_channel(server.address)
    yield channel
    channel.close()


def _open(kind: str, tmp_path, server: FakeCasServer, channel: grpc.Channel) -> Iterator[Subject]:
    if kind == "memory":
        yield Subject(MemoryStore())
        return
    if kind == "remote":
        with RemoteCAS(channel) as remote:
            yield Subject(remote, server)
        return
    with LocalCAS(str(tmp_path / "cache"), max_bytes=1 << 30) as local:
        if kind == "local":
            yield Subject(local)
        else:
            with RemoteCAS(channel) as remote:
                yield Subject(FetchThroughStore(local, remote), server)


@pytest.fixture(params=["memory", "local", "remote", "fetch-through"])
def subject(request, tmp_path, server, channel) -> Iterator[Subject]:
    yield from _open(request.param, tmp_path, server, channel)


@pytest.fixture(params=["local", "fetch-through"])
def local_subject(request, tmp_path, server, channel) -> Iterator[Subject]:
    yield from _open(request.param, tmp_path, server, channel)


# -- ContentStore ------------------------------------------------------------------------------


def test_write_returns_the_digest_and_read_gives_the_bytes_back(subject):
    data = os.urandom(3000)
    digest = subject.store.write(data)
    assert digest == Digest.of_bytes(data)
    assert subject.store.read(digest) == data


def test_find_missing_names_exactly_the_absent_blobs(subject):
    present = subject.store.write(b"present")
    assert subject.store.find_missing([present, ABSENT]) == {ABSENT}
    assert subject.store.find_missing([]) == set()


def test_reading_an_absent_blob_is_missing_blobs_naming_it(subject):
    with pytest.raises(MissingBlobs) as raised:
        subject.store.read(ABSENT)
    assert raised.value.digests == [ABSENT]


def test_read_many_names_every_absent_blob(subject):
    present = subject.store.write(b"one")
    other = Digest.of_bytes(b"another absent one")
    with pytest.raises(MissingBlobs) as raised:
        subject.store.read_many([present, ABSENT, other])
    assert set(raised.value.digests) == {ABSENT, other}
    assert subject.store.read_many([present]) == {present: b"one"}


def test_writing_a_present_blob_again_is_harmless(subject):
    first = subject.store.write(b"twice")
    assert subject.store.write(b"twice") == first
    assert subject.store.read(first) == b"twice"


def test_write_stream_and_write_file_agree_with_write(subject, tmp_path):
    data = os.urandom(70_000)
    path = tmp_path / "file"
    path.write_bytes(data)
    assert subject.store.write_stream(io.BytesIO(data)) == Digest.of_bytes(data)
    assert subject.store.write_file(path) == Digest.of_bytes(data)
    assert subject.store.read(Digest.of_bytes(data)) == data


def test_write_file_never_follows_a_final_symlink(subject, tmp_path):
    (tmp_path / "target").write_bytes(b"secret")
    os.symlink(tmp_path / "target", tmp_path / "link")
    with pytest.raises(InvalidArgument):
        subject.store.write_file(tmp_path / "link")
    with pytest.raises(NotFound):
        subject.store.write_file(tmp_path / "absent")


def test_writes_and_reads_from_several_threads_at_once(subject):
    blobs = [os.urandom(512) + bytes([i]) for i in range(32)]
    errors: list[BaseException] = []

    def work(data: bytes) -> None:
        try:
            assert subject.store.read(subject.store.write(data)) == data
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(data,)) for data in blobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert subject.store.find_missing(Digest.of_bytes(d) for d in blobs) == set()


# -- LocalContent ------------------------------------------------------------------------------


def test_path_is_a_read_only_file_of_exactly_the_blob(local_subject):
    store = local_subject.store
    assert isinstance(store, LocalContent)
    digest = store.write(b"#!/bin/sh\n")
    plain, executable = store.path(digest), store.path(digest, executable=True)
    for path, mode in ((plain, 0o644), (executable, 0o755)):
        with open(path, "rb") as stream:
            assert stream.read() == b"#!/bin/sh\n"
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
    # A hardlinked input must never change mode under another action: two inodes.
    assert os.stat(plain).st_ino != os.stat(executable).st_ino


def test_path_of_an_absent_blob_is_missing_blobs(local_subject):
    with pytest.raises(MissingBlobs):
        local_subject.store.path(ABSENT)


def test_object_path_is_the_path_of_a_present_blob(local_subject):
    store = local_subject.store
    digest = store.write(b"object")
    assert store.object_path(digest) == store.path(digest)
    assert store.object_path(digest, executable=True) == store.path(digest, executable=True)


def test_fetch_of_an_absent_blob_names_every_one(local_subject):
    other = Digest.of_bytes(b"absent too")
    with pytest.raises(MissingBlobs) as raised:
        local_subject.store.fetch([ABSENT, other])
    assert set(raised.value.digests) == {ABSENT, other}


def test_insert_keeps_only_bytes_that_match_their_digest(local_subject):
    store = local_subject.store
    good = b"claimed"
    digest = Digest.of_bytes(good)
    with pytest.raises(DataLoss):
        store.insert(digest, b"not what was claimed")
    assert store.find_missing([digest]) == {digest}
    with pytest.raises(DataLoss):
        store.insert_stream(digest, io.BytesIO(b"wrong bytes, same claim"))
    store.insert(digest, good)
    assert store.read(digest) == good
    streamed = os.urandom(5000)
    store.insert_stream(Digest.of_bytes(streamed), io.BytesIO(streamed))
    assert store.read(Digest.of_bytes(streamed)) == streamed


def test_pin_set_is_released_once_and_refuses_use_after(local_subject):
    store = local_subject.store
    digest = store.write(b"pinned")
    with store.pin_set() as pins:
        pins.add([digest, ABSENT])  # pinning what is not local is allowed
    pins.release()  # idempotent
    with pytest.raises(Internal):
        pins.add([digest])
    with store.pinned([digest]):
        assert store.read(digest) == b"pinned"


def test_upload_missing_makes_blobs_readable_where_the_result_is_read(local_subject):
    store = local_subject.store
    digest = store.write(os.urandom(100))
    sent = store.upload_missing([digest])
    if local_subject.server is None:
        assert sent == set()  # a purely local store is already where the reader looks
    else:
        assert sent == {digest}
        assert digest in local_subject.server.blobs
        assert store.upload_missing([digest]) == set()


# -- fetch-through only ------------------------------------------------------------------------


@pytest.fixture
def fetch_through(tmp_path, server, channel) -> Iterator[Subject]:
    yield from _open("fetch-through", tmp_path, server, channel)


def test_a_blob_only_the_remote_holds_is_fetched_and_then_local(fetch_through):
    store = fetch_through.store
    assert isinstance(store, LocalContent)
    data = os.urandom(2000)
    digest = fetch_through.put_remote_only(data)
    store.fetch([digest])
    with open(store.path(digest), "rb") as stream:
        assert stream.read() == data
