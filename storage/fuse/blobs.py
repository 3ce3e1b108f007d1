"""The local cache's side of serving a blob: is it here, open it, fetch it and open it.
Shared by both FUSE backends (:mod:`.operations`, :mod:`.kernel_requests`)."""

from __future__ import annotations

import os

from reapi_worker.protos.errors import Internal, MissingBlobs

from ..content import LocalContent
from ..digests import Digest


def is_local(store: LocalContent, digest: Digest) -> bool:
    """Whether the blob is in the local cache; never asks a remote."""
    try:
        store.path(digest)
        return True
    except MissingBlobs:
        return False


def open_local(store: LocalContent, digest: Digest) -> int | None:
    """A descriptor of the blob's cache file, or None if it is not local. Once open, the
    bytes stay readable even if the cache evicts the file.

    Opens the cache's object path directly and checks the size, as LocalCAS's own reads
    do: ``path()`` would first take the cache's shared counter lock, on every open.
    """
    try:
        fd = os.open(store.object_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        if os.fstat(fd).st_size == digest.size_bytes:
            return fd
        os.close(fd)  # being written or truncated: let the store decide
        return os.open(store.path(digest), os.O_RDONLY | os.O_CLOEXEC)
    except (MissingBlobs, FileNotFoundError):
        return None


def fetch_and_open(store: LocalContent, digest: Digest) -> int:
    with store.pinned([digest]):  # not evicted between arriving and being opened
        store.fetch([digest])
        try:
            return os.open(store.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise Internal(f"opening cached blob {digest}: {err.strerror}") from None
