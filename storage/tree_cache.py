"""``TreeCache``: materialised input trees, keyed by root Directory digest, reused by every
later action whose input root is (or is close to) one seen before.

Layout under ``root`` (on the local CAS's file system: files are hardlinks of its blobs)::

    lock                        flock(LOCK_EX)-held by the one TreeCache using this directory
    <hash>-<size>/tree/         a complete tree, all root's: directories 0755, files
                                0644/0755 (shown as the action's by idmapped_mounts)
    <hash>-<size>/complete-2    its marker: "<digest> <bytes> <tree ino> <tree ctime_ns>"
    building-<random>/          a tree being built (never looked up; removed at start)
    trash/                      evicted trees, deleted in the background

Rules, and why:

* **Immutable.** A tree is written once, by the worker, and never written again: actions
  see it only as an overlayfs lower layer (:mod:`.cached_staging`), which the kernel never
  writes — every change an action makes lands in its own upper layer. Nothing here is
  writable by anyone but root, and ``root`` is
  0700: the sandbox's uid cannot even reach it.
* **Crash-safe.** A tree is built under ``building-*``, its marker written last, then the
  directory renamed to its digest's name (atomic). A tree killed halfway has no digest
  name and no marker, and is removed by the next start; a digest-named directory without
  a valid marker (an older layout, a hand-made copy) is never used and removed too.
* **Verified before reuse, cheaply.** Every lookup stats the tree directory and compares
  its inode and ctime with those the marker recorded when the tree was complete: a tree
  replaced, or with an entry added, removed or renamed at its top, is dropped and built
  again (1 stat, ~2 µs; hashing 10,000 files would cost ~100 ms and buy nothing against
  a writer who, being root, could also rewrite the marker). Deeper tampering needs root on
  the host and is out of scope, as it is for the local CAS itself.
* **Bounded.** ``max_bytes`` bounds the bytes of the files the trees hold (each file
  counted per occurrence: they are hardlinks, so this is what they keep alive on disk
  after the CAS evicts a blob). Past it, the least recently used trees that nobody holds
  are evicted; a held (pinned) tree is never evicted, so the bound may be exceeded while
  actions hold more than it.

Thread-safe. Several processes must use different directories (the lock says so);
:func:`open_tree_cache` picks the first free one.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

from reapi_worker.protos.errors import AlreadyExists, Internal, InvalidArgument, ReapiError

from .digests import Digest
from .staging import TreeRemover

log = logging.getLogger(__name__)

# "-2": trees of the first layout (directories owned by a uid nothing ran as) have no
# marker of this name, so they are removed, never shown with the wrong owner.
_MARKER = "complete-2"
_TREE = "tree"
_BUILDING = "building-"


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: Digest
    bytes: int
    ino: int
    ctime_ns: int


class CachedTree:
    """A complete cached tree, held (pinned) until :meth:`release`. ``path`` is its root
    directory: read it, mount it, never write it."""

    def __init__(self, cache: "TreeCache", digest: Digest, path: str) -> None:
        self.digest = digest
        self.path = path
        self._cache = cache
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._cache._release(self.digest)


class TreeCache:
    """Materialised trees in ``root`` (module docstring), at most ``max_bytes`` of files.

    Raises AlreadyExists if another live TreeCache holds ``root``; the caller closes it.
    """

    def __init__(self, root: str, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise InvalidArgument(f"tree cache max_bytes must be positive, not {max_bytes}")
        self.root = os.path.abspath(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[Digest, _Entry] = collections.OrderedDict()  # LRU first
        self._holds: collections.Counter[Digest] = collections.Counter()
        self._bytes = 0
        self.evictions = 0
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            os.chmod(self.root, 0o700)
            self._lock_fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise Internal(f"opening tree cache {self.root}: {error}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise AlreadyExists(f"tree cache {self.root} is in use by another worker") from None
        self._remover = TreeRemover(os.path.join(self.root, "trash"))
        self._load()

    # ---- public -----------------------------------------------------------------------

    def get(self, digest: Digest, *, touch: bool = True) -> CachedTree | None:
        """The complete, verified tree of ``digest``, held for the caller, or None. ``touch``:
        count it as used (most recently used first for eviction and :meth:`recent`)."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            path = self._tree_path(digest)
            if not _intact(path, entry):
                log.warning("cached tree %s changed since it was built: dropping it", digest)
                self._drop(digest)
                return None
            if touch:
                self._entries.move_to_end(digest)
            self._holds[digest] += 1
            return CachedTree(self, digest, path)

    def touch(self, digest: Digest) -> None:
        """Count the tree of ``digest`` as used now (if it is cached)."""
        with self._lock:
            if digest in self._entries:
                self._entries.move_to_end(digest)

    def recent(self, limit: int | None = None) -> list[Digest]:
        """Cached root digests (up to ``limit``), most recently used first."""
        with self._lock:
            return list(reversed(self._entries))[:limit]

    def add(self, digest: Digest, build: Callable[[str], int]) -> CachedTree:
        """Build the tree of ``digest`` (unless another thread did) and return it held.

        ``build(path)`` writes the tree into the new directory ``path`` (mode 0755, empty)
        and returns the bytes of its files; what it raises is raised, and nothing is kept.
        """
        held = self.get(digest)
        if held is not None:
            return held
        building = os.path.join(self.root, _BUILDING + secrets.token_hex(8))
        tree = os.path.join(building, _TREE)
        try:
            os.mkdir(building, 0o700)
            os.mkdir(tree, 0o755)
            size = build(tree)
            st = os.stat(tree)
            entry = _Entry(digest, size, st.st_ino, st.st_ctime_ns)
            with open(os.path.join(building, _MARKER), "w", encoding="ascii") as marker:
                marker.write(f"{digest} {size} {st.st_ino} {st.st_ctime_ns}\n")
            # Renamed and registered under one lock: a thread that lost the race to build
            # the same tree finds the winner's entry as soon as its rename fails.
            with self._lock:
                try:
                    os.rename(building, self._entry_path(digest))
                    won = True
                except OSError as error:
                    if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    won = False
                if won:
                    self._entries[digest] = entry
                    self._bytes += size
                    self._holds[digest] += 1
                    self._evict_locked()
                    return CachedTree(self, digest, self._tree_path(digest))
            # Another thread finished the same tree first: use that one.
            self._remover.remove(building)
            held = self.get(digest)
            if held is None:
                raise Internal(f"cached tree {digest} vanished while being built")
            return held
        except BaseException as error:
            if os.path.lexists(building):
                self._remover.remove(building)
            if isinstance(error, OSError):
                raise Internal(f"building cached tree {digest}: {error}") from None
            raise

    def contains(self, digest: Digest) -> bool:
        with self._lock:
            return digest in self._entries

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def drain(self) -> None:
        """Wait until evicted trees are deleted (tests, shutdown)."""
        self._remover.drain()

    def close(self) -> None:
        self._remover.drain()
        os.close(self._lock_fd)

    def __enter__(self) -> "TreeCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internal ---------------------------------------------------------------------

    def _entry_path(self, digest: Digest) -> str:
        return os.path.join(self.root, f"{digest.hash}-{digest.size_bytes}")

    def _tree_path(self, digest: Digest) -> str:
        return os.path.join(self._entry_path(digest), _TREE)

    def _release(self, digest: Digest) -> None:
        with self._lock:
            self._holds[digest] -= 1
            if self._holds[digest] <= 0:
                del self._holds[digest]
            self._evict_locked()

    def _evict_locked(self) -> None:
        for digest in list(self._entries):
            if self._bytes <= self.max_bytes:
                return
            if self._holds.get(digest, 0) == 0:
                self._drop(digest)
                self.evictions += 1

    def _drop(self, digest: Digest) -> None:
        entry = self._entries.pop(digest)
        self._bytes -= entry.bytes
        self._remover.remove(self._entry_path(digest))

    def _load(self) -> None:
        """Index the complete trees a previous run left; remove everything else."""
        found: list[tuple[float, _Entry]] = []
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if name in ("lock", "trash"):
                continue
            entry = _read_marker(path)
            if entry is None or name != f"{entry.digest.hash}-{entry.digest.size_bytes}" or not _intact(
                os.path.join(path, _TREE), entry
            ):
                log.info("removing incomplete cached tree %s", path)
                self._remover.remove(path)
                continue
            found.append((os.stat(os.path.join(path, _MARKER)).st_mtime, entry))
        for _, entry in sorted(found, key=lambda pair: pair[0]):
            self._entries[entry.digest] = entry
            self._bytes += entry.bytes
        with self._lock:
            self._evict_locked()


def open_tree_cache(base: str, max_bytes: int) -> TreeCache:
    """The TreeCache at ``base``, or at ``base.1``, ``base.2``, ... when other live workers
    sharing the local CAS hold the ones before (a dead worker's is taken over, trees and
    all)."""
    for n in range(256):
        try:
            return TreeCache(base if n == 0 else f"{base}.{n}", max_bytes)
        except AlreadyExists:
            continue
    raise Internal(f"every tree cache directory {base}[.1-255] is in use")


def _read_marker(path: str) -> _Entry | None:
    try:
        with open(os.path.join(path, _MARKER), encoding="ascii") as marker:
            digest_text, size, ino, ctime_ns = marker.read().split()
        return _Entry(Digest.parse(digest_text), int(size), int(ino), int(ctime_ns))
    except (OSError, ValueError, ReapiError):
        return None


def _intact(tree: str, entry: _Entry) -> bool:
    try:
        st = os.lstat(tree)
    except OSError:
        return False
    return st.st_ino == entry.ino and st.st_ctime_ns == entry.ctime_ns
