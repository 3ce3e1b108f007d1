"""``FuseMount``: the worker's one FUSE mount, serving every staged input tree read-only.

One shared mount with a directory per action root, not one mount per action, because:

* pyfuse3 keeps a single session per process (``init`` sets module globals), so a mount
  per action would need a daemon process per action (a Python start is ~100 ms);
* the mount is paid for once (~10 ms for ``fusermount``/``mount`` and INIT) instead of per
  action, and registering a root is a dictionary insert: staging costs the same at 1,000
  and 50,000 files;
* file inodes are shared by digest across roots (see :mod:`.inodes`), so the kernel's page
  cache of a blob serves every action that reads it.

Each action still gets its own view: its root directory, and its own writable overlay on
top (see :mod:`.stager`). A root is visible to every process that can reach the mount
directory, which is why the mount's top directory is root-only (0700: overlayfs reads its
lower layer with its mounter's credentials) and the sandbox never sees it.

Lifecycle and who cleans up:

* :meth:`FuseMount.open` takes ``<mount_dir>.lock`` (``flock``: one live worker per mount
  directory; the kernel drops it when a worker dies, even by ``kill -9``), lazily unmounts
  whatever a dead worker left mounted there, mounts, and starts the FUSE thread, waiting
  at most ``start_timeout`` for it. What serves (``backend``, :data:`BACKENDS`): the
  /dev/fuse protocol spoken here (:mod:`.kernel_session`) in its page-cache mode (no
  OPEN or RELEASE at all, small listed files pushed into the page cache ahead of their
  reads: :mod:`.kernel_requests`) or with passthrough (OPEN and RELEASE per file reach
  Python, reads do not), or trio + pyfuse3 (OPEN, READ, RELEASE per file); ``auto`` is
  the page-cache mode where the kernel speaks FUSE 7.31+, else pyfuse3.
* :meth:`FuseMount.close` (the owner — the composition root — calls it) stops the thread
  and unmounts; idempotent.
* If the FUSE thread dies (a pyfuse3 or kernel error, the connection aborted), it unmounts
  on its way out and every registered root fails with Internal; the next
  :meth:`add_root` mounts afresh. A ``kill -9`` of the worker leaves the mount (and the
  overlays on it) behind, answering ENOTCONN; the next ``open`` on the same directory
  removes them.

Thread-safety: all methods may be called from any thread; requests are served by the one
FUSE thread.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import threading
from collections.abc import Callable

import pyfuse3
import trio

from reapi_worker.protos.errors import Internal, InvalidArgument, ReapiError

from ..content import LocalContent
from ..digests import Digest
from ..directory.cas import CasDirectory
from . import kernel_mounts
from .inodes import ROOT_INODE, ActionRoot, InodeTable
from .kernel_prefetch import Prefetcher
from .kernel_requests import KernelRequests
from .kernel_session import KernelSession
from .operations import InputFileSystem

log = logging.getLogger(__name__)

#: Mount options: the kernel checks permissions from our attributes (default_permissions),
#: the sandbox's uid is not the mounter's (allow_other), nothing is ever written (ro).
MOUNT_OPTIONS = frozenset({"default_permissions", "allow_other", "ro", "fsname=reapi-worker-inputs", "subtype=reapi"})

#: Which code serves the mount: ``kernel`` speaks /dev/fuse itself in its page-cache mode,
#: ``kernel-passthrough`` the same protocol with an OPEN per file and passthrough reads
#: (:mod:`.kernel_requests` says when each pays), ``pyfuse3`` goes through libfuse;
#: ``auto`` takes ``kernel`` if it starts, else ``pyfuse3``.
BACKENDS = ("auto", "pyfuse3", "kernel", "kernel-passthrough")

_process_lock = threading.Lock()
_process_mount: "FuseMount | None" = None  # pyfuse3 allows one session per process


class FuseMount:
    """The worker's input file system mounted at ``mount_dir`` (see the module docstring).

    ``uid``/``gid`` own the served files (default: this process's, the cache's owner).
    ``start_timeout``/``stop_timeout`` bound waiting for the FUSE thread.
    ``open_files_per_action``: how many inputs one action may hold open through the mount
    (EMFILE past it, see :mod:`.open_files`); ``None`` for no quota. ``backend``: one of
    :data:`BACKENDS`; :attr:`backend_in_use` says which one serves after :meth:`open`.
    ``stacked_overlays``: how many overlayfs are mounted on top of each root (1: the
    stager's; 2 with two stacked), since the kernel stacks at most two file systems and
    passthrough makes this mount count as one: with 2, ``kernel-passthrough`` serves
    without passthrough (a READ per read); the page-cache mode does not care.
    ``prefetch``: whether the page-cache mode prefetches (:mod:`.kernel_prefetch`; off
    only to measure what it brings).
    """

    def __init__(
        self,
        mount_dir: str,
        *,
        uid: int | None = None,
        gid: int | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        open_files_per_action: int | None = None,
        backend: str = "auto",
        stacked_overlays: int = 1,
        prefetch: bool = True,
    ) -> None:
        if backend not in BACKENDS:
            raise InvalidArgument(f"FUSE backend {backend!r} is none of {', '.join(BACKENDS)}")
        self.backend = backend
        self._prefetch = prefetch
        self._stacked_overlays = stacked_overlays
        self.backend_in_use: str | None = None
        self._requests: KernelRequests | None = None
        self.mount_dir = kernel_mounts.check_mountable_path(os.path.abspath(mount_dir), "FUSE mount directory")
        self._uid = os.geteuid() if uid is None else uid
        self._gid = os.getegid() if gid is None else gid
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._open_files_per_action = open_files_per_action
        self._lock = threading.Lock()  # open/close/restart, never held while serving
        self._lock_fd: int | None = None
        self._table = InodeTable(open_files_per_action)
        self._fs: InputFileSystem | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._session: _Session | None = None
        self._stopping = False
        self._generation = 0  # mounts started so far
        self.failure: ReapiError | None = None  # why the last FUSE thread died, if it did

    # -- lifecycle ------------------------------------------------------------------------

    def open(self) -> "FuseMount":
        """Mount (cleaning up a dead worker's mounts first) and start serving. Raises
        Internal if another live worker holds the directory, another FuseMount is open in
        this process, or the mount does not come up within ``start_timeout``."""
        global _process_mount
        with self._lock:
            if self._lock_fd is not None:
                return self
            with _process_lock:
                if _process_mount is not None:
                    raise Internal(f"a FUSE mount is already open in this process at {_process_mount.mount_dir}")
                _process_mount = self
            try:
                self._take_directory()
                self._start()
            except BaseException:
                self._release_directory()
                with _process_lock:
                    _process_mount = None
                raise
        return self

    def close(self) -> None:
        """Stop serving and unmount. Roots still registered fail (their overlays then read
        ENOTCONN); call it after every staged input is closed. Idempotent."""
        global _process_mount
        with self._lock:
            if self._lock_fd is None:
                return
            self._stop()
            self._release_directory()
            with _process_lock:
                if _process_mount is self:
                    _process_mount = None

    def __enter__(self) -> "FuseMount":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    # -- roots ----------------------------------------------------------------------------

    def add_root(
        self, tree: CasDirectory, store: LocalContent, dir_owner: tuple[int, int], fetch_timeout: float
    ) -> ActionRoot:
        """Serve ``tree`` (reading blobs from ``store``) at :meth:`path_of` the returned root
        until :meth:`remove_root`. Its directories are owned by ``dir_owner``. Restarts the
        mount if its thread died. Raises Internal if the mount is not open."""
        with self._lock:
            if self._lock_fd is None:
                raise Internal("the FUSE mount is not open")
            if not self.alive:
                log.warning("the FUSE thread is gone (%s); mounting again", self.failure)
                self._stop()
                self._start()
        root = ActionRoot(os.urandom(16).hex(), tree, store, dir_owner[0], dir_owner[1], fetch_timeout)
        with self._table.lock:
            self._table.add_root(root)
        return root

    def path_of(self, root: ActionRoot) -> str:
        return os.path.join(self.mount_dir, root.token)

    def remove_root(self, root: ActionRoot) -> None:
        """Stop serving ``root``; the kernel is told to drop its cached entries (in the
        background: that call may wait on requests in flight)."""
        with self._table.lock:
            removed = self._table.remove_root(root.token)
        session = self._session
        if removed is not None and session is not None:
            session.invalidations.put(root.token)

    def take_opened(self, store: LocalContent) -> set[Digest]:
        """The blobs of ``store`` that actions opened since the last call."""
        with self._table.lock:
            return self._table.take_opened(store)

    def open_files(self) -> int:
        """How many files actions hold open through the mount (tests, metrics)."""
        with self._table.lock:
            return self._table.open_handles()

    def open_descriptors(self) -> int:
        """How many descriptors the worker holds for them (one per blob)."""
        with self._table.lock:
            return self._table.open_files.descriptors

    def limit_open_files(self, per_action: int | None) -> None:
        """Change the quota of open files per action (opens from now on)."""
        with self._lock:
            self._open_files_per_action = per_action
        with self._table.lock:
            self._table.open_files.per_action = per_action

    # -- internals ------------------------------------------------------------------------

    def _take_directory(self) -> None:
        parent = os.path.dirname(self.mount_dir)
        os.makedirs(parent, exist_ok=True)
        fd = os.open(self.mount_dir + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Internal(f"FUSE mount directory {self.mount_dir} is in use by another live worker") from None
        self._lock_fd = fd
        stale = kernel_mounts.detach_all_under(self.mount_dir)
        if stale:
            log.warning("unmounted %d stale mount(s) of a previous worker under %s", len(stale), self.mount_dir)
        os.makedirs(self.mount_dir, mode=0o700, exist_ok=True)

    def _release_directory(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None

    def request_counts(self) -> dict[int, int]:
        """Requests served so far by FUSE opcode (the kernel backend; empty for pyfuse3)."""
        requests = self._requests
        return {} if requests is None else requests.counts()

    def _start(self) -> None:
        self._table = InodeTable(self._open_files_per_action)
        self.failure = None
        self._stopping = False
        self._token = None
        self._requests = None
        if self.backend != "pyfuse3" and self._start_kernel():
            return
        self._start_pyfuse3()

    def _start_kernel(self) -> bool:
        """Serve through /dev/fuse directly; False (nothing mounted) if that fails under
        ``auto``. For passthrough, the probe registers the directory's lock file as a
        backing file: on the build root's file system, like the cache usually is."""
        passthrough = self.backend == "kernel-passthrough"
        kernel = KernelSession(self.mount_dir, max_stack_depth=2 - self._stacked_overlays, passthrough=passthrough)
        try:
            kernel.mount(self._start_timeout, probe_fd=self._lock_fd)
        except Internal as error:
            kernel.close(self._stop_timeout)
            if self.backend != "auto":
                raise
            log.warning("the /dev/fuse backend did not start (%s); using pyfuse3", error)
            return False
        prefetcher = Prefetcher(kernel) if self._prefetch and not passthrough else None
        requests = self._requests = KernelRequests(self._table, self._uid, self._gid, kernel, page_cache=not passthrough,
                                                   prefetcher=prefetcher)
        self.backend_in_use = "kernel-passthrough" if passthrough else "kernel"
        session = self._session = _Session(kernel)
        ready = threading.Event()
        ready.set()  # mounted and INIT answered already
        self._thread = threading.Thread(
            target=self._serve, args=(session, ready, lambda: _serve_kernel(kernel, requests)), name="fuse", daemon=True)
        self._thread.start()
        threading.Thread(target=_invalidate_loop, args=(session,), name="fuse-invalidate", daemon=True).start()
        return True

    def _start_pyfuse3(self) -> None:
        self._fs = InputFileSystem(self._table, self._uid, self._gid)
        self.backend_in_use = "pyfuse3"
        try:
            pyfuse3.init(self._fs, self.mount_dir, set(MOUNT_OPTIONS))
        except RuntimeError as error:
            raise Internal(f"mounting the input file system at {self.mount_dir}: {error}") from None
        session = self._session = _Session(None)
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(session, ready, lambda: trio.run(self._main, ready)), name="fuse", daemon=True)
        self._thread.start()
        threading.Thread(target=_invalidate_loop, args=(session,), name="fuse-invalidate", daemon=True).start()
        if not ready.wait(self._start_timeout):
            self._stop()
            raise Internal(f"the input file system at {self.mount_dir} did not start within {self._start_timeout:g} s")

    def _stop(self) -> None:
        thread, token, session = self._thread, self._token, self._session
        self._stopping = True
        if thread is not None and thread.is_alive():
            if session is not None and session.kernel is not None:
                session.kernel.stop()
            elif token is not None:
                try:
                    token.run_sync_soon(_terminate)
                except trio.RunFinishedError:
                    pass
            thread.join(self._stop_timeout)
            if thread.is_alive():
                # Stuck (a kernel request that never completes): detach the mount, which
                # makes the session's reads fail, and give up on the thread.
                log.error("the FUSE thread did not stop within %g s; detaching %s", self._stop_timeout, self.mount_dir)
                kernel_mounts.detach(self.mount_dir)
                thread.join(self._stop_timeout)
        self._thread = None
        kernel_mounts.detach_all_under(self.mount_dir)  # whatever is left, e.g. after a crash

    def _serve(self, session: "_Session", ready: threading.Event, run: Callable[[], None]) -> None:
        """The FUSE thread: serve (``run``) until terminated or broken, then unmount."""
        try:
            run()
            if not self._stopping:
                self.failure = Internal("the input file system stopped: the kernel closed the connection")
        except BaseException as error:  # noqa: BLE001 - reported to every root below
            log.exception("the FUSE thread failed")
            self.failure = Internal(f"the input file system failed: {error!r}")
        finally:
            session.invalidations.put(None)
            failure = self.failure or Internal("the input file system was unmounted while the action ran")
            with self._table.lock:
                for root in self._table.roots():
                    root.fail(failure)
            session.close(self._stop_timeout, self.mount_dir)
            with self._table.lock:
                self._table.close_all()

    async def _main(self, ready: threading.Event) -> None:
        self._token = trio.lowlevel.current_trio_token()
        ready.set()
        await pyfuse3.main()


class _Session:
    """One session (mount) — ``kernel``'s, else pyfuse3's — and the queue of roots whose
    kernel entries to drop.

    pyfuse3 frees its session in ``close``; a notification sent after that would use freed
    memory, so both happen under ``lock`` and ``open`` says which came first.
    """

    def __init__(self, kernel: KernelSession | None) -> None:
        self.kernel = kernel
        self.lock = threading.Lock()
        self.open = True
        self.invalidations: queue.Queue[str | None] = queue.Queue()

    def close(self, timeout: float, mount_dir: str) -> None:
        if not self.lock.acquire(timeout=timeout):
            # The invalidator is stuck in the kernel: leave the session, detach the mount.
            log.error("FUSE invalidations are stuck; detaching %s without closing the session", mount_dir)
            kernel_mounts.detach(mount_dir)
            return
        try:
            self.open = False
            if self.kernel is not None:
                self.kernel.close(timeout)
            else:
                pyfuse3.close(unmount=True)  # as root: a lazy unmount
        except Exception:  # noqa: BLE001 - _stop detaches whatever is left
            log.exception("closing the FUSE session")
        finally:
            self.lock.release()


def _invalidate_loop(session: _Session) -> None:
    """Tell the kernel to drop removed roots' entries, so that it forgets their inodes. A
    thread of its own: the call waits for requests in flight in the top directory."""
    while (token := session.invalidations.get()) is not None:
        with session.lock:
            if not session.open:
                return
            try:
                if session.kernel is not None:
                    session.kernel.invalidate_entry(ROOT_INODE, token.encode())
                else:
                    pyfuse3.invalidate_entry(ROOT_INODE, token.encode())
            except OSError:
                pass  # ENOENT: the kernel never looked the root up


def _serve_kernel(kernel: KernelSession, requests: KernelRequests) -> None:
    prefetcher = requests.prefetcher
    if prefetcher is not None:
        prefetcher.start()
    try:
        kernel.serve(requests.handle)
    finally:
        if prefetcher is not None:
            prefetcher.stop()
            # A push in flight may wait on a page that a queued READ holds locked: with the
            # loop gone, that READ is answered (EIO) here, or closing would wait for it.
            kernel.refuse_until(prefetcher.stopped, timeout=5.0)


def _terminate() -> None:
    try:
        pyfuse3.terminate()
    except Exception:  # noqa: BLE001 - a failing terminate must not crash trio's loop
        log.exception("terminating the FUSE loop")
