"""``RemoteCAS``: the gRPC client for a REAPI v2 ContentAddressableStorage + ByteStream.

What it does for its callers:

* packs small blobs into BatchReadBlobs / BatchUpdateBlobs requests that fit both the
  server's ``max_batch_total_size_bytes`` and a gRPC message (4 MiB by default), and sends
  bigger blobs through ByteStream in chunks, so no caller ever thinks about sizes;
* runs batches and streams concurrently on its own thread pool;
* verifies every blob it reads against its digest (DataLoss otherwise) and every blob it
  streams out against the digest it is uploaded under;
* reports every absent blob of a request in one MissingBlobs;
* retries UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED with capped exponential
  backoff and jitter, resuming a broken ByteStream Read at the byte it stopped and a broken
  Write where QueryWriteStatus says (from the start if the server cannot tell);
* translates ``grpc.RpcError`` into :mod:`reapi_worker.protos.errors` in exactly one place,
  :meth:`RemoteCAS._call` (which runs :func:`~.retry.call_with_retries`), and ``OSError``
  of the local files it reads or writes in ``_local_io``; nothing gRPC-specific escapes.

The retry policy is in :mod:`.retry`; the ByteStream reader in :mod:`.bytestream`.

Every call this client makes is idempotent (content-addressed reads and writes), which is
why DEADLINE_EXCEEDED is retried too. When the attempts run out the caller gets
Unavailable carrying the last gRPC code and message.

The empty blob is never sent or asked for: REAPI servers must treat it as always present.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import io
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, TypeVar, cast

import grpc

from reapi_worker.protos import bytestream_pb2, bytestream_pb2_grpc, re_grpc, re_pb2
from reapi_worker.protos.errors import (
    DataLoss,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MissingBlobs,
    NotFound,
    ReapiError,
    from_grpc,
    from_os_error,
)

from .bytestream import BlobReader
from .channels import GRPC_DEFAULT_MAX_MESSAGE_BYTES
from .content import ContentStore
from .digests import EMPTY_DIGEST, Digest, serialize
from .retry import RETRYABLE, RetryPolicy, Transient, call_with_retries, rpc_status

T = TypeVar("T")

# Framing of one blob inside a batch request or response: the Digest message (64-byte hash,
# size varint, tags), the length prefix of the data, the status of a read, the entry's own
# tag and length. 128 bytes is comfortably above the ~90 it takes.
PER_BLOB_OVERHEAD = 128
# What a batch request carries besides its blobs (instance name, field tags), with margin.
REQUEST_HEADROOM = 16 * 1024
# Digests per FindMissingBlobs request: ~80 bytes each, so ~0.8 MB per request.
FIND_MISSING_BATCH = 10_000

_RESERVED_INSTANCE_SEGMENTS = frozenset(
    {"blobs", "uploads", "actions", "actionResults", "operations", "capabilities", "compressed-blobs"}
)


# ---------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class RemoteOptions:
    """Tunables of a :class:`RemoteCAS`.

    ``instance_name``: the REAPI instance ("" for none). ``call_timeout``: the deadline of
    one unary call, in seconds. ``min_stream_bytes_per_second``: a ByteStream call's
    deadline is ``call_timeout + size / min_stream_bytes_per_second`` (a broken or timed
    out stream resumes, so this only bounds how long a stuck stream is waited for).
    ``chunk_bytes``: ByteStream Write chunk size. ``max_request_bytes``: the largest
    message the server accepts (gRPC's default 4 MiB unless the server is known to accept
    more). ``parallelism``: threads issuing batches and streams concurrently.
    """

    instance_name: str = ""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    call_timeout: float = 60.0
    min_stream_bytes_per_second: float = 1024 * 1024
    chunk_bytes: int = 1024 * 1024
    max_request_bytes: int = GRPC_DEFAULT_MAX_MESSAGE_BYTES
    parallelism: int = 8

    def __post_init__(self) -> None:
        check_instance_name(self.instance_name)
        if self.call_timeout <= 0 or self.min_stream_bytes_per_second <= 0:
            raise InvalidArgument("call_timeout and min_stream_bytes_per_second must be positive")
        if not 0 < self.chunk_bytes <= self.max_request_bytes - REQUEST_HEADROOM:
            raise InvalidArgument(f"chunk_bytes {self.chunk_bytes} does not fit in a request")
        if self.max_request_bytes <= REQUEST_HEADROOM + PER_BLOB_OVERHEAD:
            raise InvalidArgument(f"max_request_bytes {self.max_request_bytes} is too small")
        if self.parallelism < 1:
            raise InvalidArgument(f"parallelism must be at least 1, not {self.parallelism}")


@dataclass(frozen=True, slots=True)
class CasCapabilities:
    """What the server said in GetCapabilities. ``max_batch_total_size_bytes`` 0 means
    the server sets no limit of its own; ``digest_functions`` are DigestFunction values."""

    max_batch_total_size_bytes: int
    digest_functions: tuple[int, ...]


class BlobSink(Protocol):
    """Where fetched blobs go (a LocalCAS has both methods).

    ``insert`` receives bytes already verified against ``digest``. ``insert_stream``
    receives a stream that yields exactly the blob's bytes and raises DataLoss from
    ``read`` if they turn out not to match; it must read the stream to its end and must
    not keep anything when reading raises. Both are called from the client's pool threads,
    concurrently.
    """

    def insert(self, digest: Digest, data: bytes) -> object: ...

    def insert_stream(self, digest: Digest, stream: BinaryIO) -> object: ...


def check_instance_name(name: str) -> str:
    """Return ``name`` if it can prefix a resource name, else raise InvalidArgument."""
    if not isinstance(name, str):
        raise InvalidArgument(f"instance name {name!r} is not a string")
    if name == "":
        return name
    segments = name.split("/")
    if any(segment == "" for segment in segments):
        raise InvalidArgument(f"instance name {name!r} has an empty segment")
    reserved = _RESERVED_INSTANCE_SEGMENTS.intersection(segments)
    if reserved:
        raise InvalidArgument(f"instance name {name!r} uses reserved segment(s) {sorted(reserved)}")
    return name


def pack_batches(digests: Iterable[Digest], budget: int) -> list[list[Digest]]:
    """Split ``digests`` into batches whose sizes plus PER_BLOB_OVERHEAD each sum to at
    most ``budget``. Every digest must fit alone. Largest first, next-fit: simple, and
    within a batch of optimal for the many-small-blobs case that matters."""
    batches: list[list[Digest]] = []
    current: list[Digest] = []
    used = 0
    for digest in sorted(digests, key=lambda d: d.size_bytes, reverse=True):
        cost = digest.size_bytes + PER_BLOB_OVERHEAD
        if cost > budget:
            raise InvalidArgument(f"blob {digest} does not fit in a batch of {budget} bytes")
        if current and used + cost > budget:
            batches.append(current)
            current, used = [], 0
        current.append(digest)
        used += cost
    if current:
        batches.append(current)
    return batches


def verify(digest: Digest, data: bytes) -> None:
    """Raise DataLoss unless ``data`` is exactly the blob ``digest`` names."""
    if len(data) != digest.size_bytes:
        raise DataLoss(f"blob {digest}: server sent {len(data)} bytes")
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest.hash:
        raise DataLoss(f"blob {digest}: server sent bytes hashing to {actual}")


# ------------------------------------------------------------------- per-blob statuses

_STATUS_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}


def _per_blob_status(number: int) -> grpc.StatusCode:
    return _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


# ----------------------------------------------------------------------- the client


class RemoteCAS(ContentStore):
    """A remote CAS reached over ``channel`` (which the caller owns and closes).

    Thread-safe: any method may be called from several threads at once. Methods that
    touch many blobs run their requests on the client's pool (``options.parallelism``
    threads); a :class:`BlobSink` passed in is called from those threads and must not call
    back into a many-blob method of this client (it would wait on its own pool).
    Call :meth:`close` (or use ``with``) to stop the pool.

    ``sleep`` and ``rng`` are how the client waits between attempts and draws jitter;
    tests pass a recorder and a seeded generator instead of sleeping.

    Raises (from every method): MissingBlobs naming every absent blob of the request,
    DataLoss for bytes that do not match their digest, Unavailable once retries are
    exhausted, InvalidArgument and others as the server answered them.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        options: RemoteOptions | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._options = options or RemoteOptions()
        self._cas = re_grpc.ContentAddressableStorageStub(channel)
        self._capabilities_stub = re_grpc.CapabilitiesStub(channel)
        self._bytestream = bytestream_pb2_grpc.ByteStreamStub(channel)
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._options.parallelism, thread_name_prefix="remote-cas"
        )
        self._capabilities: CasCapabilities | None = None
        self._capabilities_lock = threading.Lock()

    @property
    def instance_name(self) -> str:
        return self._options.instance_name

    def close(self) -> None:
        """Wait for running requests and stop the pool. The channel stays open."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "RemoteCAS":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ capabilities

    def capabilities(self) -> CasCapabilities:
        """The server's CAS capabilities, asked once and cached.

        Raises FailedPrecondition if the server does not offer SHA-256 (the only digest
        function this project computes)."""
        with self._capabilities_lock:
            if self._capabilities is None:
                request = re_pb2.GetCapabilitiesRequest(instance_name=self.instance_name)
                reply = self._call(
                    "GetCapabilities",
                    lambda timeout: self._capabilities_stub.GetCapabilities(request, timeout=timeout),
                )
                cache = reply.cache_capabilities
                functions = tuple(cache.digest_function)
                if functions and re_pb2.DigestFunction.SHA256 not in functions:
                    raise FailedPrecondition(
                        f"CAS instance {self.instance_name!r} does not offer SHA256 digests"
                    )
                self._capabilities = CasCapabilities(cache.max_batch_total_size_bytes, functions)
            return self._capabilities

    def batch_budget(self) -> int:
        """Bytes of blobs (each counted with PER_BLOB_OVERHEAD) one batch may carry:
        the server's limit (ours if it sets none), within one gRPC message."""
        ours = self._options.max_request_bytes - REQUEST_HEADROOM
        theirs = self.capabilities().max_batch_total_size_bytes
        return min(theirs, ours) if theirs > 0 else ours

    def fits_in_batch(self, digest: Digest) -> bool:
        return digest.size_bytes + PER_BLOB_OVERHEAD <= self.batch_budget()

    # ---------------------------------------------------------------- queries

    def find_missing(self, digests: Iterable[Digest]) -> set[Digest]:
        """The subset of ``digests`` the server does not hold, asked in requests of at
        most FIND_MISSING_BATCH digests, concurrently."""
        wanted = sorted(set(digests) - {EMPTY_DIGEST})
        chunks = [wanted[i:i + FIND_MISSING_BATCH] for i in range(0, len(wanted), FIND_MISSING_BATCH)]
        missing: set[Digest] = set()
        for part in self._run_all([functools.partial(self._find_missing_once, chunk) for chunk in chunks]):
            missing |= part
        return missing

    def _find_missing_once(self, digests: list[Digest]) -> set[Digest]:
        request = re_pb2.FindMissingBlobsRequest(
            instance_name=self.instance_name, blob_digests=[d.to_proto() for d in digests]
        )
        reply = self._call(
            "FindMissingBlobs", lambda timeout: self._cas.FindMissingBlobs(request, timeout=timeout)
        )
        asked = set(digests)
        # Only trust answers about what we asked: a server echoing other digests is ignored.
        return {d for d in map(Digest.from_proto, reply.missing_blob_digests) if d in asked}

    # ------------------------------------------------------------------ reads

    def read(self, digest: Digest) -> bytes:
        """The blob's verified bytes (a batch read, or ByteStream for a big blob)."""
        if digest == EMPTY_DIGEST:
            return b""
        if self.fits_in_batch(digest):
            found: dict[Digest, bytes] = {}
            missing = self._read_batch([digest], found.__setitem__)
            if missing:
                raise MissingBlobs(missing)
            return found[digest]
        with self.open_read(digest) as reader:
            return reader.read()

    def read_many(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """Every blob of ``digests`` in memory, fetched concurrently. Raises MissingBlobs
        naming every absent one."""
        sink = _DictSink()
        self.read_into(digests, sink)
        return sink.blobs

    def read_into(self, digests: Iterable[Digest], sink: BlobSink) -> None:
        """Fetch every blob of ``digests`` into ``sink``, concurrently: small ones in
        batches (``sink.insert``), big ones streamed (``sink.insert_stream``) so they never
        sit whole in memory.

        Every present blob is delivered even when some are missing; then MissingBlobs names
        every absent one. Any other failure is raised after all requests have finished
        (so nothing is still writing into ``sink`` when this returns or raises).
        """
        wanted = set(digests)
        if EMPTY_DIGEST in wanted:
            wanted.discard(EMPTY_DIGEST)
            sink.insert(EMPTY_DIGEST, b"")
        if not wanted:
            return
        budget = self.batch_budget()
        small = [d for d in wanted if d.size_bytes + PER_BLOB_OVERHEAD <= budget]
        big = [d for d in wanted if d.size_bytes + PER_BLOB_OVERHEAD > budget]
        tasks: list[Callable[[], set[Digest]]] = [
            functools.partial(self._read_batch, batch, sink.insert) for batch in pack_batches(small, budget)
        ]
        tasks += [functools.partial(self._stream_into, digest, sink) for digest in big]
        missing: set[Digest] = set()
        for part in self._run_all(tasks):
            missing |= part
        if missing:
            raise MissingBlobs(missing)

    def read_to_file(self, digest: Digest, destination: str | os.PathLike[str] | BinaryIO) -> None:
        """Write the blob's verified bytes to ``destination``.

        A path is written through a temporary file beside it and renamed into place only
        once the bytes are verified, so a failed read leaves nothing behind (mode 0644,
        replacing an existing file). A binary file object is written from its current
        position; on failure it holds a partial blob, and cleaning it up is the caller's job.
        """
        if isinstance(destination, (str, os.PathLike)):
            path = os.fspath(destination)
            with _local_io(f"writing blob {digest} to {path}"):
                directory = os.path.dirname(os.path.abspath(path))
                fd, temporary = tempfile.mkstemp(dir=directory, prefix=".fetch-")
                try:
                    with os.fdopen(fd, "wb") as stream:
                        self.read_to_file(digest, stream)
                    os.chmod(temporary, 0o644)
                    os.replace(temporary, path)
                except BaseException:
                    os.unlink(temporary)
                    raise
            return
        with _local_io(f"writing blob {digest}"):
            if self.fits_in_batch(digest):
                destination.write(self.read(digest))
                return
            with self.open_read(digest) as reader:
                shutil.copyfileobj(reader, destination, self._options.chunk_bytes)

    def open_read(self, digest: Digest) -> BlobReader:
        """A ByteStream reader of the blob (any size). Raises MissingBlobs on the first
        read if the blob is absent; see :class:`~.bytestream.BlobReader`."""
        return BlobReader(
            self._call, self._bytestream, self.read_resource_name(digest), digest, self._stream_timeout(digest),
        )

    def _read_batch(self, digests: list[Digest], deliver: Callable[[Digest, bytes], object]) -> set[Digest]:
        """One BatchReadBlobs (retried for the blobs not yet answered); returns the
        digests the server reported NOT_FOUND."""
        pending = set(digests)
        missing: set[Digest] = set()

        def attempt(timeout: float) -> None:
            request = re_pb2.BatchReadBlobsRequest(
                instance_name=self.instance_name, digests=[d.to_proto() for d in sorted(pending)]
            )
            reply = self._cas.BatchReadBlobs(request, timeout=timeout)
            transient: Transient | None = None
            for entry in reply.responses:
                digest = Digest.from_proto(entry.digest)
                if digest not in pending:
                    continue
                status = _per_blob_status(entry.status.code)
                if status == grpc.StatusCode.OK:
                    verify(digest, entry.data)
                    deliver(digest, entry.data)
                    pending.discard(digest)
                elif status == grpc.StatusCode.NOT_FOUND:
                    missing.add(digest)
                    pending.discard(digest)
                elif status in RETRYABLE:
                    transient = Transient(status, f"blob {digest}: {entry.status.message}")
                else:
                    raise from_grpc(status, f"BatchReadBlobs: blob {digest}: {entry.status.message}")
            if transient is not None:
                raise transient
            if pending:
                raise Internal(f"BatchReadBlobs: server did not answer for {len(pending)} blob(s)")

        self._call(f"BatchReadBlobs ({len(digests)} blobs)", attempt)
        return missing

    def _stream_into(self, digest: Digest, sink: BlobSink) -> set[Digest]:
        """Stream one blob into ``sink``; returns {digest} if it is absent, else {}."""
        try:
            with self.open_read(digest) as reader:
                reader.prefetch()  # absent blobs are found before the sink opens a file
                # BlobReader is a RawIOBase, which typing.BinaryIO does not name.
                sink.insert_stream(digest, cast(BinaryIO, reader))
                if not reader.verified:
                    raise Internal(f"blob {digest}: the sink stopped reading before the end")
        except MissingBlobs:
            return {digest}
        return set()

    # ------------------------------------------------------------------ writes

    def write(self, data: bytes) -> Digest:
        digest = Digest.of_bytes(data)
        self._upload({digest: _bytes_source(data)})
        return digest

    def write_many(self, blobs: Iterable[bytes]) -> list[Digest]:
        """Upload every blob (batched, big ones streamed, concurrently); return their
        digests in order. Writes even blobs the server has: ask find_missing first to avoid
        that."""
        data = list(blobs)
        digests = [Digest.of_bytes(blob) for blob in data]
        self._upload({digest: _bytes_source(blob) for digest, blob in zip(digests, data)})
        return digests

    def write_stream(self, stream: BinaryIO) -> Digest:
        """Upload everything readable from ``stream`` (from its current position). A
        stream bigger than a batch is spooled to an anonymous temporary file while hashing,
        because its digest must be known before the first byte is sent."""
        limit = self.batch_budget() - PER_BLOB_OVERHEAD
        with _local_io("reading the stream to upload"):
            head = stream.read(limit + 1)
        if len(head) <= limit:
            return self.write(head)
        with _local_io("spooling the stream to upload"), tempfile.TemporaryFile(prefix="reapi-upload-") as spool:
            hasher = hashlib.sha256(head)
            spool.write(head)
            size = len(head)
            while chunk := stream.read(self._options.chunk_bytes):
                hasher.update(chunk)
                spool.write(chunk)
                size += len(chunk)
            spool.flush()
            digest = Digest(hasher.hexdigest(), size)
            self._upload({digest: _fd_source(spool.fileno())})
        return digest

    def write_file(self, path: str | os.PathLike[str]) -> Digest:
        """Upload the file at ``path`` (not following a final symlink); the file is read
        twice, once to digest it and once to send it."""
        with _local_io(f"reading {os.fsdecode(path)}"), _open_nofollow(path) as stream:
            digest = Digest.of_file(stream)
        self._upload({digest: _path_source(path)})
        return digest

    def write_files(self, files: Mapping[Digest, str | os.PathLike[str]]) -> None:
        """Upload each file under the digest the caller claims for it, concurrently.
        Bytes are checked against the claim before the server commits them: a mismatch
        raises DataLoss and the blob is not stored."""
        self._upload({digest: _path_source(path) for digest, path in files.items()})

    def _upload(self, sources: Mapping[Digest, "_Source"]) -> None:
        wanted = {d: s for d, s in sources.items() if d != EMPTY_DIGEST}
        if not wanted:
            return
        budget = self.batch_budget()
        small = [d for d in wanted if d.size_bytes + PER_BLOB_OVERHEAD <= budget]
        big = [d for d in wanted if d.size_bytes + PER_BLOB_OVERHEAD > budget]
        tasks: list[Callable[[], None]] = [
            functools.partial(self._update_batch, {d: wanted[d] for d in batch})
            for batch in pack_batches(small, budget)
        ]
        tasks += [functools.partial(self._write_stream, digest, wanted[digest]) for digest in big]
        self._run_all(tasks)

    def _update_batch(self, sources: dict[Digest, "_Source"]) -> None:
        """One BatchUpdateBlobs, retried for the blobs that failed transiently. Sources
        are read here, on the pool thread, so only the batches in flight sit in memory."""
        pending = {digest: _read_small(digest, source) for digest, source in sources.items()}

        def attempt(timeout: float) -> None:
            request = re_pb2.BatchUpdateBlobsRequest(
                instance_name=self.instance_name,
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(digest=d.to_proto(), data=data)
                    for d, data in sorted(pending.items())
                ],
            )
            reply = self._cas.BatchUpdateBlobs(request, timeout=timeout)
            transient: Transient | None = None
            for entry in reply.responses:
                digest = Digest.from_proto(entry.digest)
                status = _per_blob_status(entry.status.code)
                if status == grpc.StatusCode.OK:
                    pending.pop(digest, None)
                elif status in RETRYABLE:
                    transient = Transient(status, f"blob {digest}: {entry.status.message}")
                else:
                    raise from_grpc(status, f"BatchUpdateBlobs: blob {digest}: {entry.status.message}")
            if transient is not None:
                raise transient
            if pending:
                raise Internal(f"BatchUpdateBlobs: server did not answer for {len(pending)} blob(s)")

        self._call(f"BatchUpdateBlobs ({len(sources)} blobs)", attempt)

    def _write_stream(self, digest: Digest, source: "_Source") -> None:
        """One blob through ByteStream Write, resumed after QueryWriteStatus on failure."""
        resource = self.upload_resource_name(digest)
        first_attempt = [True]

        def attempt(timeout: float) -> None:
            offset = 0
            if not first_attempt[0]:
                offset = self._committed_size(resource, digest, timeout)
                if offset == digest.size_bytes:
                    return
            first_attempt[0] = False
            failure: list[ReapiError] = []
            requests = self._write_requests(resource, digest, source, offset, failure)
            try:
                reply = self._bytestream.Write(requests, timeout=timeout)
            except grpc.RpcError:
                # The request generator cancels the call when the local bytes turn out not
                # to match the digest; report that, not the cancellation it caused.
                if failure:
                    raise failure[0] from None
                raise
            # -1 is what newer servers answer for a blob they already had.
            if reply.committed_size not in (digest.size_bytes, -1):
                raise Internal(f"ByteStream.Write {resource}: server committed {reply.committed_size} bytes")

        self._call(f"ByteStream.Write {resource}", attempt, timeout=self._stream_timeout(digest))

    def _committed_size(self, resource: str, digest: Digest, timeout: float) -> int:
        """Where to resume an interrupted upload; 0 if the server cannot tell (BuildGrid
        0.4.4 answers UNIMPLEMENTED) or forgot it."""
        try:
            status = self._bytestream.QueryWriteStatus(
                bytestream_pb2.QueryWriteStatusRequest(resource_name=resource), timeout=timeout
            )
        except grpc.RpcError as error:
            if rpc_status(error)[0] in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
                return 0
            raise
        if status.complete:
            return digest.size_bytes
        return status.committed_size if 0 <= status.committed_size < digest.size_bytes else 0

    def _write_requests(
        self, resource: str, digest: Digest, source: "_Source", offset: int, failure: list[ReapiError]
    ) -> Iterator[bytestream_pb2.WriteRequest]:
        """WriteRequests sending the source's bytes from ``offset``.

        The whole source is hashed (the part before ``offset`` is read but not sent) and the
        final request, the one with ``finish_write``, is only sent once the bytes are known
        to match ``digest``; otherwise the failure is recorded and the generator raises,
        which makes gRPC cancel the call before the server can commit anything.
        """
        chunk_bytes = self._options.chunk_bytes
        hasher = hashlib.sha256()
        position = 0
        first = True
        try:
            with source() as stream:
                pending = stream.read(chunk_bytes)
                while True:
                    following = stream.read(chunk_bytes) if pending else b""
                    start = position
                    position += len(pending)
                    hasher.update(pending)
                    last = not following
                    if position > digest.size_bytes or (
                        last and (position != digest.size_bytes or hasher.hexdigest() != digest.hash)
                    ):
                        failure.append(DataLoss(f"uploading blob {digest}: the local bytes do not match it"))
                        raise failure[0]
                    if position > offset or last:
                        yield bytestream_pb2.WriteRequest(
                            resource_name=resource if first else "",
                            write_offset=max(start, offset),
                            data=pending[max(0, offset - start):],
                            finish_write=last,
                        )
                        first = False
                    if last:
                        return
                    pending = following
        except OSError as error:
            failure.append(from_os_error(error, f"reading blob {digest} to upload"))
            raise failure[0] from None

    # -------------------------------------------------------------------- trees

    def get_tree(self, root_digest: Digest) -> list[re_pb2.Directory]:
        """Every Directory of the tree under ``root_digest`` as GetTree returns them,
        following page tokens. Not verified (GetTree gives no digests); use
        :meth:`fetch_tree` for a checked tree. Raises MissingBlobs naming the root if the
        server does not have it."""
        if root_digest == EMPTY_DIGEST:
            return [re_pb2.Directory()]
        directories: list[re_pb2.Directory] = []
        page = _Page()

        def attempt(timeout: float) -> bool:
            # A retried call starts over from the last token: drop what it already gave.
            del directories[page.kept:]
            request = re_pb2.GetTreeRequest(
                instance_name=self.instance_name, root_digest=root_digest.to_proto(), page_token=page.token
            )
            token = ""
            for reply in self._cas.GetTree(request, timeout=timeout):
                directories.extend(reply.directories)
                token = reply.next_page_token
                if token:
                    page.token, page.kept = token, len(directories)
            return bool(token)

        try:
            while self._call(f"GetTree {root_digest}", attempt):
                pass
        except NotFound:
            raise MissingBlobs([root_digest], "GetTree") from None
        return directories

    def fetch_tree(self, root_digest: Digest, sink: BlobSink | None = None) -> dict[Digest, re_pb2.Directory]:
        """Every Directory reachable from ``root_digest``, keyed by digest, verified.

        Uses GetTree, then checks that each referenced digest is the digest of a Directory
        it returned; any that is not (a client that uploaded non-canonical bytes, or a
        server that lied) is read as a blob by digest, which verifies it. If ``sink`` is
        given, every Directory blob is inserted into it, under the digest the tree refers
        to it by. Raises MissingBlobs naming every absent Directory.
        """
        by_digest = {Digest.of_message(d): d for d in self.get_tree(root_digest)}
        tree: dict[Digest, re_pb2.Directory] = {}
        blobs: dict[Digest, bytes] = {}
        queue = [root_digest]
        while queue:
            unresolved: set[Digest] = set()
            for digest in queue:
                if digest in tree:
                    continue
                if digest == EMPTY_DIGEST:
                    tree[digest], blobs[digest] = re_pb2.Directory(), b""
                elif digest in by_digest:
                    tree[digest], blobs[digest] = by_digest[digest], serialize(by_digest[digest])
                else:
                    unresolved.add(digest)
            for digest, data in self.read_many(unresolved).items():
                tree[digest], blobs[digest] = _parse_directory(digest, data), data
            queue = [
                Digest.from_proto(child.digest)
                for digest in queue
                for child in tree[digest].directories
                if Digest.from_proto(child.digest) not in tree
            ]
        if sink is not None:
            for digest, data in blobs.items():
                sink.insert(digest, data)
        return tree

    # ---------------------------------------------------------- resource names

    def read_resource_name(self, digest: Digest) -> str:
        prefix = f"{self.instance_name}/" if self.instance_name else ""
        return f"{prefix}blobs/{digest.hash}/{digest.size_bytes}"

    def upload_resource_name(self, digest: Digest) -> str:
        """A fresh upload name; one per blob upload, kept across its resumed attempts."""
        prefix = f"{self.instance_name}/" if self.instance_name else ""
        return f"{prefix}uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"

    # -------------------------------------------------------------- machinery

    def _stream_timeout(self, digest: Digest) -> float:
        return self._options.call_timeout + digest.size_bytes / self._options.min_stream_bytes_per_second

    def _call(self, what: str, attempt: Callable[[float], T], timeout: float | None = None) -> T:
        """Run ``attempt(deadline_seconds)`` until it succeeds, retrying transient
        failures with backoff. The one place a ``grpc.RpcError`` becomes our error.

        ``attempt`` must be safe to run again after a failure (it keeps its own progress).
        Raises Unavailable after ``retry.max_attempts`` transient failures in a row, or the
        translated error of a non-retryable status at once. Errors of our own hierarchy
        raised by ``attempt`` pass through untouched.
        """
        deadline = timeout if timeout is not None else self._options.call_timeout
        return call_with_retries(what, attempt, deadline, self._options.retry, self._sleep, self._rng)

    def _run_all(self, tasks: list[Callable[[], T]]) -> list[T]:
        """Run ``tasks`` on the pool (inline if there is only one) and wait for all.

        MissingBlobs from several tasks are merged into one; any other exception is raised
        (the first one, in task order) only after every task has finished.
        """
        if len(tasks) == 1:
            return [tasks[0]()]
        futures = [self._pool.submit(task) for task in tasks]
        concurrent.futures.wait(futures)
        results: list[T] = []
        missing: set[Digest] = set()
        for future in futures:
            error = future.exception()
            if isinstance(error, MissingBlobs):
                missing.update(error.digests)
            elif error is not None:
                raise error
            else:
                results.append(future.result())
        if missing:
            raise MissingBlobs(missing)
        return results


