"""The ``ContentStore`` interface: what every CAS in this project offers.

Implementations: :class:`~.local_cas.LocalCAS` (files on disk),
:class:`~.fetch_through.FetchThroughStore` (local cache in front of a remote CAS) and
:class:`MemoryStore` below (a small in-process fake for unit tests of code that only
needs a store).

Contract shared by all implementations:

* blobs are immutable and addressed by :class:`~.digests.Digest`;
* ``read`` of an absent blob raises :class:`~reapi_worker.protos.errors.MissingBlobs`
  naming it; a blob whose bytes do not hash to its digest is never returned (DataLoss);
* ``write*`` returns the digest of what was stored; writing a blob that is already
  present is cheap and harmless;
* all methods are safe to call from several threads at once.

A :class:`LocalContent` additionally keeps blobs as files that can be hardlinked
(``path``) and protects them from eviction while an action uses them (``pinned``).
"""

from __future__ import annotations

import abc
import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from reapi_worker.protos.errors import MissingBlobs

from .digests import Digest


class ContentStore(abc.ABC):
    """Read and write content-addressed blobs."""

    @abc.abstractmethod
    def find_missing(self, digests: Iterable[Digest]) -> set[Digest]:
        """The subset of ``digests`` this store does not hold."""

    @abc.abstractmethod
    def read(self, digest: Digest) -> bytes:
        """The blob's bytes. Raises MissingBlobs if absent, DataLoss if corrupt."""

    @abc.abstractmethod
    def write(self, data: bytes) -> Digest:
        """Store ``data``; return its digest."""

    def write_stream(self, stream: BinaryIO) -> Digest:
        """Store everything readable from ``stream``; return its digest.

        The default reads it into memory; stores that hold files override this to
        stream into a temporary file while hashing.
        """
        return self.write(stream.read())

    def write_file(self, path: str | os.PathLike[str]) -> Digest:
        """Store the bytes of the local file at ``path`` (never following a final symlink)."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as stream:
            return self.write_stream(stream)

    def read_many(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """Read several blobs; raises MissingBlobs listing every absent one."""
        wanted = set(digests)
        missing = self.find_missing(wanted)
        if missing:
            raise MissingBlobs(missing)
        return {digest: self.read(digest) for digest in wanted}


class LocalContent(ContentStore):
    """A store whose blobs are local files, so they can be hardlinked into a build tree."""

    @abc.abstractmethod
    def path(self, digest: Digest, executable: bool = False) -> str:
        """Absolute path of a file holding exactly the blob's bytes.

        Non-executable blobs are mode 0444, executable ones 0555, and the two variants
        are different inodes (a hardlinked input must never change mode under another
        action). Raises MissingBlobs if the blob is not local. The file must not be
        written to; link it or copy it.
        """

    @abc.abstractmethod
    def fetch(self, digests: Iterable[Digest]) -> None:
        """Make every blob in ``digests`` local (fetching it if this store can).

        Raises MissingBlobs naming *every* digest that could not be made local.
        """

    @abc.abstractmethod
    def pinned(self, digests: Iterable[Digest]) -> contextlib.AbstractContextManager[None]:
        """While the context is open, none of ``digests`` is evicted (by this process or
        by another sharing the cache). Pinning a digest that is not local is allowed: it
        protects the blob once it arrives."""


    def fetch_tree(self, root: Digest) -> None:
        """Make every Directory proto of the tree under ``root`` local in as few round
        trips as the store can (GetTree for a remote one). Stores without a remote have
        nothing to fetch; a lazily loaded tree still reports what is missing."""

    def upload_missing(self, digests: Iterable[Digest]) -> set[Digest]:
        """Make ``digests`` readable by whoever reads the ActionResult: a store in front of
        a remote CAS uploads what the remote lacks and returns those digests. A purely
        local store is already where the reader looks: nothing to do."""
        return set()


class MemoryStore(ContentStore):
    """A ContentStore in a dict: the in-repo fake for unit tests. Thread-safe."""

    def __init__(self) -> None:
        self._blobs: dict[Digest, bytes] = {}
        self._lock = threading.Lock()
        self.reads = 0

    def find_missing(self, digests: Iterable[Digest]) -> set[Digest]:
        with self._lock:
            return {d for d in digests if d not in self._blobs}

    def read(self, digest: Digest) -> bytes:
        with self._lock:
            self.reads += 1
            try:
                return self._blobs[digest]
            except KeyError:
                raise MissingBlobs([digest]) from None

    def write(self, data: bytes) -> Digest:
        digest = Digest.of_bytes(data)
        with self._lock:
            self._blobs.setdefault(digest, bytes(data))
        return digest

    def __iter__(self) -> Iterator[Digest]:
        with self._lock:
            return iter(list(self._blobs))

    def __len__(self) -> int:
        return len(self._blobs)
