"""A fake REAPI CAS server: a real ``grpc.server`` on loopback keeping blobs in a dict.

Serves ContentAddressableStorage (FindMissingBlobs, BatchReadBlobs, BatchUpdateBlobs),
ByteStream (Read, Write, QueryWriteStatus) and Capabilities for any instance name, and
lets a test inject faults:

* :meth:`FakeCasServer.fail` — the next calls of a method abort with given codes;
* :meth:`FakeCasServer.break_next_read` / :meth:`break_next_write` — the next stream
  aborts with UNAVAILABLE once that many bytes have gone through it (a Write keeps what
  it received, so QueryWriteStatus reports it); :meth:`break_next_get_tree` likewise
  after that many pages;
* :meth:`FakeCasServer.put_raw` — store bytes that do not match their digest (corruption);
* :meth:`FakeCasServer.stall_reads_after` — after that many more blobs have been read, every
  read (BatchReadBlobs, Read) stops answering, as a hung server does, until
  :meth:`release_stall` (then it fails with UNAVAILABLE).

GetTree answers in pages of ``tree_page_size`` Directories and ends each call after
``tree_pages_per_call`` pages, so a client must follow page tokens across calls. With
``tree_page_tokens=False`` it behaves like BuildGrid 0.4.4: every page of one call carries
an empty token, so a broken call can only be asked again from the start.

Setting ``read_barrier`` (a ``threading.Barrier``) makes every Read wait for that many
Reads to be in flight at once: a client that does not stream concurrently fails with
FAILED_PRECONDITION instead of passing by luck.

It records what clients did (``calls``, ``read_offsets``, ``write_offsets``,
``metadata``) so tests can assert on behaviour, never on time. Thread-safe.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from collections.abc import Iterator

import grpc

from reapi_worker.protos import bytestream_pb2, bytestream_pb2_grpc, re_grpc, re_pb2, status_pb2
from reapi_worker.storage.digests import Digest


class FakeCasServer:
    """Start with :meth:`start` (or ``with``), which returns ``HOST:PORT``; :meth:`stop` ends it."""

    def __init__(
        self,
        *,
        max_batch_total_size_bytes: int = 4193280,
        read_chunk_bytes: int = 64 * 1024,
        tree_page_size: int = 2,
        tree_pages_per_call: int = 1,
        tree_page_tokens: bool = True,
    ) -> None:
        self.max_batch_total_size_bytes = max_batch_total_size_bytes
        self.read_chunk_bytes = read_chunk_bytes
        self.tree_page_size = tree_page_size
        self.tree_pages_per_call = tree_pages_per_call
        self.tree_page_tokens = tree_page_tokens
        self.blobs: dict[Digest, bytes] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.read_offsets: list[int] = []
        self.write_offsets: list[int] = []
        self.metadata: list[dict[str, str]] = []
        self._uploads: dict[str, bytearray] = {}
        self._faults: dict[str, collections.deque[grpc.StatusCode]] = collections.defaultdict(collections.deque)
        self._read_breaks: collections.deque[int] = collections.deque()
        self._write_breaks: collections.deque[int] = collections.deque()
        self._tree_breaks: collections.deque[int] = collections.deque()
        self._lock = threading.Lock()
        self.read_barrier: threading.Barrier | None = None
        self._stall_after: int | None = None
        self._stall_released = threading.Event()
        self._server: grpc.Server | None = None
        self.address = ""

    # ---- set-up -----------------------------------------------------------------------

    def start(
        self,
        address: str = "127.0.0.1:0",
        server_credentials: grpc.ServerCredentials | None = None,
    ) -> str:
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=16))
        servicer = _Servicer(self)
        re_grpc.add_ContentAddressableStorageServicer_to_server(servicer, server)
        re_grpc.add_CapabilitiesServicer_to_server(servicer, server)
        bytestream_pb2_grpc.add_ByteStreamServicer_to_server(servicer, server)
        if server_credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, server_credentials)
        server.start()
        self._server = server
        self.address = address if address.startswith("unix:") else f"{address.rsplit(':', 1)[0]}:{port}"
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def __enter__(self) -> "FakeCasServer":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def put(self, data: bytes) -> Digest:
        digest = Digest.of_bytes(data)
        with self._lock:
            self.blobs[digest] = data
        return digest

    def put_raw(self, digest: Digest, data: bytes) -> None:
        """Store ``data`` under ``digest`` whether or not it matches (a corrupt server)."""
        with self._lock:
            self.blobs[digest] = data

    def fail(self, method: str, *codes: grpc.StatusCode) -> None:
        """The next ``len(codes)`` calls of ``method`` (e.g. "FindMissingBlobs") abort
        with these codes, in order."""
        with self._lock:
            self._faults[method].extend(codes)

    def break_next_read(self, after_bytes: int) -> None:
        with self._lock:
            self._read_breaks.append(after_bytes)

    def break_next_write(self, after_bytes: int) -> None:
        with self._lock:
            self._write_breaks.append(after_bytes)

    def stall_reads_after(self, blobs: int) -> None:
        with self._lock:
            self._stall_after = blobs
            self._stall_released.clear()

    def release_stall(self) -> None:
        with self._lock:
            self._stall_after = None
        self._stall_released.set()

    def break_next_get_tree(self, after_pages: int) -> None:
        with self._lock:
            self._tree_breaks.append(after_pages)

    # ---- used by the servicer ---------------------------------------------------------

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls[method] += 1
            self.metadata.append({key: value for key, value in context.invocation_metadata()})
            code = self._faults[method].popleft() if self._faults[method] else None
        if code is not None:
            context.abort(code, f"injected {code.name}")

    def _count_read_or_stall(self, blobs: int, context: grpc.ServicerContext) -> None:
        """Count ``blobs`` about to be read; past the stall point, hang until released."""
        with self._lock:
            if self._stall_after is None:
                return
            self._stall_after -= blobs
            stalled = self._stall_after < 0
        if stalled:
            self._stall_released.wait(timeout=120)
            context.abort(grpc.StatusCode.UNAVAILABLE, "stalled server released")

    def _get(self, digest: Digest) -> bytes | None:
        with self._lock:
            return self.blobs.get(digest)

    def _store(self, digest: Digest, data: bytes) -> bool:
        if Digest.of_bytes(data) != digest:
            return False
        with self._lock:
            self.blobs[digest] = bytes(data)
        return True


def _digest_in(resource_name: str) -> Digest:
    parts = resource_name.split("/")
    index = parts.index("blobs")
    return Digest(parts[index + 1], int(parts[index + 2]))


class _Servicer(
    re_grpc.ContentAddressableStorageServicer,
    re_grpc.CapabilitiesServicer,
    bytestream_pb2_grpc.ByteStreamServicer,
):
    def __init__(self, fake: FakeCasServer) -> None:
        self._fake = fake

    def GetCapabilities(self, request: re_pb2.GetCapabilitiesRequest, context: grpc.ServicerContext) -> re_pb2.ServerCapabilities:
        self._fake._enter("GetCapabilities", context)
        return re_pb2.ServerCapabilities(
            cache_capabilities=re_pb2.CacheCapabilities(
                digest_function=[re_pb2.DigestFunction.SHA256],
                max_batch_total_size_bytes=self._fake.max_batch_total_size_bytes,
            )
        )

    def FindMissingBlobs(self, request: re_pb2.FindMissingBlobsRequest, context: grpc.ServicerContext) -> re_pb2.FindMissingBlobsResponse:
        self._fake._enter("FindMissingBlobs", context)
        missing = [d for d in request.blob_digests if self._fake._get(Digest.from_proto(d)) is None]
        return re_pb2.FindMissingBlobsResponse(missing_blob_digests=missing)

    def BatchReadBlobs(self, request: re_pb2.BatchReadBlobsRequest, context: grpc.ServicerContext) -> re_pb2.BatchReadBlobsResponse:
        self._fake._enter("BatchReadBlobs", context)
        if sum(d.size_bytes for d in request.digests) > self._fake.max_batch_total_size_bytes:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "batch too big")
        self._fake._count_read_or_stall(len(request.digests), context)
        reply = re_pb2.BatchReadBlobsResponse()
        for digest in request.digests:
            data = self._fake._get(Digest.from_proto(digest))
            entry = reply.responses.add(digest=digest)
            if data is None:
                entry.status.CopyFrom(status_pb2.Status(code=grpc.StatusCode.NOT_FOUND.value[0], message="not found"))
            else:
                entry.data = data
        return reply

    def BatchUpdateBlobs(self, request: re_pb2.BatchUpdateBlobsRequest, context: grpc.ServicerContext) -> re_pb2.BatchUpdateBlobsResponse:
        self._fake._enter("BatchUpdateBlobs", context)
        if sum(len(r.data) for r in request.requests) > self._fake.max_batch_total_size_bytes:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "batch too big")
        reply = re_pb2.BatchUpdateBlobsResponse()
        for entry in request.requests:
            ok = self._fake._store(Digest.from_proto(entry.digest), entry.data)
            code = grpc.StatusCode.OK if ok else grpc.StatusCode.INVALID_ARGUMENT
            reply.responses.add(digest=entry.digest, status=status_pb2.Status(code=code.value[0]))
        return reply

    def GetTree(self, request: re_pb2.GetTreeRequest, context: grpc.ServicerContext) -> Iterator[re_pb2.GetTreeResponse]:
        fake = self._fake
        fake._enter("GetTree", context)
        with fake._lock:
            break_after = fake._tree_breaks.popleft() if fake._tree_breaks else None
        # Breadth-first from the root, as parsed messages (what BuildGrid sends too).
        order: list[re_pb2.Directory] = []
        queue, seen = [Digest.from_proto(request.root_digest)], set()
        while queue:
            digest = queue.pop(0)
            data = fake._get(digest)
            if digest in seen or data is None:
                if not order:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"root {digest} not found")
                continue
            seen.add(digest)
            directory = re_pb2.Directory.FromString(data)
            order.append(directory)
            queue.extend(Digest.from_proto(child.digest) for child in directory.directories)
        start = int(request.page_token or 0)
        for sent in range(1, fake.tree_pages_per_call + 1):
            page = order[start:start + fake.tree_page_size]
            start += len(page)
            token = str(start) if start < len(order) else ""
            shown = token if fake.tree_page_tokens else ""
            yield re_pb2.GetTreeResponse(directories=page, next_page_token=shown)
            if not token:
                return
            if sent == break_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected broken stream")

    def Read(self, request: bytestream_pb2.ReadRequest, context: grpc.ServicerContext) -> Iterator[bytestream_pb2.ReadResponse]:
        fake = self._fake
        fake._enter("Read", context)
        with fake._lock:
            fake.read_offsets.append(request.read_offset)
            break_after = fake._read_breaks.popleft() if fake._read_breaks else None
        fake._count_read_or_stall(1, context)
        data = fake._get(_digest_in(request.resource_name))
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.resource_name} not found")
            return  # abort raises; this tells the type checker
        if fake.read_barrier is not None:
            try:
                fake.read_barrier.wait(timeout=10)
            except threading.BrokenBarrierError:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "reads were not concurrent")
        sent = 0
        for start in range(request.read_offset, len(data), fake.read_chunk_bytes):
            chunk = data[start:start + fake.read_chunk_bytes]
            yield bytestream_pb2.ReadResponse(data=chunk)
            sent += len(chunk)
            if break_after is not None and sent >= break_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected broken stream")

    def Write(self, requests: Iterator[bytestream_pb2.WriteRequest], context: grpc.ServicerContext) -> bytestream_pb2.WriteResponse:
        fake = self._fake
        fake._enter("Write", context)
        with fake._lock:
            break_after = fake._write_breaks.popleft() if fake._write_breaks else None
        resource = ""
        received = 0
        for request in requests:
            if not resource:
                resource = request.resource_name
                with fake._lock:
                    fake.write_offsets.append(request.write_offset)
                    if request.write_offset == 0:  # a client starting over
                        fake._uploads[resource] = bytearray()
                    upload = fake._uploads.setdefault(resource, bytearray())
            if request.write_offset != len(upload):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"write_offset {request.write_offset} != {len(upload)}")
            upload += request.data
            received += len(request.data)
            if break_after is not None and received >= break_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected broken stream")
            if request.finish_write:
                if not fake._store(_digest_in(resource), bytes(upload)):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "data does not match digest")
                return bytestream_pb2.WriteResponse(committed_size=len(upload))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stream ended without finish_write")
        raise AssertionError("unreachable")

    def QueryWriteStatus(
        self, request: bytestream_pb2.QueryWriteStatusRequest, context: grpc.ServicerContext
    ) -> bytestream_pb2.QueryWriteStatusResponse:
        fake = self._fake
        fake._enter("QueryWriteStatus", context)
        with fake._lock:
            upload = fake._uploads.get(request.resource_name)
        if upload is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such upload")
            raise AssertionError("abort raises")
        complete = fake._get(_digest_in(request.resource_name)) is not None
        return bytestream_pb2.QueryWriteStatusResponse(committed_size=len(upload), complete=complete)
