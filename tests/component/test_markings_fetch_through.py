"""The ``SubtreeReadOnly`` walk over a cache in front of a real remote CAS (BuildGrid).

The walk reads Directory blobs straight from the local cache's files when they are there
(``storage/read_only_markings.py``); a Directory the cache does not hold must still come
through ``FetchThroughStore.read`` — fetched from the remote and kept — and one neither
holds must still be MissingBlobs naming it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from fakes.marked_trees import MARK, store_marked_tree

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import MissingBlobs
from reapi_worker.storage.channels import ConnectionOptions, open_channel
from reapi_worker.storage.content import MemoryStore
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.fetch_through import FetchThroughStore
from reapi_worker.storage.local_cas import LocalCAS
from reapi_worker.storage.read_only_markings import read_only_markings
from reapi_worker.storage.remote_cas import RemoteCAS

pytestmark = pytest.mark.buildgrid

TREE = {"a": {"b": {MARK: "true", "f": b"1"}, "c": {"g": b"2"}}, "d": {MARK: "false"}}


@pytest.fixture
def store(buildgrid: str, tmp_path: os.PathLike[str]) -> Iterator[FetchThroughStore]:
    channel = open_channel(ConnectionOptions(f"grpc://{buildgrid}"))
    remote = RemoteCAS(channel)
    local = LocalCAS(os.path.join(tmp_path, "cache"), max_bytes=1 << 26)
    yield FetchThroughStore(local, remote)
    local.close()
    remote.close()
    channel.close()


def _upload(store: FetchThroughStore, spec: dict) -> tuple[Digest, list[Digest]]:
    """Write the tree to the remote only; its root and every Directory's digest."""
    staging = MemoryStore()
    root = store_marked_tree(staging, spec)
    store.remote.write_many(staging.read(digest) for digest in staging)
    return root, [digest for digest, _ in CasDirectory.from_digest(staging, root).directory_protos()]


def test_directories_the_cache_lacks_are_fetched_from_the_remote_and_kept(store: FetchThroughStore) -> None:
    root, directories = _upload(store, TREE)
    store.fetch([root])  # the root alone is local
    found = read_only_markings(CasDirectory.from_digest(store, root))
    assert found == ((("a", "b"), True), (("d",), False))
    assert store.local.find_missing(directories) == set()
    assert store.stats().blobs_fetched == len(directories)  # the root, then each other once


def test_a_directory_neither_holds_is_missing_blobs_naming_it(store: FetchThroughStore) -> None:
    gone = store_marked_tree(MemoryStore(), {"x": b"never uploaded", MARK: "true"})
    root = store.write(serialize(re_pb2.Directory(
        directories=[re_pb2.DirectoryNode(name="s", digest=gone.to_proto())])))
    with pytest.raises(MissingBlobs) as raised:
        read_only_markings(CasDirectory.from_digest(store, root))
    assert raised.value.digests == [gone]
    assert "loading directory 's'" in str(raised.value)
