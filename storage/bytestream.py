"""``BlobReader``: one blob read over ByteStream, verified as it arrives, resumed where it
broke. :class:`~.remote_cas.RemoteCAS` opens one for every blob too big for a batch."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

from reapi_worker.protos import bytestream_pb2, bytestream_pb2_grpc
from reapi_worker.protos.errors import DataLoss, MissingBlobs, NotFound

from .digests import Digest

T = TypeVar("T")


class Caller(Protocol):
    """How each attempt is run: ``call(what, attempt, timeout)`` runs ``attempt(deadline)``
    with retries and translates its gRPC errors (``RemoteCAS._call``)."""

    def __call__(self, what: str, attempt: Callable[[float], T], timeout: float | None = None) -> T: ...


class BlobReader(io.RawIOBase):
    """A read-only stream of one blob over ByteStream Read, verified and resumable.

    Bytes are handed out as they arrive, except that the chunk completing the blob is
    held back until the whole blob is verified: a consumer reading to the end either
    receives exactly the blob or gets DataLoss (too many bytes, too few, wrong hash) from
    ``read``. A stream broken by a retryable error is reopened at the offset reached
    (``read_offset``), each chunk with the full retry budget. MissingBlobs if the server
    does not have the blob. Not thread-safe: one consumer. ``close`` cancels the call.
    """

    def __init__(self, call: Caller, stub: bytestream_pb2_grpc.ByteStreamStub, resource: str, digest: Digest,
                 timeout: float) -> None:
        self._responses: Iterator[bytestream_pb2.ReadResponse] | None = None
        super().__init__()
        self._call = call
        self._stub = stub
        self._timeout = timeout
        self._digest = digest
        self._resource = resource
        self._offset = 0  # bytes received and hashed
        self._hasher = hashlib.sha256()
        self._buffer = memoryview(b"")
        self._done = digest.size_bytes == 0
        self.verified = self._done

    def readable(self) -> bool:
        return True

    def prefetch(self) -> None:
        """Fetch the first chunk now (so a missing blob is reported before any bytes are
        consumed)."""
        if not self._buffer and not self._done:
            self._fill()

    def read(self, size: int | None = -1) -> bytes:
        # Overridden so that reads hand out slices of the received chunks instead of
        # copying them through RawIOBase's 8 KiB readinto loop.
        if size is None or size < 0:
            return self.readall()
        while not self._buffer:
            if self._done or size == 0:
                return b""
            self._fill()
        piece = self._buffer[:size]
        self._buffer = self._buffer[len(piece):]
        return piece.tobytes()

    def readall(self) -> bytes:
        parts = []
        while piece := self.read(1 << 30):
            parts.append(piece)
        return b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        piece = self.read(len(buffer))
        buffer[: len(piece)] = piece
        return len(piece)

    def close(self) -> None:
        self._drop_stream()
        super().close()

    def _fill(self) -> None:
        what = f"ByteStream.Read {self._resource} at {self._offset}"
        try:
            chunk = self._call(what, self._next_chunk, self._timeout)
        except NotFound:
            raise MissingBlobs([self._digest]) from None
        size = self._digest.size_bytes
        if chunk is None:
            raise DataLoss(f"blob {self._digest}: server ended the stream after {self._offset} bytes")
        if self._offset + len(chunk) > size:
            raise DataLoss(f"blob {self._digest}: server sent more than {size} bytes")
        self._hasher.update(chunk)
        self._offset += len(chunk)
        if self._offset == size:
            actual = self._hasher.hexdigest()
            if actual != self._digest.hash:
                raise DataLoss(f"blob {self._digest}: server sent bytes hashing to {actual}")
            self._done = self.verified = True
            self._drop_stream()
        self._buffer = memoryview(chunk)

    def _next_chunk(self, timeout: float) -> bytes | None:
        """One attempt: (re)open the stream at the offset reached if needed, return its
        next non-empty chunk, or None at its end."""
        if self._responses is None:
            request = bytestream_pb2.ReadRequest(resource_name=self._resource, read_offset=self._offset)
            self._responses = self._stub.Read(request, timeout=timeout)
        try:
            for response in self._responses:
                if response.data:
                    return response.data
            return None
        except BaseException:
            # The stream is dead; the retry reopens it where we got to.
            self._drop_stream()
            raise

    def _drop_stream(self) -> None:
        responses, self._responses = self._responses, None
        cancel = getattr(responses, "cancel", None)
        if callable(cancel):
            cancel()
