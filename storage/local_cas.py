"""The on-disk CAS: verified, content-addressed files that can be hardlinked into build trees.

Several worker processes on one host may share a root; every rule below holds across them.

Layout under ``root``::

    objects/<hh>/<hash>      a blob, mode 0644 (<hh> = the hash's first two hex digits)
    objects/<hh>/<hash>.x    its executable variant, mode 0755: a separate inode
    modes-2                  written once every blob has the modes above (see Modes)
    tmp/<token>.<n>          a file being written, linked into objects/ once complete
    pins/<token>.<n>         one per PinSet: "\\n"-separated pinned hashes (empty: spare)
    owners/<token>           flock(LOCK_EX)-held by one open LocalCAS for its whole life
    size                     shared "<bytes> <generation>" (see Size and Generation below)
    evict.lock               held by the one process running an eviction pass
    pins.lock                LOCK_SH while a PinSet appends, LOCK_EX while a pass deletes

Why it is built this way:

* **Atomic entry.** Bytes go to ``tmp/`` on the same file system, hashed as they are copied,
  then ``os.link`` puts them under their final name (an existing final file is left as it
  is: it holds the same bytes). A crash leaves at worst a temp file, never a partial blob.
  Where the file system can, the temp file has no name at all (``O_TMPFILE``, linked in
  through ``/proc/self/fd``): no name to create and unlink, nothing left by a crash —
  10,000 blobs of 2 KiB stored in 85 ms against 100 ms with named temp files (tmpfs here).
  Nothing is fsynced (the brief's choice: speed). So a *host* crash may leave a blob short
  or zero-filled: ``read`` and ``find_missing`` compare sizes, but a cache that lived
  through a power loss should be emptied at boot. A process crash is harmless.
* **Ownership by flock, not by pid or age.** Each open LocalCAS holds ``owners/<token>``
  locked; the kernel drops the lock when the process dies, so "is the owner of this temp or
  pin file alive" has an exact answer, also across pid namespaces and without an age guess.
  Files of dead owners are deleted when a LocalCAS opens and by every eviction pass.
* **Pins.** A PinSet appends hashes to its own pin file while holding ``pins.lock`` shared;
  an eviction pass deletes only while holding it exclusively, after reading every live pin
  file. So "pin, then check presence" cannot interleave with a pass: either the pass sees
  the pin, or it finished deleting before the check.
* **Size.** Each process adds the bytes it stores to a private pending total and folds it
  into the shared ``size`` counter (under flock) every ``max_bytes // 64`` bytes (at most
  64 MiB): one locked read-modify-write per batch, not per blob. Every eviction pass
  re-syncs the counter to a scan of ``objects/`` (plus what others added meanwhile), so
  drift does not accumulate. While processes run, the true size may exceed ``max_bytes``
  by their unflushed pending bytes (fewer than ``flush_bytes`` each); once they have all
  closed it is at most ``max_bytes`` unless pins alone exceed it. A crash loses its
  pending bytes from the counter until the next pass.
* **LRU without a syscall per staged file.** The staging hot loop uses ``object_path``,
  which costs nothing. Use is recorded when a PinSet is released (and on ``read`` and on
  writes of a present blob) by ``os.utime`` on the plain file, at most once per blob per
  ``recency_interval`` seconds per process; a pass evicts by that mtime, oldest first. A
  blob and its executable variant are one unit: both count toward the size and both go.
* **Room.** The cache keeps its file system from filling, by itself: (1) whenever its
  size counter is flushed (every ``flush_bytes`` stored, at most a quarter of
  ``keep_free_bytes``) it also reads ``statvfs`` and,
  with less than ``keep_free_bytes`` free, evicts what is missing; (2) a write that meets
  ENOSPC or EDQUOT (creating the temp file, writing it, linking it) evicts enough unpinned
  blobs for what is left to write plus ``keep_free_bytes``, waiting for a pass another
  process is running, and retries — as long as each eviction frees something. Only then is
  it ResourceExhausted, which the executor reports UNAVAILABLE (worker/faults.py): the
  scheduler retries elsewhere, the client never sees the worker's housekeeping.
* **Generation.** Every pass that deletes bumps the generation in ``size`` first. A process
  remembers which digests it saw present under a generation and skips their ``stat`` until
  it changes, so the per-action presence check of a warm tree costs one locked read.
* **Verification.** Bytes are hashed once, when they enter (``write*``, ``insert*``); a
  mismatch is DataLoss and nothing is stored. Reads of a hit are not re-hashed: the file
  was verified on entry, is owned by the worker and never opened for writing again, and re-hashing would double the cost of every read. (A sandbox running as the
  cache's owner could still chmod a hardlinked input: see docs/measured.md's security trap.)

* **Modes.** 0644/0755, the modes BuildStream's local sandbox shows a build its inputs: an
  overlay stager shows the blobs as the action's own (storage/idmapped_mounts.py), and the
  action may then append to or rewrite one in place as locally — the overlay copies it up,
  the blob never changes. What keeps the blobs unwritable to actions is their owner (the
  worker; a sandbox never runs as it, or staging copies: sandbox/identity.py), not the
  mode, which root ignores anyway. Blobs of the first layout (0444/0555) are given the new
  modes when a LocalCAS first opens the root (one pass over ``objects/``; idempotent, so
  two processes doing it at once is harmless), then ``modes-2`` is written.

Not fork-safe: a child process must open its own LocalCAS.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import itertools
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, TypeVar

from reapi_worker.protos.errors import (
    DataLoss,
    Internal,
    InvalidArgument,
    MissingBlobs,
    ReapiError,
    ResourceExhausted,
    from_os_error,
)

from .content import BLOB_MODES, LocalContent, PinSet
from .digests import HASH_HEX_LENGTH, Digest
from reapi_worker.host.owner_locks import become_owner, lock_if_dead

_CHUNK = 1 << 20
_EXEC_SUFFIX = ".x"
_MODES_DONE = "modes-2"
# Digests remembered as present (see Generation); past this many the memory is dropped.
_KNOWN_LIMIT = 1 << 18
# What a write fails with when its file system (or quota) has no room.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of one LocalCAS since it was opened, and the shared size estimate.

    ``hits``/``misses`` count digests found or not by ``find_missing``, ``read`` and
    ``fetch``; ``evictions`` counts blobs (with their variants) evicted by this process.
    """

    hits: int
    misses: int
    evictions: int
    bytes_evicted: int
    size_bytes: int
    max_bytes: int


