"""``FetchThroughStore``: a local cache in front of a remote CAS.

Reads are served from the local cache; a miss is fetched from the remote CAS (verified
there, verified again by the cache on insert) and kept. Writes go to the local cache only;
:meth:`FetchThroughStore.upload_missing` later sends the remote what it lacks. So a worker
stages inputs from local files and uploads outputs once, after the action.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

from reapi_worker.protos.errors import MissingBlobs

from .content import LocalContent, PinSet
from .digests import Digest
from .remote_cas import RemoteCAS


@dataclass(frozen=True, slots=True)
class TransferStats:
    """Totals since the store was created: blobs and bytes fetched from the remote CAS
    into the local cache, and uploaded from the local cache to the remote CAS."""

    blobs_fetched: int = 0
    bytes_fetched: int = 0
    blobs_uploaded: int = 0
    bytes_uploaded: int = 0


class FetchThroughStore(LocalContent):
    """``local`` first, ``remote`` on a miss; writes stay local until uploaded.

    Neither ``local`` nor ``remote`` is closed by this store; its owner closes them.
    Thread-safe. Two threads missing the same blob at once may both fetch it; the cache
    keeps one copy (an insert of a present blob is harmless).

    Raises what the two stores raise: MissingBlobs naming every blob neither holds,
    DataLoss for a corrupt remote blob (which is then not cached), Unavailable when the
    remote stays unreachable.
    """

    def __init__(self, local: LocalContent, remote: RemoteCAS) -> None:
        self._local = local
        self._remote = remote
        self._lock = threading.Lock()
        self._stats = TransferStats()

    @property
    def local(self) -> LocalContent:
        return self._local

    @property
    def remote(self) -> RemoteCAS:
        return self._remote

    def stats(self) -> TransferStats:
        """A snapshot of the transfer counters."""
        with self._lock:
            return self._stats

    # ------------------------------------------------------------------ reads

    def find_missing(self, digests: Iterable[Digest]) -> set[Digest]:
        """The blobs neither the local cache nor the remote CAS holds (asks the remote
        only about the local misses)."""
        local_misses = self._local.find_missing(digests)
        return self._remote.find_missing(local_misses) if local_misses else set()

    def read(self, digest: Digest) -> bytes:
        try:
            return self._local.read(digest)  # a hit needs no pin: the read is one open()
        except MissingBlobs:
            pass
        with self._local.pinned([digest]):
            self.fetch([digest])
            return self._local.read(digest)

    def read_many(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        wanted = set(digests)
        with self._local.pinned(wanted):
            self.fetch(wanted)
            return {digest: self._local.read(digest) for digest in wanted}

    def fetch(self, digests: Iterable[Digest]) -> None:
        """Make every blob of ``digests`` local: the local misses are fetched from the
        remote concurrently (small ones batched, big ones streamed straight into the cache).
        Raises MissingBlobs naming every blob the remote does not have; the others are
        cached all the same. Pin the digests first if they must survive until used."""
        misses = self._local.find_missing(digests)
        if misses:
            self._remote.read_into(misses, _CountingSink(self._local, self._count_fetched))

    def path(self, digest: Digest, executable: bool = False) -> str:
        """The local cache's file for the blob; MissingBlobs if it is not local (call
        :meth:`fetch` first: a path is for linking, which must not wait on the network)."""
        return self._local.path(digest, executable)

    def object_path(self, digest: Digest, executable: bool = False) -> str:
        """The local cache's path without a stat: only for blobs pinned and fetched (the
        stager's hot loop)."""
        return self._local.object_path(digest, executable)

    def fetch_tree(self, root: Digest) -> None:
        """Fetch every Directory proto under ``root`` with one GetTree (verified) into the
        local cache, unless the root is already local: then its subtree most likely is too,
        and any Directory evicted since is fetched on demand by ``read``."""
        if self._local.find_missing([root]):
            self._remote.fetch_tree(root, sink=_CountingSink(self._local, self._count_fetched))

    def pinned(self, digests: Iterable[Digest]) -> contextlib.AbstractContextManager[None]:
        return self._local.pinned(digests)

    def pin_set(self) -> PinSet:
        """A new pin set of the local cache; the caller releases it."""
        return self._local.pin_set()

    def insert(self, digest: Digest, data: bytes) -> None:
        """Into the local cache (verified there); nothing is sent to the remote."""
        self._local.insert(digest, data)

    def insert_stream(self, digest: Digest, stream: BinaryIO, *, stream_verifies: bool = False) -> None:
        self._local.insert_stream(digest, stream, stream_verifies=stream_verifies)

    # ----------------------------------------------------------------- writes

    def write(self, data: bytes) -> Digest:
        """Store locally only; see :meth:`upload_missing`."""
        return self._local.write(data)

    def write_stream(self, stream: BinaryIO) -> Digest:
        return self._local.write_stream(stream)

    def write_file(self, path: str | os.PathLike[str]) -> Digest:
        return self._local.write_file(path)

    def upload_missing(self, digests: Iterable[Digest]) -> set[Digest]:
        """Send the remote every blob of ``digests`` that FindMissingBlobs says it lacks,
        from the local cache's files (big ones streamed); return the digests sent.

        Raises MissingBlobs naming every blob the remote lacks that is not local either
        (nothing is uploaded then). The blobs are pinned while they are read.
        """
        wanted = set(digests)
        with self._local.pinned(wanted):
            missing = self._remote.find_missing(wanted)
            if not missing:
                return set()
            absent = self._local.find_missing(missing)
            if absent:
                raise MissingBlobs(absent, "uploading to the remote CAS")
            self._remote.write_files({digest: self._local.path(digest) for digest in missing})
        with self._lock:
            self._stats = dataclasses.replace(
                self._stats,
                blobs_uploaded=self._stats.blobs_uploaded + len(missing),
                bytes_uploaded=self._stats.bytes_uploaded + sum(d.size_bytes for d in missing),
            )
        return missing

    def _count_fetched(self, digest: Digest) -> None:
        with self._lock:
            self._stats = dataclasses.replace(
                self._stats,
                blobs_fetched=self._stats.blobs_fetched + 1,
                bytes_fetched=self._stats.bytes_fetched + digest.size_bytes,
            )


class _CountingSink:
    """Passes fetched blobs to the cache and counts the ones it accepted."""

    def __init__(self, local: LocalContent, counted: Callable[[Digest], None]) -> None:
        self._local = local
        self._counted = counted

    def insert(self, digest: Digest, data: bytes) -> None:
        self._local.insert(digest, data)
        self._counted(digest)

    def insert_stream(self, digest: Digest, stream: BinaryIO) -> None:
        # RemoteCAS hands a sink only streams that verify themselves (BlobSink's contract).
        self._local.insert_stream(digest, stream, stream_verifies=True)
        self._counted(digest)


__all__ = ["FetchThroughStore", "TransferStats"]