class _Page:
    """Where a GetTree listing got to: the last page token and how many Directories
    came before it (mutable progress, not a value)."""

    def __init__(self) -> None:
        self.token = ""
        self.kept = 0


def _parse_directory(digest: Digest, data: bytes) -> re_pb2.Directory:
    directory = re_pb2.Directory()
    try:
        directory.ParseFromString(data)
    except Exception as error:  # protobuf raises DecodeError, or others on odd input
        raise InvalidArgument(f"blob {digest} is not a Directory: {error}") from None
    return directory


# ---------------------------------------------------------------- upload sources

# A source opens a fresh binary stream positioned at the blob's first byte; the uploader
# closes it. Opening again (for a retry) starts over.
_Source = Callable[[], BinaryIO]


def _bytes_source(data: bytes) -> _Source:
    return lambda: io.BytesIO(data)


def _path_source(path: str | os.PathLike[str]) -> _Source:
    return lambda: _open_nofollow(path)


def _fd_source(fd: int) -> _Source:
    def open_() -> BinaryIO:
        # pread-based reads would be nicer, but a dup sharing the offset is enough: one
        # blob's attempts run one after another.
        stream = os.fdopen(os.dup(fd), "rb")
        stream.seek(0)
        return stream

    return open_


@contextlib.contextmanager
def _local_io(what: str) -> Iterator[None]:
    """Translate OSError from local files (what we upload, where we download to)."""
    try:
        yield
    except OSError as error:
        raise from_os_error(error, what) from None


