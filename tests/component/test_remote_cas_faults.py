"""RemoteCAS and FetchThroughStore against a fake CAS server that misbehaves on purpose.

The fake (tests/fakes/cas_server.py) is a real gRPC server on loopback. Its batch limit is
64 KiB and it streams 16 KiB chunks, so blobs of a few hundred KiB already go through
ByteStream in several chunks. The client's sleep is a recorder: no test waits for real,
and no assertion depends on time.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator

import grpc
import pytest

from fakes.cas_server import FakeCasServer
from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import DataLoss, Internal, InvalidArgument, Unavailable
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.fetch_through import FetchThroughStore
from reapi_worker.storage.local_cas import LocalCAS
from reapi_worker.storage.remote_cas import RemoteCAS, RemoteOptions
from reapi_worker.storage.retry import RetryPolicy

KiB = 1024
CHUNK = 16 * KiB
POLICY = RetryPolicy(max_attempts=4, initial_backoff=0.1, max_backoff=0.4, multiplier=2.0, jitter=0.2)


@pytest.fixture
def server() -> Iterator[FakeCasServer]:
    with FakeCasServer(max_batch_total_size_bytes=64 * KiB, read_chunk_bytes=CHUNK) as fake:
        yield fake


class Client:
    """A RemoteCAS on the fake, with the waits it asked for recorded in ``sleeps``."""

    def __init__(self, address: str, policy: RetryPolicy = POLICY) -> None:
        self.sleeps: list[float] = []
        self.channel = grpc.insecure_channel(address)
        self.cas = RemoteCAS(
            self.channel,
            RemoteOptions(instance_name="fake", retry=policy, chunk_bytes=CHUNK),
            sleep=self.sleeps.append,
            rng=random.Random(7),
        )

    def close(self) -> None:
        self.cas.close()
        self.channel.close()


@pytest.fixture
def client(server: FakeCasServer) -> Iterator[Client]:
    made = Client(server.address)
    yield made
    made.close()


@pytest.fixture
def local(tmp_path: os.PathLike[str]) -> Iterator[LocalCAS]:
    cache = LocalCAS(os.path.join(tmp_path, "cache"), max_bytes=64 * 2**20)
    yield cache
    cache.close()


def leftover_temp_files(cache: LocalCAS) -> list[str]:
    return os.listdir(os.path.join(cache.root, "tmp"))


# ---- broken streams ----------------------------------------------------------------------


def test_broken_read_stream_is_resumed_at_the_received_offset(server: FakeCasServer, client: Client) -> None:
    data = os.urandom(200 * KiB)
    digest = server.put(data)
    server.break_next_read(after_bytes=3 * CHUNK)

    assert client.cas.read(digest) == data
    assert server.read_offsets == [0, 3 * CHUNK]
    assert len(client.sleeps) == 1


def test_broken_read_stream_resumes_into_a_file_and_the_local_cache(
    server: FakeCasServer, client: Client, local: LocalCAS, tmp_path: os.PathLike[str]
) -> None:
    data = os.urandom(150 * KiB)
    digest = server.put(data)
    server.break_next_read(after_bytes=2 * CHUNK)
    target = os.path.join(tmp_path, "out.bin")
    client.cas.read_to_file(digest, target)
    with open(target, "rb") as stream:
        assert stream.read() == data

    server.break_next_read(after_bytes=5 * CHUNK)
    FetchThroughStore(local, client.cas).fetch([digest])
    assert local.read(digest) == data
    assert server.read_offsets == [0, 2 * CHUNK, 0, 5 * CHUNK]


def test_broken_write_stream_resumes_where_query_write_status_says(server: FakeCasServer, client: Client) -> None:
    data = os.urandom(200 * KiB)
    server.break_next_write(after_bytes=4 * CHUNK)

    digest = client.cas.write(data)

    assert server.blobs[digest] == data
    assert server.write_offsets == [0, 4 * CHUNK]
    assert server.calls["QueryWriteStatus"] == 1


def test_broken_write_starts_over_when_the_server_cannot_say(server: FakeCasServer, client: Client) -> None:
    # BuildGrid 0.4.4 answers QueryWriteStatus with UNIMPLEMENTED.
    data = os.urandom(200 * KiB)
    server.break_next_write(after_bytes=4 * CHUNK)
    server.fail("QueryWriteStatus", grpc.StatusCode.UNIMPLEMENTED)

    digest = client.cas.write(data)

    assert server.blobs[digest] == data
    assert server.write_offsets == [0, 0]


# ---- concurrency -----------------------------------------------------------------------------


def test_big_blobs_are_streamed_concurrently(server: FakeCasServer, client: Client) -> None:
    blobs = [os.urandom(100 * KiB) for _ in range(3)]
    digests = [server.put(blob) for blob in blobs]
    server.read_barrier = threading.Barrier(3)  # every Read waits for the other two

    assert client.cas.read_many(digests) == dict(zip(digests, blobs))


# ---- retries -------------------------------------------------------------------------------


def test_unavailable_twice_then_success_is_retried(server: FakeCasServer, client: Client) -> None:
    present = server.put(b"present")
    absent = Digest.of_bytes(b"absent")
    server.fail("FindMissingBlobs", grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)

    assert client.cas.find_missing([present, absent]) == {absent}
    assert server.calls["FindMissingBlobs"] == 3
    assert len(client.sleeps) == 2
    assert client.sleeps[0] < client.sleeps[1]


def test_backoffs_grow_and_are_capped(server: FakeCasServer) -> None:
    policy = RetryPolicy(max_attempts=6, initial_backoff=0.1, max_backoff=0.4, multiplier=2.0, jitter=0.2)
    client = Client(server.address, policy)
    try:
        digest = server.put(b"blob")
        server.fail("BatchReadBlobs", *[grpc.StatusCode.UNAVAILABLE] * 5)

        assert client.cas.read(digest) == b"blob"
    finally:
        client.close()
    sleeps = client.sleeps
    assert len(sleeps) == 5
    assert sleeps[0] < sleeps[1] < sleeps[2]  # 0.1, 0.2, 0.4 less up to 20 % jitter each
    assert all(0 < wait <= 0.4 for wait in sleeps)
    assert all(wait >= 0.4 * (1 - 0.2) for wait in sleeps[2:])  # at the cap from then on


def test_a_server_that_stays_unavailable_gives_unavailable_after_the_attempt_bound(
    server: FakeCasServer, client: Client
) -> None:
    server.fail("FindMissingBlobs", *[grpc.StatusCode.UNAVAILABLE] * 10)

    with pytest.raises(Unavailable) as raised:
        client.cas.find_missing([Digest.of_bytes(b"x")])

    assert server.calls["FindMissingBlobs"] == POLICY.max_attempts
    assert len(client.sleeps) == POLICY.max_attempts - 1
    assert "UNAVAILABLE after 4 attempt(s)" in raised.value.reason
    assert "injected UNAVAILABLE" in raised.value.reason


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_other_transient_codes_are_retried(server: FakeCasServer, client: Client, code: grpc.StatusCode) -> None:
    digest = server.put(b"blob")
    server.fail("BatchReadBlobs", code)

    assert client.cas.read(digest) == b"blob"
    assert server.calls["BatchReadBlobs"] == 2


def test_a_permanent_error_is_not_retried(server: FakeCasServer, client: Client) -> None:
    server.fail("BatchReadBlobs", grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(InvalidArgument, match="injected INVALID_ARGUMENT"):
        client.cas.read(server.put(b"blob"))
    assert server.calls["BatchReadBlobs"] == 1
    assert client.sleeps == []


def test_a_code_without_an_error_class_becomes_internal_naming_it(server: FakeCasServer, client: Client) -> None:
    server.fail("FindMissingBlobs", grpc.StatusCode.PERMISSION_DENIED)
    with pytest.raises(Internal, match="PERMISSION_DENIED"):
        client.cas.find_missing([Digest.of_bytes(b"x")])


# ---- corruption ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [10 * KiB, 200 * KiB], ids=["batched", "streamed"])
def test_a_corrupted_blob_gives_data_loss_and_nothing_is_cached(
    server: FakeCasServer, client: Client, local: LocalCAS, size: int
) -> None:
    good = os.urandom(size)
    digest = Digest.of_bytes(good)
    server.put_raw(digest, bytes([good[0] ^ 1]) + good[1:])
    store = FetchThroughStore(local, client.cas)

    with pytest.raises(DataLoss, match=digest.hash):
        store.fetch([digest])
    with pytest.raises(DataLoss):
        store.read(digest)

    assert local.find_missing([digest]) == {digest}
    assert leftover_temp_files(local) == []
    assert store.stats().blobs_fetched == 0


@pytest.mark.parametrize("extra", [-1, 1], ids=["short", "long"])
def test_a_streamed_blob_of_the_wrong_length_gives_data_loss(
    server: FakeCasServer, client: Client, local: LocalCAS, extra: int
) -> None:
    good = os.urandom(100 * KiB)
    digest = Digest.of_bytes(good)
    server.put_raw(digest, good[:extra] if extra < 0 else good + b"!")

    with pytest.raises(DataLoss):
        client.cas.read(digest)
    with pytest.raises(DataLoss):
        FetchThroughStore(local, client.cas).fetch([digest])
    assert local.find_missing([digest]) == {digest}
    assert leftover_temp_files(local) == []


@pytest.mark.parametrize("size", [10 * KiB, 200 * KiB], ids=["batched", "streamed"])
def test_uploading_a_file_that_does_not_match_its_digest_stores_nothing(
    server: FakeCasServer, client: Client, tmp_path: os.PathLike[str], size: int
) -> None:
    claimed = Digest.of_bytes(os.urandom(size))
    path = os.path.join(tmp_path, "changed")
    with open(path, "wb") as stream:
        stream.write(os.urandom(size))

    with pytest.raises(DataLoss, match=claimed.hash):
        client.cas.write_files({claimed: path})
    assert claimed not in server.blobs


# ---- trees -----------------------------------------------------------------------------------


def directory_chain(server: FakeCasServer, depth: int) -> tuple[Digest, list[Digest]]:
    """d0 -> d1 -> ... -> d{depth-1}, each with one file; returns the root and all digests."""
    child: re_pb2.DirectoryNode | None = None
    digests: list[Digest] = []
    for level in reversed(range(depth)):
        directory = re_pb2.Directory(files=[re_pb2.FileNode(name=f"f{level}")])
        if child is not None:
            directory.directories.append(child)
        digest = server.put(serialize(directory))
        digests.append(digest)
        child = re_pb2.DirectoryNode(name=f"d{level}", digest=digest.to_proto())
    return digests[-1], digests


def test_get_tree_follows_page_tokens_across_calls(server: FakeCasServer, client: Client) -> None:
    root, digests = directory_chain(server, depth=5)  # pages of 2: three calls

    listed = client.cas.get_tree(root)

    assert sorted(Digest.of_message(d) for d in listed) == sorted(digests)
    assert server.calls["GetTree"] == 3


@pytest.mark.parametrize("tokens", [True, False], ids=["page-tokens", "buildgrid-style"])
def test_a_broken_get_tree_stream_resumes_from_the_last_page_token_without_duplicates(tokens: bool) -> None:
    with FakeCasServer(tree_page_size=2, tree_pages_per_call=10, tree_page_tokens=tokens) as server:
        client = Client(server.address)
        try:
            root, digests = directory_chain(server, depth=5)
            server.break_next_get_tree(after_pages=1)

            listed = client.cas.get_tree(root)
        finally:
            client.close()

    assert len(listed) == 5
    assert sorted(Digest.of_message(d) for d in listed) == sorted(digests)
    assert server.calls["GetTree"] == 2


def test_fetch_tree_reads_by_digest_what_get_tree_cannot_vouch_for(
    server: FakeCasServer, client: Client, local: LocalCAS
) -> None:
    # A root uploaded by some client with its fields out of order: valid, but not the
    # bytes our serialization of GetTree's parsed message gives.
    leaf = re_pb2.Directory(files=[re_pb2.FileNode(name="leaf")])
    leaf_digest = server.put(serialize(leaf))
    odd_bytes = serialize(re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="d", digest=leaf_digest.to_proto())]))
    odd_bytes += serialize(re_pb2.Directory(files=[re_pb2.FileNode(name="f")]))
    root = server.put(odd_bytes)
    assert Digest.of_message(re_pb2.Directory.FromString(odd_bytes)) != root

    tree = client.cas.fetch_tree(root, local)

    assert set(tree) == {root, leaf_digest}
    assert local.read(root) == odd_bytes
    assert local.read(leaf_digest) == serialize(leaf)