@dataclass(slots=True)
class _Unit:
    """A blob on disk with its variants, as seen by an eviction scan."""

    mtime: float = 0.0
    size: int = 0
    paths: list[str] = field(default_factory=list)


class LocalCAS(LocalContent):
    """A size-bounded, LRU-evicted CAS in a directory, shareable by processes on one host.

    ``max_bytes`` bounds blobs and their executable variants (see Size in the module doc
    for the slack); a pass evicts down to ``low_watermark * max_bytes``. Use is recorded at
    most once per blob per ``recency_interval`` seconds. ``keep_free_bytes``: free space the
    cache keeps on its file system (see Room in the module doc). Creates the layout under
    ``root``.

    All methods are safe to call from several threads at once. The opener calls
    :meth:`close` (or uses ``with``); a process that dies without closing leaves files that
    the next opener or eviction pass deletes.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        max_bytes: int = 10 * 2**30,
        low_watermark: float = 0.8,
        *,
        recency_interval: float = 60.0,
        keep_free_bytes: int = 0,
        statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
        anonymous_temp_files: bool = True,
    ) -> None:
        if max_bytes <= 0:
            raise InvalidArgument(f"local CAS max_bytes must be positive, not {max_bytes}")
        if not 0.0 < low_watermark <= 1.0:
            raise InvalidArgument(f"local CAS low_watermark must be in (0, 1], not {low_watermark}")
        self.root = os.path.abspath(os.fspath(root))
        self.max_bytes = max_bytes
        self.flush_bytes = max(1, min(max_bytes // 64, 64 << 20))
        self._target = int(max_bytes * low_watermark)
        self._recency_interval = recency_interval
        self.keep_free_bytes = keep_free_bytes
        if keep_free_bytes > 0:
            # Free space is read at each flush: at least four times per keep_free_bytes
            # written, so writes cannot run far past the watermark between two looks.
            self.flush_bytes = max(1, min(self.flush_bytes, keep_free_bytes // 4))
        self._statvfs = statvfs
        self._objects = os.path.join(self.root, "objects")
        self._tmp = os.path.join(self.root, "tmp")
        self._pins = os.path.join(self.root, "pins")
        self._owners = os.path.join(self.root, "owners")
        self._lock = threading.Lock()  # guards the counters and memories below
        self._size_lock = threading.Lock()  # flock belongs to the fd: one thread at a time
        self._hits = self._misses = self._evictions = self._bytes_evicted = self._pending = 0
        self._known: set[Digest] = set()
        self._known_gen = -1
        self._touched: set[str] = set()
        self._touched_since = time.monotonic()
        self._spare_pin_files: list[tuple[str, int]] = []  # emptied, for reuse
        self._seq = itertools.count()  # next() on it is atomic in CPython
        self._closed = False
        with self._translated(f"opening local CAS at {self.root}"):
            for directory in (self._tmp, self._pins, self._owners):
                os.makedirs(directory, exist_ok=True)
            for shard in range(256):
                os.makedirs(os.path.join(self._objects, f"{shard:02x}"), exist_ok=True)
            self._token, self._owner_fd = self._become_owner()
            # -1: named temp files (``anonymous_temp_files=False`` forces them, for tests).
            self._proc_fds = _anonymous_temp_files(self._tmp) if anonymous_temp_files else -1
            self._size_fd = os.open(
                os.path.join(self.root, "size"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
            self._sweep_dead_owners()
            self._upgrade_modes()
            # A new cache, or a lost counter: count what is there, under the counter's lock
            # so that a second process starting now waits for the result.
            counted = self._update_size(lambda size, gen: (self._scan_size() if size < 0 else size, gen))
            self._known_gen = counted[1]  # what this instance stores is known present under it

    # ---- public: ContentStore / LocalContent -------------------------------------------

    def object_path(self, digest: Digest, executable: bool = False) -> str:
        """Where the blob's file is or would be; a pure string computation, no syscalls.

        For the stager's hot loop only: valid just for blobs that are pinned and known local
        (``find_missing`` or ``fetch`` said so after the pin; for ``executable``, after
        ``path(digest, executable=True)`` once). Anything else must call :meth:`path`.
        """
        h = digest.hash
        return f"{self._objects}/{h[:2]}/{h}{_EXEC_SUFFIX if executable else ''}"

    def path(self, digest: Digest, executable: bool = False) -> str:
        """See :meth:`LocalContent.path`. The executable variant is created on first request
        by copying the plain file (verified as it is copied). Raises MissingBlobs."""
        with self._translated(f"locating blob {digest}"):
            if self._missing([digest]):
                raise MissingBlobs([digest])
            if not executable:
                return self.object_path(digest)
            final = self.object_path(digest, executable=True)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(final).st_size == digest.size_bytes:
                    return final
            try:
                src = os.open(self.object_path(digest), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise MissingBlobs([digest]) from None  # evicted since the check: not pinned
            with os.fdopen(src, "rb") as stream:
                self._store(_chunks(stream), digest, executable=True)
            return final

    def find_missing(self, digests: Iterable[Digest]) -> set[Digest]:
        wanted = set(digests)
        with self._translated("checking local CAS"):
            missing = self._missing(wanted)
        self._count(hits=len(wanted) - len(missing), misses=len(missing))
        return missing

    def fetch(self, digests: Iterable[Digest]) -> None:
        """A bare LocalCAS cannot fetch: raises MissingBlobs naming every absent digest."""
        missing = self.find_missing(digests)
        if missing:
            raise MissingBlobs(missing)

    def read(self, digest: Digest) -> bytes:
        """The blob's bytes, not re-hashed (see Verification in the module doc)."""
        with self._translated(f"reading blob {digest}"):
            try:
                stream = open(self.object_path(digest), "rb")
            except FileNotFoundError:
                stream = None
            if stream is not None:
                with stream:
                    if os.fstat(stream.fileno()).st_size == digest.size_bytes:
                        data = stream.read()
                        self._count(hits=1)
                        self._touch([digest.hash])
                        return data
        self._count(misses=1)
        raise MissingBlobs([digest])

    def write(self, data: bytes) -> Digest:
        """Store ``data``. Raises ResourceExhausted if the disk is full (nothing stored), or
        if the cache is over ``max_bytes`` with every other blob pinned (``data`` is then
        stored nonetheless)."""
        digest = Digest.of_bytes(data)
        return self._store_unless_present(digest, data)

    def write_stream(self, stream: BinaryIO) -> Digest:
        """Copy ``stream`` to its end into the cache while hashing it; as :meth:`write`."""
        # A stream that ends within one chunk is hashed before anything is written: when
        # the blob is cached already (an output identical to an earlier one, the common
        # case of a rebuild) no temp file is created and linked for nothing.
        first = stream.read(_CHUNK)
        rest = stream.read(_CHUNK) if first else b""
        if not rest:
            return self.write(first)
        return self._store(itertools.chain((first, rest), _chunks(stream)), None)

    def write_file(self, path: str | os.PathLike[str]) -> Digest:
        """Store the file at ``path`` (a final symlink is refused); as :meth:`write`."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            raise from_os_error(err, f"storing file {os.fsdecode(path)}") from err
        with os.fdopen(fd, "rb") as stream:
            return self.write_stream(stream)

    def insert(self, digest: Digest, data: bytes) -> None:
        """Store bytes that claim to be ``digest`` (e.g. from a remote CAS).

        Raises DataLoss naming ``digest`` if they are not, and then stores nothing.
        """
        actual = Digest.of_bytes(data)
        if actual != digest:
            raise DataLoss(_mismatch(digest, actual))
        # No presence check first: what comes from a remote was missing here, and a blob
        # stored meanwhile makes the link fail harmlessly. Verified above: not hashed again.
        self._store([data], digest, trusted=True)

    def insert_stream(self, digest: Digest, stream: BinaryIO, *, stream_verifies: bool = False) -> None:
        """As :meth:`insert`, copying ``stream`` while hashing it. It stops reading once
        more than ``digest.size_bytes`` have arrived.

        ``stream_verifies``: the stream itself raises DataLoss from ``read`` unless it
        yields exactly the blob (RemoteCAS's BlobReader does), so hashing it a second time
        here is skipped; the size is still checked. Worth a third of a big fetch's time.
        """
        self._store(_chunks(stream), digest, trusted=stream_verifies)

    # ---- public: pins, eviction, lifecycle ---------------------------------------------

    def pin_set(self) -> LocalPinSet:
        """A new, empty pin set for one action's lifetime; the caller releases it."""
        return LocalPinSet(self)

    @contextlib.contextmanager
    def pinned(self, digests: Iterable[Digest]) -> Iterator[None]:
        with self.pin_set() as pins:
            pins.add(digests)
            yield

    def evict(self, down_to: int | None = None) -> int:
        """If the shared size is over ``max_bytes``, evict least-recently-used unpinned blobs
        down to ``low_watermark * max_bytes``; returns the bytes this call evicted.

        Called automatically as writes flush their sizes. Returns at once if another thread
        or process is evicting (that one re-checks the size when it is done). Raises
        ResourceExhausted if pinned blobs alone exceed ``max_bytes``.

        ``down_to``: evict now, whatever ``max_bytes`` says, until at most that many bytes
        are left (one pass; pinned blobs stay, so it may free less). For a disk that runs
        out of space before the cache reaches its size limit (the health monitor's low
        free-space watermark).
        """
        freed_total = 0
        size = self._flush()
        if down_to is not None:
            if size <= down_to:
                return 0
            with self._translated(f"evicting from local CAS at {self.root}"):
                with self._file_lock("evict.lock", fcntl.LOCK_EX | fcntl.LOCK_NB) as ours:
                    return self._evict_pass(max(0, down_to))[0] if ours else 0
        with self._translated(f"evicting from local CAS at {self.root}"):
            while size > self.max_bytes:
                with self._file_lock("evict.lock", fcntl.LOCK_EX | fcntl.LOCK_NB) as ours:
                    if not ours:
                        break
                    freed, left = self._evict_pass()
                freed_total += freed
                if left > self.max_bytes:
                    raise ResourceExhausted(
                        f"local CAS at {self.root} is full of pinned blobs: {left} bytes "
                        f"pinned, max {self.max_bytes}"
                    )
                size = self._update_size()[0]  # others may have added during the pass
        return freed_total

    def stats(self) -> CacheStats:
        with self._translated("reading local CAS size"):
            size = self._update_size()[0]
        with self._lock:
            return CacheStats(
                self._hits, self._misses, self._evictions, self._bytes_evicted,
                size + self._pending, self.max_bytes,
            )

    def close(self) -> None:
        """Fold this process's pending size into the counter (evicting if due), delete this
        instance's temp and pin files and give up ownership. Live PinSets stop protecting
        their blobs. Call it once no other call is in progress; idempotent."""
        if self._closed:
            return
        try:
            with contextlib.suppress(ResourceExhausted):
                self.evict()
        finally:
            with self._lock:
                self._closed = True
                spares, self._spare_pin_files = self._spare_pin_files, []
            with self._translated(f"closing local CAS at {self.root}"):
                for _, fd in spares:
                    os.close(fd)
                for directory in (self._tmp, self._pins):
                    for name in os.listdir(directory):
                        if name.startswith(self._token + "."):
                            _unlink_quietly(os.path.join(directory, name))
                _unlink_quietly(os.path.join(self._owners, self._token))
                os.close(self._owner_fd)
                os.close(self._size_fd)
                if self._proc_fds >= 0:
                    os.close(self._proc_fds)

    def __enter__(self) -> LocalCAS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- storing -------------------------------------------------------------------------

    def _store_unless_present(self, digest: Digest, data: bytes) -> Digest:
        with self._translated(f"storing blob {digest}"):
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.object_path(digest)).st_size == digest.size_bytes:
                    self._touch([digest.hash])
                    return digest
        return self._store([data], digest, trusted=True)  # the caller hashed it

    def _store(
        self, chunks: Iterable[bytes], claimed: Digest | None, executable: bool = False, trusted: bool = False
    ) -> Digest:
        """Copy ``chunks`` into a temp file while hashing them, then link it in.

        If ``claimed`` is given the bytes must match it, else DataLoss and nothing stored.
        ``trusted`` (with ``claimed``): the chunks' source has verified them; only their
        size is checked. The temp file is removed in every case.
        """
        assert claimed is not None or not trusted
        anonymous = self._proc_fds >= 0
        tmp = self._tmp if anonymous else f"{self._tmp}/{self._token}.{next(self._seq)}"
        flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_TMPFILE if anonymous else os.O_CREAT | os.O_EXCL)
        mode = BLOB_MODES[executable]
        added = 0
        expected = claimed.size_bytes if claimed is not None else _CHUNK
        fd = -1
        try:
            fd = self._with_room(lambda: os.open(tmp, flags, mode), expected)
            hasher, size = hashlib.sha256(), 0
            for chunk in chunks:
                if not trusted:
                    hasher.update(chunk)
                size += len(chunk)
                if claimed is not None and size > claimed.size_bytes:
                    break  # a lying sender must not fill the disk
                _write_all(fd, chunk, lambda left: self._make_room(max(left, expected - size)))
            os.fchmod(fd, mode)  # the mode given to open() is subject to the umask
            if not anonymous:
                os.close(fd)
                fd = -1
            digest = claimed if trusted and claimed is not None and size == claimed.size_bytes else Digest(hasher.hexdigest(), size)
            if claimed is not None and digest != claimed:
                raise DataLoss(_mismatch(claimed, digest))
            final = self.object_path(digest, executable)
            if anonymous:
                # linkat(AT_SYMLINK_FOLLOW) of the descriptor's /proc entry: needs no privilege.
                link = functools.partial(os.link, str(fd), final, src_dir_fd=self._proc_fds)
            else:
                link = functools.partial(os.link, tmp, final)
            try:
                self._with_room(link, _CHUNK)
                added = size
            except FileExistsError:
                pass  # a concurrent writer stored the same bytes first
        except OSError as err:
            # Translated here rather than by _translated: this is the hot path of a cold
            # fetch, and the message is only worth building when something failed.
            raise self._error(err, f"storing blob {claimed or ''}".rstrip()) from err
        finally:
            if fd >= 0:
                os.close(fd)  # an anonymous temp file not linked in is gone with it
            if not anonymous:
                _unlink_quietly(tmp)
        self._account(digest, added, known_present=not executable)
        return digest

    def _account(self, digest: Digest, added: int, known_present: bool = False) -> None:
        """After a store: ``added`` new bytes (0: the blob was there already, now in use).
        ``known_present``: the plain file was just linked in, so the next presence check
        need not ``stat`` it — as for one it found present itself, this holds until a pass
        deletes (see Generation). A cold fetch checks presence twice (the stager's fetch,
        then the export's, which pins what it links): measured at 10k blobs, the second
        pass cost 10,000 ``stat`` calls, ~45 ms of a ~900 ms cold action."""
        if not added:
            self._touch([digest.hash])  # the existing file is the one now in use
        with self._lock:
            if known_present and len(self._known) < _KNOWN_LIMIT:
                self._known.add(digest)
            self._touched.add(digest.hash)
            self._pending += added
            due = self._pending >= self.flush_bytes
        if due:
            self.evict()
            self.keep_free()

    # ---- room on the file system (see Room in the module doc) ---------------------------

    def keep_free(self) -> int:
        """With less than ``keep_free_bytes`` free on the cache's file system, evict the
        difference (unpinned blobs only; returns at once if a pass is running). Returns the
        bytes evicted."""
        if self.keep_free_bytes <= 0:
            return 0
        with self._translated(f"reading free space of {self.root}"):
            missing = self.keep_free_bytes - self._free_bytes()
        if missing <= 0:
            return 0
        return self.evict(down_to=max(0, self._flush() - missing))

    def _free_bytes(self) -> int:
        st = self._statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def _with_room(self, step: Callable[[], _T], need: int) -> _T:
        """``step()``, evicting and retrying while it fails for want of space and each
        eviction frees something."""
        while True:
            try:
                return step()
            except OSError as err:
                if err.errno not in _NO_SPACE or not self._make_room(need):
                    raise

    def _make_room(self, need: int) -> bool:
        """A write of ``need`` more bytes met ENOSPC/EDQUOT: evict unpinned blobs for it
        plus ``keep_free_bytes``, waiting for a pass another process may be running.
        Returns whether a retry can succeed (something was freed, here or meanwhile)."""
        try:
            free_before = self._free_bytes()
            size = self._flush()
            want = max(need, 1) + self.keep_free_bytes - free_before
            with self._file_lock("evict.lock", fcntl.LOCK_EX):
                freed = self._evict_pass(max(0, size - max(want, _CHUNK)))[0]
                return freed > 0 or self._free_bytes() > free_before
        except OSError:
            return False  # the original ENOSPC is the error worth reporting

    # ---- presence and recency ------------------------------------------------------------

    def _missing(self, digests: Iterable[Digest]) -> set[Digest]:
        """The absent ones among ``digests``; a digest seen present under the current
        generation is not stat-ed again (no pass has deleted anything since)."""
        gen = self._update_size()[1]
        with self._lock:
            if gen != self._known_gen or len(self._known) > _KNOWN_LIMIT:
                self._known.clear()
                self._known_gen = gen
            unknown = [d for d in digests if d not in self._known]
        missing: set[Digest] = set()
        found = []
        for digest in unknown:
            try:
                present = os.stat(self.object_path(digest)).st_size == digest.size_bytes
            except FileNotFoundError:
                present = False
            if present:
                found.append(digest)
            else:
                missing.add(digest)
        with self._lock:
            if self._known_gen == gen:  # else a newer generation's memory was started
                self._known.update(found)
        return missing

    def _touch(self, hashes: Iterable[str]) -> None:
        """Record use of blobs (LRU): set their plain file's mtime to now, at most once per
        blob per ``recency_interval`` in this process."""
        now = time.monotonic()
        with self._lock:
            if now - self._touched_since >= self._recency_interval:
                self._touched.clear()
                self._touched_since = now
            fresh = [h for h in hashes if h not in self._touched]
            self._touched.update(fresh)
        for h in fresh:
            try:
                os.utime(f"{self._objects}/{h[:2]}/{h}")
            except OSError:
                pass  # evicted meanwhile, or not ours to touch: recency is only advice

    def _count(self, hits: int = 0, misses: int = 0) -> None:
        with self._lock:
            self._hits += hits
            self._misses += misses

    # ---- size counter and eviction -------------------------------------------------------

    def _update_size(self, change: Callable[[int, int], tuple[int, int]] | None = None) -> tuple[int, int]:
        """Read, and with ``change`` replace, the shared ``(bytes, generation)`` under the
        counter's flock. An unreadable counter reads as ``(-1, 0)``."""
        with self._size_lock:
            fcntl.flock(self._size_fd, fcntl.LOCK_SH if change is None else fcntl.LOCK_EX)
            try:
                try:
                    size, gen = map(int, os.pread(self._size_fd, 64, 0).split())
                except ValueError:
                    size, gen = -1, 0
                if change is not None:
                    size, gen = change(size, gen)
                    os.pwrite(self._size_fd, b"%020d %020d\n" % (size, gen), 0)
                return size, gen
            finally:
                fcntl.flock(self._size_fd, fcntl.LOCK_UN)

    def _flush(self) -> int:
        """Fold this process's pending bytes into the shared counter; return its new value."""
        with self._lock:
            delta, self._pending = self._pending, 0
        with self._translated("updating local CAS size"):
            if not delta:
                return self._update_size()[0]
            return self._update_size(lambda size, gen: (size + delta, gen))[0]

    def _evict_pass(self, target: int | None = None) -> tuple[int, int]:
        """One pass, under evict.lock, down to ``target`` bytes (default: the low watermark):
        returns (bytes freed, bytes left on disk)."""
        target = self._target if target is None else target
        before = self._update_size()[0]
        # Scan outside pins.lock so that pinners wait only for the deletions. A blob used
        # after the scan may still go by its older mtime: only if unpinned, so it is safe.
        units = self._scan()
        total = sum(unit.size for unit in units.values())
        freed = evicted = 0
        bumped = False
        with self._file_lock("pins.lock", fcntl.LOCK_EX):
            pinned = self._live_pins()
            for h, unit in sorted(units.items(), key=lambda item: item[1].mtime):
                if total - freed <= target:
                    break
                if h in pinned:
                    continue
                if not bumped:  # before the first deletion: see _missing
                    self._update_size(lambda size, gen: (size, gen + 1))
                    bumped = True
                for path in sorted(unit.paths, key=lambda p: not p.endswith(_EXEC_SUFFIX)):
                    _unlink_quietly(path)  # the variant first: no orphan if we stop here
                freed += unit.size
                evicted += 1
        left = total - freed
        # Re-sync: what is on disk, plus what others folded in since this pass began.
        self._update_size(lambda size, gen: (left + max(0, size - before), gen))
        with self._lock:
            self._evictions += evicted
            self._bytes_evicted += freed
        return freed, left

    def _scan(self) -> dict[str, _Unit]:
        """Every blob on disk, keyed by hash: the newest mtime of its variants, their sizes."""
        units: dict[str, _Unit] = {}
        for shard in range(256):
            with os.scandir(f"{self._objects}/{shard:02x}") as entries:
                for entry in entries:
                    h = entry.name[:HASH_HEX_LENGTH]
                    if entry.name not in (h, h + _EXEC_SUFFIX) or len(h) != HASH_HEX_LENGTH:
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    unit = units.setdefault(h, _Unit())
                    unit.mtime = max(unit.mtime, st.st_mtime)
                    unit.size += st.st_size
                    unit.paths.append(entry.path)
        return units

    def _upgrade_modes(self) -> None:
        """Give blobs of the first layout (0444/0555) today's modes, once per root."""
        done = os.path.join(self.root, _MODES_DONE)
        if os.path.exists(done):
            return
        for shard in range(256):
            with os.scandir(f"{self._objects}/{shard:02x}") as entries:
                for entry in entries:
                    with contextlib.suppress(FileNotFoundError):
                        os.chmod(entry.path, BLOB_MODES[entry.name.endswith(_EXEC_SUFFIX)], follow_symlinks=False)
        with open(done, "w", encoding="ascii"):
            pass

    def _scan_size(self) -> int:
        return sum(unit.size for unit in self._scan().values())

    # ---- owners and pins -----------------------------------------------------------------

    def _become_owner(self) -> tuple[str, int]:
        """Create and lock ``owners/<token>``, held until close or death."""
        return become_owner(self._owners, f"{os.getpid()} {socket.gethostname()}")

    def _sweep_dead_owners(self) -> set[str]:
        """Delete the temp, pin and owner files of dead owners; return the live tokens.

        Files are listed before their owners are checked: an owner is created and locked
        before it creates any file, so a listed file whose owner is unlocked or gone is an
        orphan for good.
        """
        files: dict[str, list[str]] = {}
        for directory in (self._tmp, self._pins):
            for name in os.listdir(directory):
                files.setdefault(name.partition(".")[0], []).append(os.path.join(directory, name))
        for token in os.listdir(self._owners):
            files.setdefault(token, [])
        live = {self._token}
        for token, paths in files.items():
            if token != self._token and not self._reap_if_dead(token, paths):
                live.add(token)
        return live

    def _reap_if_dead(self, token: str, paths: list[str]) -> bool:
        owner = os.path.join(self._owners, token)
        fd = lock_if_dead(owner)
        if fd is None:
            return False
        try:
            for path in paths:
                _unlink_quietly(path)
            if fd >= 0:
                _unlink_quietly(owner)  # last, and while we hold its lock
            return True
        finally:
            if fd >= 0:
                os.close(fd)

    def _live_pins(self) -> set[str]:
        """Hashes in the pin files of live owners. Caller holds pins.lock exclusively."""
        live = self._sweep_dead_owners()
        pinned: set[str] = set()
        for name in os.listdir(self._pins):
            if name.partition(".")[0] in live:
                with contextlib.suppress(FileNotFoundError):  # released meanwhile
                    with open(os.path.join(self._pins, name), "rb") as pin_file:
                        pinned.update(pin_file.read().decode("ascii", "replace").split())
        return pinned

    def _take_pin_file(self) -> tuple[str, int]:
        """An empty pin file of ours, a released one if there is one: pinning for each
        action (or each FetchThroughStore.read) then allocates no inode, which is slow
        on an ext4 after churn (docs/measured.md). Caller holds pins.lock."""
        with self._lock:
            if self._spare_pin_files:
                return self._spare_pin_files.pop()
        path = f"{self._pins}/{self._token}.{next(self._seq)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        return path, os.open(path, flags, 0o644)

    def _give_back_pin_file(self, path: str, fd: int) -> None:
        os.ftruncate(fd, 0)  # unpins everything in it
        with self._lock:
            if not self._closed and len(self._spare_pin_files) < 16:
                self._spare_pin_files.append((path, fd))
                return
        os.close(fd)
        _unlink_quietly(path)

    @contextlib.contextmanager
    def _file_lock(self, name: str, operation: int) -> Iterator[bool]:
        """flock ``root/<name>`` through a descriptor of our own (so threads of this process
        exclude each other too); yields False if LOCK_NB was asked and it is taken."""
        fd = os.open(os.path.join(self.root, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, operation)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing drops the lock

    # ---- errors --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        """Translate OSError into the project's errors, once, at this module's boundary."""
        try:
            yield
        except OSError as err:
            raise self._error(err, what) from err

    def _error(self, err: OSError, what: str) -> ReapiError:
        return from_os_error(err, f"{what} (local CAS at {self.root})", own_file=True)


class LocalPinSet(PinSet):
    """Blobs protected from eviction, by every process sharing the cache, until released.

    Get one from :meth:`LocalCAS.pin_set`; it may grow over an action's lifetime. Safe to
    use from several threads. The holder calls :meth:`release` (or uses ``with``); if the
    process dies, the kernel drops its owner lock and the next eviction pass deletes the
    pin file. Releasing records every pinned blob as used for LRU: up to one ``utime`` per
    blob, so a caller in a hurry may release off its critical path. The released pin file
    is emptied and kept for the next pin set of this LocalCAS.
    """

    def __init__(self, cas: LocalCAS) -> None:
        self._cas = cas
        self._lock = threading.Lock()
        self._hashes: set[str] = set()
        self._path = ""
        self._fd = -1
        self._released = False

    def add(self, digests: Iterable[Digest]) -> None:
        """Pin ``digests``, present or not. A blob found present *after* this returns stays
        present until release. Raises ResourceExhausted if the pin cannot be written."""
        with self._lock:
            if self._released:
                raise Internal("pin set used after release")
            new = {digest.hash for digest in digests} - self._hashes
            if not new:
                return
            # Leading "\n": a line torn by an earlier failed write cannot swallow this one.
            text = ("\n" + "\n".join(new) + "\n").encode("ascii")
            with self._cas._translated("pinning blobs"):
                with self._cas._file_lock("pins.lock", fcntl.LOCK_SH):
                    if self._fd < 0:
                        self._path, self._fd = self._cas._take_pin_file()
                    _write_all(self._fd, text)
            self._hashes |= new

    def release(self) -> None:
        """Record the blobs as used and unpin them. Idempotent."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._cas._touch(self._hashes)  # while still pinned: no pass can take them first
        if self._fd >= 0:
            with self._cas._translated("releasing pins"):
                self._cas._give_back_pin_file(self._path, self._fd)


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(_CHUNK):
        yield chunk


def _write_all(fd: int, data: bytes, make_room: Callable[[int], bool] | None = None) -> None:
    """Write all of ``data``; on ENOSPC/EDQUOT ask ``make_room(bytes left)`` and retry
    while it says that helps."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except OSError as err:
            if make_room is None or err.errno not in _NO_SPACE or not make_room(len(view)):
                raise


def _anonymous_temp_files(tmp_dir: str) -> int:
    """A descriptor of ``/proc/self/fd`` if ``tmp_dir``'s file system makes ``O_TMPFILE``
    files and the kernel links them in by their ``/proc`` entry; else -1 (named temp files).
    """
    try:
        proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return -1  # no /proc
    probe_name = os.path.join(tmp_dir, f".probe-{secrets.token_hex(8)}")
    try:
        fd = os.open(tmp_dir, os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o400)
        try:
            os.link(str(fd), probe_name, src_dir_fd=proc)
        finally:
            os.close(fd)
        os.unlink(probe_name)
        return proc
    except OSError:  # EOPNOTSUPP, EISDIR (a kernel without O_TMPFILE), EXDEV, ...
        os.close(proc)
        return -1


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _mismatch(claimed: Digest, actual: Digest) -> str:
    return (
        f"blob {claimed}: received bytes do not match the digest (sha256 {actual.hash}, "
        f"{actual.size_bytes} bytes read); not stored"
    )
