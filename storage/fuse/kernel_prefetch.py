"""``Prefetcher``: work done while the /dev/fuse backend's loop is idle, so that requests
find it done — in the page-cache mode (:mod:`.kernel_requests`):

* **Directories** listed (READDIRPLUS), and their subdirectories, are read and parsed
  from the local cache before the action lists them in turn: that is ~60 µs of Python
  per Directory proto, which otherwise sits inside the listing request, while the loop
  waits idle between requests. Two levels, because a walk goes depth first: the first
  subdirectory of a listing is asked for at once, before a prefetch of it could be done,
  but it was a grandchild of the listing before. A request for a directory the
  prefetcher is parsing waits for that parse (:meth:`Prefetcher.wait_for`) rather than
  doing it again beside it (they would share one CPU: the interpreter's lock).
* **Small files** listed are pushed into the kernel's page cache (FUSE_NOTIFY_STORE)
  before anything reads them. In the page-cache mode the kernel sends no OPEN or RELEASE
  and a file's pages outlive its opens (its default for a connection without OPEN is
  KEEP_CACHE), so the one request left per small file is its first READ; a file pushed
  after its directory was listed (``find``, ``ls``, a build tool's walk) costs its reader
  no request at all. Not after a LOOKUP: the reader's READ follows its lookup at once and
  came first every time, so the push was wasted work (10k opens by path: 0.60 s without,
  0.77 s with; docs/measured.md).

The rules, and why:

* **Only blobs and Directories already in the local cache**: a prefetch never fetches
  from the remote (that would pin a missing blob's failure on an action that never read
  it, and spend the network on guesses).
* **Bounded**: a file is pushed only up to :data:`FILE_BYTES` (small files, whose READ
  costs more in round trip than in bytes); a root gets at most
  :data:`ROOT_BYTES` (the pages of the files pushed — a 100-byte file takes a 4 KiB
  page — and the bytes of the Directories parsed) over its life; the queue holds at most
  :data:`QUEUE_ITEMS` (offers past it are dropped). One listing reply names at most a
  page's worth of entries (~25), so one READDIRPLUS offers ~25 × FILE_BYTES at most. An
  action listing huge trees gets ROOT_BYTES prefetched, then plain requests; the daemon's
  work stays bounded. Pushed pages are the kernel's page cache (charged to the worker's
  memory cgroup, not the action's): reclaimable, and dropped with the inode.
* **Requests first**: an item is taken only while the loop has found /dev/fuse empty
  (``session.idle``), and each one first checks (``poll``, no wait) that no request is
  pending; an action never waits behind prefetching.
* **A thread of its own**: a store waits on the page's lock, which a READ of the same
  page holds until its reply arrives; pushed from the loop's thread, that reply would
  never come.
* **Only what is still needed**: what is queued for a root that is removed, or for a
  file a READ brought into the page cache meanwhile (the reader overtook us), is dropped.
* **ENOENT is retried**: the kernel makes a listed entry's inode only when the listing
  thread processes the reply, which may be after the first try: the file is tried again
  after the others (a millisecond later if only retries are left), at most :data:`TRIES`
  times, then left to its READ.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections import deque
from typing import Protocol

from ..directory.cas import CasDirectory
from .blobs import is_local
from .inodes import ActionRoot, FileInode

log = logging.getLogger(__name__)

FILE_BYTES = 64 * 1024
ROOT_BYTES = 256 * 1024 * 1024
QUEUE_ITEMS = 16384
TRIES = 4
_PAGE = 4096


class _Session(Protocol):
    fd: int
    idle: threading.Event

    def store(self, nodeid: int, data: bytes) -> int: ...


class Prefetcher:
    """Prefetches what is offered (module docstring): :meth:`start`, offers from the loop,
    :meth:`stop` when the session ends. Its queues and the roots' budgets are guarded by
    its own lock."""

    def __init__(self, session: _Session, root_bytes: int = ROOT_BYTES, queue_items: int = QUEUE_ITEMS) -> None:
        self._session = session
        self._root_bytes = root_bytes
        self._queue_items = queue_items
        self._directories: deque[tuple[CasDirectory, ActionRoot, bool]] = deque()  # (node, root, load its children)
        self._files: deque[tuple[FileInode, ActionRoot, int]] = deque()  # (file, offered for, tries so far)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self.stopped = threading.Event()  # set when its thread has ended
        self._parsing: CasDirectory | None = None  # the directory being loaded, if any
        self._parsed = threading.Condition(self._lock)
        self.pushed = 0  # files stored so far (tests, benchmarks)
        self.loaded = 0  # directories parsed so far
        self.retried = 0  # ENOENT answers so far

    def start(self) -> None:
        threading.Thread(target=self._run, name="fuse-prefetch", daemon=True).start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._session.idle.set()

    def _take(self, root: ActionRoot, size: int) -> bool:
        """Whether ``root``'s budget and the queue have room for ``size`` more bytes
        (counted if so). Called with ``_lock`` held."""
        if len(self._files) + len(self._directories) >= self._queue_items or root.pushed_bytes + size > self._root_bytes:
            return False
        root.pushed_bytes += size
        return True

    def offer_files(self, root: ActionRoot, files: list[FileInode]) -> None:
        """Push ``files`` (just listed in ``root``) if they are small, not pushed or read
        before, and within the bounds."""
        taken = False
        with self._lock:
            for file in files:
                size = file.digest.size_bytes
                if file.offered or size == 0 or size > FILE_BYTES or not self._take(root, -(-size // _PAGE) * _PAGE):
                    continue
                file.offered = True
                self._files.append((file, root, 0))
                taken = True
        if taken:
            self._wake.set()

    def offer_directories(self, root: ActionRoot, directories: list[CasDirectory], children: bool = True) -> None:
        """Load ``directories`` (just listed in ``root``) if they are not loaded yet, and
        then their subdirectories if ``children``."""
        taken = False
        with self._lock:
            for node in directories:
                digest = node.digest()
                if node.loaded_entries() is not None or not self._take(root, digest.size_bytes):
                    continue
                self._directories.append((node, root, children))
                taken = True
        if taken:
            self._wake.set()

    def wait_for(self, node: CasDirectory, timeout: float = 5.0) -> None:
        """Return when ``node`` is not being loaded by the prefetcher (at once if not)."""
        with self._lock:
            self._parsed.wait_for(lambda: self._parsing is not node, timeout)

    def _run(self) -> None:
        try:
            self._prefetch()
        except Exception:  # noqa: BLE001 - prefetching is an optimisation: never the daemon's end
            log.exception("the FUSE prefetcher failed; serving without it")
        finally:
            self.stopped.set()

    def _prefetch(self) -> None:
        poller = select.poll()
        poller.register(self._session.fd, select.POLLIN)
        idle = self._session.idle
        while not self._stopping:
            directory, file, only_retries = self._next()
            if directory is None and file is None:
                self._wake.wait()
                continue
            while poller.poll(0) and not self._stopping:  # a request waits: the loop first
                idle.clear()
                idle.wait(0.01)
            if directory is not None:
                try:
                    self._load(*directory)
                finally:
                    with self._lock:
                        self._parsing = None
                        self._parsed.notify_all()
                continue
            assert file is not None
            if only_retries:
                time.sleep(0.001)  # give the kernel time to make the inodes
            outcome = self._push(file[0])
            if outcome == errno.ENOENT and file[2] + 1 < TRIES:
                self.retried += 1
                with self._lock:
                    self._files.append((file[0], file[1], file[2] + 1))
            elif outcome in (errno.ENODEV, errno.EBADF):
                return  # the connection is gone

    def _next(self) -> tuple[tuple[CasDirectory, ActionRoot, bool] | None, tuple[FileInode, ActionRoot, int] | None,
                             bool]:
        """The next directory or file to prefetch for a live root (directories first), and
        whether only files to retry are left; clears ``_wake`` when there is nothing."""
        with self._lock:
            while self._directories:
                directory = self._directories.popleft()
                if not directory[1].removed:
                    self._parsing = directory[0]
                    return directory, None, False
            while self._files:
                file = self._files.popleft()
                if not file[1].removed and not file[0].read:  # read: the reader overtook us
                    return None, file, file[2] > 0 and (not self._files or self._files[0][2] > 0)
            self._wake.clear()
            return None, None, False

    def _load(self, node: CasDirectory, root: ActionRoot, children: bool) -> None:
        if node.loaded_entries() is not None or not is_local(root.store, node.digest()):
            return
        try:
            entries = node.entries()  # a racing load by the loop parses the same bytes: either serves
        except Exception as error:  # noqa: BLE001 - the request that needs it reports it
            log.debug("prefetching directory %s: %s", node.digest(), error)
            return
        self.loaded += 1
        if children:
            subdirectories = [entry for entry in entries.values() if isinstance(entry, CasDirectory)]
            if subdirectories:
                self.offer_directories(root, subdirectories, children=False)

    def _push(self, file: FileInode) -> int:
        size = file.digest.size_bytes
        try:
            fd = os.open(file.store.object_path(file.digest), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return 0  # not local (or evicted meanwhile): its READ will fetch it
        try:
            data = os.pread(fd, size + 1, 0)  # a file being written or truncated: not pushed
        except OSError:
            return 0
        finally:
            os.close(fd)
        if len(data) != size:
            return 0
        outcome = self._session.store(file.ino, data)
        if outcome == 0:
            self.pushed += 1
        elif outcome != errno.ENOENT:
            log.debug("pushing input inode %d: %s", file.ino, os.strerror(outcome))
        return outcome