def _open_nofollow(path: str | os.PathLike[str]) -> BinaryIO:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return os.fdopen(fd, "rb")


def _read_small(digest: Digest, source: _Source) -> bytes:
    """A batchable blob's bytes, checked against the digest it is uploaded under."""
    with _local_io(f"reading blob {digest} to upload"), source() as stream:
        data = stream.read(digest.size_bytes + 1)
    if len(data) != digest.size_bytes or hashlib.sha256(data).hexdigest() != digest.hash:
        raise DataLoss(f"uploading blob {digest}: the local bytes do not match it")
    return data


class _DictSink:
    """A BlobSink collecting blobs in memory (for read_many). Thread-safe."""

    def __init__(self) -> None:
        self.blobs: dict[Digest, bytes] = {}
        self._lock = threading.Lock()

    def insert(self, digest: Digest, data: bytes) -> None:
        with self._lock:
            self.blobs[digest] = data

    def insert_stream(self, digest: Digest, stream: BinaryIO) -> None:
        data = stream.read()
        with self._lock:
            self.blobs[digest] = data


__all__ = [
    "BlobSink",
    "CasCapabilities",
    "RemoteCAS",
    "RemoteOptions",
    "check_instance_name",
    "pack_batches",
    "verify",
    "FIND_MISSING_BATCH",
    "PER_BLOB_OVERHEAD",
    "REQUEST_HEADROOM",
]
