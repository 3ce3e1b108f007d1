"""The store interfaces: :class:`ContentStore`, what every CAS in this project offers, and
:class:`LocalContent`, a store whose blobs are local files (what stagers and the executor
need).

Implementations: :class:`~.local_cas.LocalCAS` (files on disk, a LocalContent),
:class:`~.fetch_through.FetchThroughStore` (a LocalContent in front of a remote CAS: it
is one too), :class:`~.remote_cas.RemoteCAS` (a ContentStore over gRPC) and
:class:`MemoryStore` below (a small in-process fake for unit tests of code that only
needs a store). tests/component/test_store_conformance.py runs one suite over all of them.

Contract shared by all implementations:

* blobs are immutable and addressed by :class:`~.digests.Digest`;
* ``read`` of an absent blob raises :class:`~reapi_worker.protos.errors.MissingBlobs`
  naming it; a blob whose bytes do not hash to its digest is never returned (DataLoss);
* ``write*`` returns the digest of what was stored; writing a blob that is already
  present is cheap and harmless;
* all methods are safe to call from several threads at once.

A :class:`LocalContent` additionally keeps blobs as files that can be hardlinked
(``path``, ``object_path``), protects them from eviction while an action uses them
(``pinned``, ``pin_set``) and accepts blobs from a remote under a claimed digest
(``insert``, ``insert_stream``). Its files have :data:`BLOB_MODES`, and so does every
input file an action is shown, however staged (a link, a copy, a FUSE view).
"""

from __future__ import annotations

import abc
import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from reapi_worker.protos.errors import MissingBlobs, from_os_error

from .digests import Digest

#: The mode of a blob's file, by executable bit: 0644/0755, as BuildStream's local sandbox
#: shows a build its inputs (where an overlay makes them the action's own, it may append
#: without a chmod first). What keeps actions from writing the cache is the files' owner
#: (the worker), not the mode.
BLOB_MODES = (0o644, 0o755)


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
        """Store the bytes of the local file at ``path`` (never following a final symlink:
        InvalidArgument for one; NotFound if there is no file)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            raise from_os_error(err, f"storing file {os.fsdecode(path)}") from None
        with os.fdopen(fd, "rb") as stream:
            return self.write_stream(stream)

    def read_many(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """Read several blobs; raises MissingBlobs listing every absent one."""
        wanted = set(digests)
        missing = self.find_missing(wanted)
        if missing:
            raise MissingBlobs(missing)
        return {digest: self.read(digest) for digest in wanted}


class PinSet(abc.ABC):
    """A growing set of blobs protected from eviction for an action's lifetime (from
    :meth:`LocalContent.pin_set`). Safe to use from several threads. The holder calls
    :meth:`release` (or uses ``with``); after that, ``add`` raises Internal."""

    @abc.abstractmethod
    def add(self, digests: Iterable[Digest]) -> None:
        """Pin ``digests``, present or not: a blob found present after this returns stays
        present until release. Raises ResourceExhausted if the pin cannot be recorded."""

    @abc.abstractmethod
    def release(self) -> None:
        """Unpin every blob of the set. Idempotent."""

    def __enter__(self) -> "PinSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LocalContent(ContentStore):
    """A store whose blobs are local files, so they can be hardlinked into a build tree."""

    @abc.abstractmethod
    def path(self, digest: Digest, executable: bool = False) -> str:
        """Absolute path of a file holding exactly the blob's bytes.

        Non-executable blobs are mode 0644, executable ones 0755 (as BuildStream's local
        sandbox shows inputs; the owner, never a sandbox's uid, is what protects them), and
        the two variants are different inodes (a hardlinked input must never change mode
        under another action). Raises MissingBlobs if the blob is not local. The file must not be
        written to; link it or copy it.
        """

    @abc.abstractmethod
    def object_path(self, digest: Digest, executable: bool = False) -> str:
        """Where the blob's file is or would be: string formatting only, no system call.

        For hot loops only (staging, FUSE reads): valid just for blobs that are pinned and
        known local (``find_missing`` or ``fetch`` said so after the pin; for
        ``executable``, after ``path(digest, executable=True)`` once). Anything else must
        call :meth:`path`.
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

    @abc.abstractmethod
    def pin_set(self) -> PinSet:
        """A new, empty :class:`PinSet` for one action's lifetime; the caller releases it."""

    @abc.abstractmethod
    def insert(self, digest: Digest, data: bytes) -> None:
        """Store bytes that claim to be ``digest`` (from a remote CAS). Raises DataLoss
        naming ``digest`` if they are not, and then stores nothing."""

    @abc.abstractmethod
    def insert_stream(self, digest: Digest, stream: BinaryIO, *, stream_verifies: bool = False) -> None:
        """As :meth:`insert`, reading ``stream`` to its end. ``stream_verifies``: the stream
        itself raises DataLoss from ``read`` unless it yields exactly the blob, so the store
        need only check the size."""


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
