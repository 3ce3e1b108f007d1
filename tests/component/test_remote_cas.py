"""RemoteCAS and FetchThroughStore against a real BuildGrid 0.4.4 (instances "" and "main").

RPCs are counted by a client interceptor on the channel, so "the batch was split" and
"the second read was local" are checked on what went over the wire. Every test makes its
own random blobs: the server's CAS outlives a test and is shared by both instances.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest

from fakes.cas_server import FakeCasServer
from fakes.grpc_calls import CallCounter
from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import DataLoss, MissingBlobs
from reapi_worker.storage.channels import ConnectionOptions, open_channel
from reapi_worker.storage.digests import EMPTY_DIGEST, Digest, serialize
from reapi_worker.storage.fetch_through import FetchThroughStore
from reapi_worker.storage.local_cas import LocalCAS
from reapi_worker.storage.remote_cas import RemoteCAS, RemoteOptions

pytestmark = pytest.mark.buildgrid

KiB = 1024
MiB = 1024 * KiB


class Remote:
    """A RemoteCAS over a channel whose calls are counted."""

    def __init__(self, address: str, instance: str) -> None:
        self.counter = CallCounter()
        self.channel = grpc.intercept_channel(open_channel(ConnectionOptions(f"grpc://{address}")), self.counter)
        self.cas = RemoteCAS(self.channel, RemoteOptions(instance_name=instance))

    def close(self) -> None:
        self.cas.close()
        self.channel.close()


@pytest.fixture(params=["", "main"], ids=["no-instance", "main"])
def remote(buildgrid: str, request: pytest.FixtureRequest) -> Iterator[Remote]:
    made = Remote(buildgrid, request.param)
    yield made
    made.close()


@pytest.fixture
def local(tmp_path: os.PathLike[str]) -> Iterator[LocalCAS]:
    cache = LocalCAS(os.path.join(tmp_path, "cache"), max_bytes=256 * MiB)
    yield cache
    cache.close()


def random_blobs(count: int, size: int) -> list[bytes]:
    return [os.urandom(size) for _ in range(count)]


def test_small_blobs_round_trip(remote: Remote) -> None:
    blobs = [b"", b"a", os.urandom(100), os.urandom(100 * KiB)]
    digests = remote.cas.write_many(blobs)

    assert digests == [Digest.of_bytes(blob) for blob in blobs]
    assert remote.cas.read_many(digests) == dict(zip(digests, blobs))
    assert remote.cas.read(digests[2]) == blobs[2]
    assert remote.counter.calls["Write"] == remote.counter.calls["Read"] == 0


def test_find_missing_names_exactly_the_absent_blobs(remote: Remote) -> None:
    present = remote.cas.write_many(random_blobs(3, 1 * KiB))
    absent = {Digest.of_bytes(blob) for blob in random_blobs(3, 1 * KiB)}

    assert remote.cas.find_missing([*present, *absent]) == absent
    assert remote.cas.find_missing([EMPTY_DIGEST]) == set()


def test_a_blob_above_the_message_limit_goes_through_bytestream_both_ways(
    remote: Remote, tmp_path: os.PathLike[str]
) -> None:
    data = os.urandom(6 * MiB)
    digest = remote.cas.write(data)
    assert remote.counter.calls["Write"] == 1

    assert remote.cas.read(digest) == data
    assert remote.counter.calls["Read"] == 1
    assert remote.counter.calls["BatchUpdateBlobs"] == remote.counter.calls["BatchReadBlobs"] == 0

    # The streaming variants: file to server, server to file, never whole in memory.
    source = os.path.join(tmp_path, "source.bin")
    other = os.urandom(5 * MiB)
    with open(source, "wb") as stream:
        stream.write(other)
    uploaded = remote.cas.write_file(source)
    target = os.path.join(tmp_path, "target.bin")
    remote.cas.read_to_file(uploaded, target)
    with open(target, "rb") as stream:
        assert stream.read() == other
    assert remote.counter.calls["Write"] == 2 and remote.counter.calls["Read"] == 2


def test_a_batch_over_the_limit_is_split_into_several_requests(remote: Remote) -> None:
    blobs = random_blobs(50, 200 * KiB)  # 10 MB: more than two full batches

    digests = remote.cas.write_many(blobs)
    assert remote.counter.calls["BatchUpdateBlobs"] >= 3

    assert remote.cas.read_many(digests) == dict(zip(digests, blobs))
    assert remote.counter.calls["BatchReadBlobs"] >= 3
    assert remote.counter.calls["Write"] == remote.counter.calls["Read"] == 0


def test_missing_blobs_are_all_listed(remote: Remote) -> None:
    present = remote.cas.write(os.urandom(1 * KiB))
    small_absent = [Digest.of_bytes(blob) for blob in random_blobs(3, 1 * KiB)]
    big_absent = Digest.of_bytes(os.urandom(5 * MiB))  # asked for through ByteStream

    with pytest.raises(MissingBlobs) as raised:
        remote.cas.read_many([present, *small_absent, big_absent])

    assert raised.value.digests == sorted([*small_absent, big_absent])
    with pytest.raises(MissingBlobs) as single:
        remote.cas.read(big_absent)
    assert single.value.digests == [big_absent]


def make_tree(cas: RemoteCAS) -> tuple[Digest, dict[Digest, re_pb2.Directory]]:
    """root/{a.txt, sub/{b.txt, deeper/{c.txt}}, empty/} with random file contents."""
    files = cas.write_many(random_blobs(3, 64))

    def file(name: str, digest: Digest) -> re_pb2.FileNode:
        return re_pb2.FileNode(name=name, digest=digest.to_proto())

    def node(name: str, directory: re_pb2.Directory) -> re_pb2.DirectoryNode:
        return re_pb2.DirectoryNode(name=name, digest=Digest.of_message(directory).to_proto())

    deeper = re_pb2.Directory(files=[file("c.txt", files[2])])
    sub = re_pb2.Directory(files=[file("b.txt", files[1])], directories=[node("deeper", deeper)])
    empty = re_pb2.Directory()
    root = re_pb2.Directory(
        files=[file("a.txt", files[0])], directories=[node("empty", empty), node("sub", sub)]
    )
    tree = {Digest.of_message(d): d for d in (root, sub, deeper, empty)}
    cas.write_many(serialize(d) for d in tree.values())
    return Digest.of_message(root), tree


def test_get_tree_returns_every_directory_of_a_nested_tree(remote: Remote, local: LocalCAS) -> None:
    root, tree = make_tree(remote.cas)

    listed = remote.cas.get_tree(root)
    # The empty Directory serializes to the empty blob, which clients never upload;
    # BuildGrid then leaves it out of GetTree. fetch_tree knows it without asking.
    assert {Digest.of_message(d) for d in listed} == set(tree) - {EMPTY_DIGEST}

    fetched = remote.cas.fetch_tree(root, local)
    assert fetched == tree
    assert local.find_missing(tree) == set()
    assert local.read(root) == serialize(tree[root])


def test_get_tree_of_an_absent_root_names_it(remote: Remote) -> None:
    root = Digest.of_message(re_pb2.Directory(files=[re_pb2.FileNode(name=os.urandom(8).hex())]))
    with pytest.raises(MissingBlobs) as raised:
        remote.cas.get_tree(root)
    assert raised.value.digests == [root]


def test_fetch_through_caches_a_cold_fetch_and_serves_the_next_read_locally(
    remote: Remote, local: LocalCAS
) -> None:
    blobs = [*random_blobs(20, 10 * KiB), os.urandom(6 * MiB)]
    digests = remote.cas.write_many(blobs)
    store = FetchThroughStore(local, remote.cas)

    store.fetch(digests)
    assert local.find_missing(digests) == set()
    assert store.stats().blobs_fetched == len(blobs)
    assert store.stats().bytes_fetched == sum(map(len, blobs))

    before = remote.counter.snapshot()
    assert store.read(digests[0]) == blobs[0]
    assert store.read_many(digests) == dict(zip(digests, blobs))
    assert remote.counter.snapshot() == before  # no RPC at all
    with open(store.path(digests[-1]), "rb") as stream:
        assert stream.read() == blobs[-1]


def test_fetch_through_names_every_blob_missing_remotely(remote: Remote, local: LocalCAS) -> None:
    present = remote.cas.write(os.urandom(1 * KiB))
    absent = [Digest.of_bytes(blob) for blob in random_blobs(2, 1 * KiB)] + [Digest.of_bytes(os.urandom(5 * MiB))]
    store = FetchThroughStore(local, remote.cas)

    with pytest.raises(MissingBlobs) as raised:
        store.fetch([present, *absent])
    assert raised.value.digests == sorted(absent)
    assert local.find_missing([present]) == set()  # what exists was fetched all the same


def test_upload_missing_sends_only_what_the_server_lacks(remote: Remote, local: LocalCAS) -> None:
    store = FetchThroughStore(local, remote.cas)
    already_remote = remote.cas.write(os.urandom(1 * KiB))
    local.insert(already_remote, remote.cas.read(already_remote))
    new = [store.write(blob) for blob in random_blobs(3, 10 * KiB)] + [store.write(os.urandom(6 * MiB))]
    assert remote.cas.find_missing(new) == set(new)  # writes stay local

    assert store.upload_missing([already_remote, *new]) == set(new)
    assert remote.cas.find_missing(new) == set()
    assert store.stats().blobs_uploaded == len(new)

    before = remote.counter.snapshot()
    assert store.upload_missing(new) == set()
    sent = remote.counter.snapshot() - before
    assert sent == {"FindMissingBlobs": 1}


def test_a_corrupted_server_response_gives_data_loss(local: LocalCAS) -> None:
    # BuildGrid verifies what it stores, so the corrupting server is the fake.
    good = os.urandom(4 * KiB)
    digest = Digest.of_bytes(good)
    with FakeCasServer() as fake:
        fake.put_raw(digest, good[::-1])
        channel = grpc.insecure_channel(fake.address)
        with RemoteCAS(channel) as cas:
            with pytest.raises(DataLoss):
                FetchThroughStore(local, cas).read(digest)
        channel.close()
    assert local.find_missing([digest]) == {digest}
