"""``KernelSession``: one FUSE connection spoken over ``/dev/fuse`` directly, without
libfuse — mounted with ``mount(2)``, INIT answered here, requests read in a loop.

Why not libfuse: passthrough (the kernel reads a file's bytes from a descriptor the
daemon registered, ``FUSE_DEV_IOC_BACKING_OPEN``, without a READ request per call) needs
libfuse >= 3.16, pyfuse3 adds ~50 µs of wrapping to each request besides, and neither
offers pushing into the page cache from a thread of ours (the page-cache mode,
:mod:`.kernel_requests`). The protocol
a read-only file system needs is small (:mod:`.protocol`); the request handlers are in
:mod:`.kernel_requests`.

Stack depth (passthrough only; without it the mount has depth 0 like any FUSE mount):
the mount is the lower layer of each action's overlayfs, which adds one to
the depth of the file systems below it, and the kernel allows 2 in all
(FILESYSTEM_MAX_STACK_DEPTH). The depth answered in INIT becomes this mount's own, so it
must be 1 — and passthrough is impossible when two overlays are stacked on the mount
(0 is left for it: why a bounded build directory puts its overlay straight on the FUSE
view, storage/bounded_staging.py). Backing files must
then live on a file system of depth 0 (not an overlay), else BACKING_OPEN fails (ELOOP)
and that blob is served by READ requests instead.

Threads: :meth:`serve` runs the loop in the caller's thread; replies and notifications
may be written from any thread (each is one ``write``, which the kernel takes whole).
:meth:`stop` ends the loop from another thread through a pipe the loop polls when
``/dev/fuse`` is idle; :attr:`idle` tells a prefetching thread when that is.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import threading
import time
from collections.abc import Callable

from reapi_worker.host import mounts as host_mounts
from reapi_worker.protos.errors import Internal

from . import kernel_mounts
from . import protocol as fuse

log = logging.getLogger(__name__)

#: Bytes read per request: at least FUSE_MIN_READ_BUFFER and a WRITE of max_write. A
#: larger request (a huge SETXATTR) is refused by the kernel itself (E2BIG).
BUFFER_BYTES = 64 * 1024 + 4096
MAX_WRITE = 4096  # nothing is written through the mount; the kernel's minimum
_OUT_HEADER_PACK = fuse.OUT_HEADER.pack
_OUT_HEADER_SIZE = fuse.OUT_HEADER.size
_WANTED_FLAGS = (fuse.ASYNC_READ | fuse.DO_READDIRPLUS | fuse.PARALLEL_DIROPS | fuse.CACHE_SYMLINKS
                 | fuse.INIT_EXT | fuse.PASSTHROUGH | fuse.MAX_PAGES)
#: Pages one READ may ask for (with MAX_PAGES agreed; 32 without): up to 1 MiB per READ
#: of a big input without passthrough. What it asks for is its readahead's choice: 256 KiB
#: per READ for ``cat`` of 100 MiB here (docs/measured.md).
MAX_PAGES = 256


class KernelSession:
    """A FUSE mount at ``mount_dir`` and its connection (module docstring). Construct,
    :meth:`mount`, then :meth:`serve` in a thread; :meth:`stop` and :meth:`close` after."""

    def __init__(self, mount_dir: str, max_stack_depth: int = 1, passthrough: bool = True) -> None:
        self.mount_dir = mount_dir
        # See the module docstring: 2 minus the overlays stacked on the mount; 0 for none.
        self.max_stack_depth = max_stack_depth
        self._passthrough_wanted = passthrough  # False: the page-cache mode (kernel_requests)
        self.fd = -1
        self.passthrough = False  # INIT agreed on it and a BACKING_OPEN worked
        self.kernel_minor = 0
        self.backing_ids: set[int] = set()  # registered and not closed yet (tests, leaks)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._closed = False
        self._mounted = False
        self._write_lock = threading.Lock()  # replies vs. close
        # Invalidations vs. close: a notification may wait on a directory lock the kernel
        # holds while it waits for a reply, so it must never hold the replies' lock.
        self._notify_lock = threading.Lock()
        #: Set when the loop found /dev/fuse empty: work that must never delay a request
        #: (kernel_prefetch.py) waits for it.
        self.idle = threading.Event()

    # -- setting up -------------------------------------------------------------------

    def mount(self, init_timeout: float, probe_fd: int | None = None) -> None:
        """Open ``/dev/fuse``, mount it and answer INIT. ``probe_fd`` (a regular file on
        the file system the blobs live on) is registered and dropped as a backing file to
        find out whether passthrough really works. Raises Internal."""
        try:
            self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as error:
            raise Internal(f"opening /dev/fuse: {error.strerror}") from None
        options = (f"fd={self.fd},rootmode=40000,user_id={os.geteuid()},group_id={os.getegid()},"
                   "allow_other,default_permissions")
        try:
            host_mounts.mount("reapi-worker-inputs", self.mount_dir, "fuse.reapi",
                              host_mounts.MS_RDONLY | host_mounts.MS_NOSUID | host_mounts.MS_NODEV, options)
        except OSError as error:
            raise Internal(f"mounting the input file system at {self.mount_dir}: {error.strerror}") from None
        self._mounted = True
        self._answer_init(init_timeout)
        if self.passthrough and probe_fd is not None:
            backing = self.backing_open(probe_fd)
            if backing is None:
                self.passthrough = False
            else:
                self.backing_close(backing)

    def _answer_init(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        buffer = bytearray(BUFFER_BYTES)
        poller = select.poll()  # not select(): a busy worker's descriptors pass FD_SETSIZE
        poller.register(self.fd, select.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Internal(f"the kernel sent no FUSE INIT for {self.mount_dir} within {timeout:g} s")
            poller.poll(remaining * 1000)
            try:
                length = os.readv(self.fd, [buffer])
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as error:
                raise Internal(f"reading FUSE INIT: {error.strerror}") from None
            break
        _, opcode, unique, *_ = fuse.IN_HEADER.unpack_from(buffer)
        if opcode != fuse.INIT or length < fuse.IN_HEADER.size + 16:
            raise Internal(f"the kernel's first FUSE request is opcode {opcode}, not INIT")
        body = memoryview(buffer)[fuse.IN_HEADER.size:length]
        major, minor, max_readahead, flags = fuse.INIT_IN.unpack_from(bytes(body[:16]) + bytes(4))[:4]
        flags2 = fuse.INIT_IN.unpack_from(body)[4] if len(body) >= fuse.INIT_IN.size else 0
        if major != fuse.KERNEL_VERSION or minor < 31:
            self.reply(unique, -errno.EPROTO)
            raise Internal(f"the kernel speaks FUSE {major}.{minor}; 7.31 or later is needed")
        offered = flags | (flags2 << 32 if flags & fuse.INIT_EXT else 0)
        agreed = offered & _WANTED_FLAGS
        if self.max_stack_depth < 1 or not self._passthrough_wanted:
            agreed &= ~fuse.PASSTHROUGH
        self.kernel_minor = minor
        self.passthrough = bool(agreed & fuse.PASSTHROUGH)
        self.reply(unique, 0, fuse.INIT_OUT.pack(
            fuse.KERNEL_VERSION, min(minor, fuse.KERNEL_MINOR), max_readahead, agreed & 0xFFFFFFFF,
            16, 12, MAX_WRITE, 1, MAX_PAGES, 0, agreed >> 32, self.max_stack_depth if self.passthrough else 0))

    # -- serving ----------------------------------------------------------------------

    def serve(self, handle: Callable[[memoryview], bool]) -> None:
        """Read requests and hand each to ``handle`` until :meth:`stop`, the unmount
        (ENODEV), or ``handle`` returning False (DESTROY)."""
        buffer = bytearray(BUFFER_BYTES)
        view = memoryview(buffer)
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        idle = self.idle
        while not self._stopping:
            try:
                length = os.readv(self.fd, [buffer])
            except BlockingIOError:
                if not idle.is_set():
                    idle.set()
                poller.poll()
                continue
            except InterruptedError:
                continue
            except OSError as error:
                if error.errno == errno.ENOENT:  # the request was interrupted meanwhile
                    continue
                if error.errno == errno.ENODEV:  # unmounted, or the connection aborted
                    return
                raise
            if not handle(view[:length]):
                return

    def reply(self, unique: int, error: int, payload: bytes = b"") -> None:
        """Answer request ``unique``: ``error`` is 0 or a negative errno."""
        try:
            with self._write_lock:  # never to a closed (and maybe reused) descriptor number
                if self._closed:
                    return
                os.writev(self.fd, (_OUT_HEADER_PACK(_OUT_HEADER_SIZE + len(payload), error, unique), payload))
        except OSError as failure:
            # ENOENT: the request was interrupted or aborted meanwhile; ENODEV: unmounted.
            if failure.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.error("answering FUSE request %d: %s", unique, failure)

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Tell the kernel to forget ``name`` in ``parent`` (blocks while the kernel holds
        the directory: call it from a thread of its own)."""
        body = fuse.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0"
        with self._notify_lock:
            if self._closed:
                return
            try:
                os.write(self.fd, fuse.OUT_HEADER.pack(fuse.OUT_HEADER.size + len(body), fuse.NOTIFY_INVAL_ENTRY, 0)
                         + body)
            except OSError:
                pass  # ENOENT: the kernel never looked it up

    def store(self, nodeid: int, data: bytes) -> int:
        """Put ``data`` into the page cache of inode ``nodeid`` from offset 0 (NOTIFY_STORE):
        0, or the errno (ENOENT: the kernel does not know the inode, or not yet). May block
        while a READ of the same pages waits for its reply: never call it from the loop's
        thread (kernel_prefetch.py)."""
        body = fuse.NOTIFY_STORE_OUT.pack(nodeid, 0, len(data), 0)
        with self._notify_lock:
            if self._closed:
                return errno.ENODEV
            try:
                os.writev(self.fd, (_OUT_HEADER_PACK(_OUT_HEADER_SIZE + len(body) + len(data), fuse.NOTIFY_STORE, 0),
                                    body, data))
            except OSError as error:
                return error.errno or errno.EIO
        return 0

    def refuse_until(self, done: threading.Event, timeout: float) -> None:
        """After :meth:`serve` ended: answer EIO to every request still queued, until
        ``done`` is set or ``timeout`` passes. A :meth:`store` may wait on a page whose
        READ is queued and will otherwise never be answered; this lets it through."""
        deadline = time.monotonic() + timeout
        buffer = bytearray(BUFFER_BYTES)
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while not done.is_set() and not self._closed and time.monotonic() < deadline:
            if not poller.poll(10):
                continue
            try:
                length = os.readv(self.fd, [buffer])
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return  # ENODEV: the connection is gone, and its requests with it
            if length >= fuse.IN_HEADER.size:
                _, opcode, unique, *_ = fuse.IN_HEADER.unpack_from(buffer)
                if opcode not in fuse.NO_REPLY_OPCODES:
                    self.reply(unique, -errno.EIO)

    def backing_open(self, fd: int) -> int | None:
        """Register ``fd`` as a backing file; its id, or None if the kernel refuses."""
        try:
            backing = fcntl.ioctl(self.fd, fuse.BACKING_OPEN, bytearray(fuse.BACKING_MAP.pack(fd, 0, 0)))
        except OSError as error:
            log.debug("FUSE passthrough refused for a blob: %s", error)
            return None
        self.backing_ids.add(backing)
        return backing

    def backing_close(self, backing: int) -> None:
        """Drop a backing id; after :meth:`close` there is nothing to drop (closing the
        connection dropped them all)."""
        self.backing_ids.discard(backing)
        if self._closed:
            return
        try:
            fcntl.ioctl(self.fd, fuse.BACKING_CLOSE, bytearray(fuse.BACKING_ID.pack(backing)))
        except OSError as error:
            log.warning("closing FUSE backing id %d: %s", backing, error)

    # -- ending -----------------------------------------------------------------------

    def stop(self) -> None:
        """Make :meth:`serve` return (from any thread)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def close(self, timeout: float) -> None:
        """Unmount (lazily if busy) and close the connection: whatever still uses the mount
        (an overlay of a running action) gets ENOTCONN. Idempotent; after :meth:`serve`.
        An invalidation stuck in the kernel for ``timeout`` leaves the descriptor open."""
        if self._mounted:
            self._mounted = False
            try:
                kernel_mounts.unmount(self.mount_dir)
            except Internal as error:
                log.error("%s", error)
        if not self._notify_lock.acquire(timeout=timeout):
            log.error("a FUSE invalidation is stuck; leaving the connection of %s open", self.mount_dir)
            return
        try:
            with self._write_lock:
                if self._closed:
                    return
                self._closed = True
                for fd in (self.fd, self._wake_r, self._wake_w):
                    if fd >= 0:
                        os.close(fd)
        finally:
            self._notify_lock.release()
