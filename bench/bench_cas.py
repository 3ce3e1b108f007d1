"""Cold fetches from a real CAS server (BuildGrid on loopback) into the local cache.

Rows (medians of --runs; a fresh LocalCAS on /dev/shm for every run, so every fetch is cold):

* ``3 x 100 MiB`` — three big blobs through ByteStream into the cache (MB/s);
* ``floor: raw ByteStream read`` — the same blobs read by a bare ByteStream loop that only
  counts bytes: what the server (and gRPC) can give at best, measured in the same run;
* ``10k-file tree: fetch + stage`` — GetTree, batched reads of 10,000 ~2 KiB blobs, then
  hardlink staging, from a cold cache;
* ``floor: raw GetTree + BatchReadBlobs`` — the same tree and blobs asked of the server by
  bare calls that keep nothing (batches as full and as many at once as the worker's), in
  the same run: what is left above it is the worker's own cost.

Needs a BuildGrid: deploy/buildgrid/start.sh prints its address (default 127.0.0.1:50051).
Usage: python bench/bench_cas.py [--remote HOST:PORT] [--runs N]. Never asserts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import statistics
import tempfile
import time

import grpc

from reapi_worker.protos import bytestream_pb2, bytestream_pb2_grpc, re_grpc, re_pb2
from reapi_worker.storage.channels import ConnectionOptions, open_channel
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.directory.cas import CasDirectory, FileEntry
from reapi_worker.storage.fetch_through import FetchThroughStore
from reapi_worker.storage.local_cas import LocalCAS
from reapi_worker.storage.remote_cas import RemoteCAS, RemoteOptions

MiB = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--remote", default="127.0.0.1:50051")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    channel = open_channel(ConnectionOptions(url=f"grpc://{args.remote}"))
    remote = RemoteCAS(channel, RemoteOptions(instance_name=""))
    big = [os.urandom(100 * MiB) for _ in range(3)]
    big_digests = [remote.write(blob) for blob in big]
    del big
    tree = CasDirectory.empty(remote)
    for i in range(10000):
        path = f"p{i // 100:03d}/d{i // 10 % 10}/f{i % 10}.c"
        if i % 10 == 0:
            tree.mkdir(path.rpartition("/")[0])
        tree.write_bytes(path, os.urandom(1024).hex().encode())
    root = tree.digest()
    files = _file_digests(tree)
    rows: dict[str, list[float]] = {}
    for _ in range(args.runs):
        rows.setdefault("floor: raw ByteStream read 3 x 100 MiB (MB/s)", []).append(
            300 * MiB / 1e6 / _timed(lambda: _raw_read(channel, big_digests)))
        with _cold_store(remote) as store:
            seconds = _timed(lambda: store.fetch(big_digests))
            rows.setdefault("fetch 3 x 100 MiB into LocalCAS (MB/s)", []).append(300 * MiB / 1e6 / seconds)
        with _cold_store(remote) as store:
            dest = tempfile.mktemp(dir="/dev/shm", prefix="bench-stage-")

            def fetch_and_stage() -> None:
                store.fetch_tree(root)
                CasDirectory.from_digest(store, root).export_files(dest)

            rows.setdefault("cold fetch + stage 10k-file tree (ms)", []).append(_timed(fetch_and_stage) * 1000)
            shutil.rmtree(dest)
        rows.setdefault("floor: raw GetTree + BatchReadBlobs 10k (ms)", []).append(
            _timed(lambda: _raw_tree_read(channel, root, files, RemoteOptions())) * 1000)
    channel.close()
    print(f"{'what':<50} {'median':>9} {'min':>9} {'max':>9}   (runs={args.runs})")
    for name, values in rows.items():
        print(f"{name:<50} {statistics.median(values):>9.1f} {min(values):>9.1f} {max(values):>9.1f}")


class _cold_store:
    def __init__(self, remote: RemoteCAS) -> None:
        self._dir = tempfile.mkdtemp(dir="/dev/shm", prefix="bench-cas-")
        self._local = LocalCAS(self._dir, max_bytes=4 << 30)
        self.store = FetchThroughStore(self._local, remote)

    def __enter__(self) -> FetchThroughStore:
        return self.store

    def __exit__(self, *exc: object) -> None:
        self._local.close()
        shutil.rmtree(self._dir)


def _raw_read(channel: grpc.Channel, digests: list[Digest]) -> None:
    stub = bytestream_pb2_grpc.ByteStreamStub(channel)
    for digest in digests:
        received = 0
        for response in stub.Read(bytestream_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size_bytes}")):
            received += len(response.data)
        assert received == digest.size_bytes


def _file_digests(tree: CasDirectory) -> list[Digest]:
    found: list[Digest] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        for entry in node.entries().values():
            if isinstance(entry, CasDirectory):
                stack.append(entry)
            elif type(entry) is FileEntry:
                found.append(entry.digest)
    return found


def _raw_tree_read(channel: grpc.Channel, root: Digest, files: list[Digest], options: RemoteOptions) -> None:
    cas = re_grpc.ContentAddressableStorageStub(channel)
    for _ in cas.GetTree(re_pb2.GetTreeRequest(root_digest=root.to_proto())):
        pass
    limit = options.max_request_bytes - 64 * 1024  # room for the reply's framing
    batches: list[list[Digest]] = [[]]
    size = 0
    for digest in files:
        if size + digest.size_bytes + 256 > limit:
            batches.append([])
            size = 0
        batches[-1].append(digest)
        size += digest.size_bytes + 256

    def read(batch: list[Digest]) -> int:
        reply = cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[d.to_proto() for d in batch]))
        return sum(len(response.data) for response in reply.responses)

    with concurrent.futures.ThreadPoolExecutor(options.parallelism) as pool:
        assert sum(pool.map(read, batches)) == sum(d.size_bytes for d in files)


def _timed(function) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
