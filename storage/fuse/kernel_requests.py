"""``KernelRequests``: the /dev/fuse backend's request handlers — the same inode table
and the same answers as :mod:`.operations` (pyfuse3), decoded and encoded by hand.

What differs from the pyfuse3 backend, and why:

* **Two modes** (``page_cache``), because every synchronous round trip per file costs
  more than the file (~85 µs on a 2-vCPU VM: each one wakes the other CPU):

  - **the page-cache mode** (the default, ``kernel``): OPEN and OPENDIR answer ENOSYS,
    which the kernel takes as "no open needed" for the whole connection
    (FUSE_NO_OPEN_SUPPORT, FUSE_NO_OPENDIR_SUPPORT): it never sends OPEN, RELEASE,
    OPENDIR or RELEASEDIR again, and opens files with KEEP_CACHE (fs/fuse/file.c,
    "Default for no-open"), so a file's pages outlive its opens. Reads come as READ
    by node id (the handle is 0), one per small file the first time only, answered
    from a descriptor opened and closed for that READ: the daemon holds no descriptor
    for what actions hold open, so the per-action quota of open files
    (:mod:`.open_files`) has nothing to count in this mode. The :mod:`.kernel_prefetch`
    thread pushes listed small files into the page cache before they are read, and
    loads listed directories, so ``find . -type f -exec cat {} +`` over 10,000 new
    files costs READDIRPLUS requests only (docs/measured.md: ~3x the floor, against
    4-10x with passthrough). The price: a big input's first read goes through READ requests
    (1 MiB at most each, MAX_PAGES): ~3x ``cat`` of the cache file, where passthrough
    is ~1x; later reads, by any action, hit the page cache while the kernel keeps the
    inode (file inodes are shared by blob, :mod:`.inodes`), which holds a second copy
    of the bytes in memory (reclaimable). Since reads may never reach the daemon, the
    cache's LRU learns of a blob when a path to it is looked up or listed.
  - **passthrough** (``kernel-passthrough``): OPEN registers the blob's descriptor
    with the kernel once (a backing id, shared by every handle on the blob, closed with
    its descriptor: see :mod:`.open_files`); reads and mmaps then go to the cache file
    without reaching this daemon. If the kernel refuses (a cache on an overlay, two
    overlays stacked on the mount), that blob is served by READ. An OPEN and a RELEASE
    per file, whatever its size.
* **Synchronous**: a request is answered in the loop's thread when it can be from memory
  or the local cache; only a directory or blob that must come from the remote is handled
  in a thread of its own (with the same deadlines), which replies when done. There is no
  event loop to pay for on the common path.
* FLUSH, xattrs, ACCESS, STATX, LSEEK... answer ENOSYS, which the kernel remembers (no
  further requests of that kind), as pyfuse3's defaults do; every write-type request is
  EROFS; INTERRUPT is ignored (every request is answered promptly or within its deadline).

Hostile or malformed requests (a truncated body, a name without its NUL, an unknown
handle) get an errno; an unexpected exception gets EIO and is recorded on every root, as
in :mod:`.operations`; nothing a request carries can end the loop.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from reapi_worker.protos.errors import Internal, ReapiError, Unavailable

from ..directory.cas import CasDirectory
from . import protocol as fuse
from .blobs import fetch_and_open, is_local, open_local
from .inodes import ROOT_INODE, ActionRoot, DirInode, FileInode, Inode, InodeTable, LinkInode, NotLoaded, attributes
from .kernel_prefetch import Prefetcher
from .kernel_session import KernelSession
from .open_files import QuotaExceeded, opener_of
from .operations import CACHE_SECONDS, INPUT_MTIME_NS

log = logging.getLogger(__name__)

T = TypeVar("T")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
_SECONDS = int(INPUT_MTIME_NS // 10**9)
_NANOS = int(INPUT_MTIME_NS % 10**9)
_VALID = int(CACHE_SECONDS)
_ATTR_OUT_HEAD = fuse.ATTR_OUT_HEAD.pack(_VALID, 0, 0)
_NEGATIVE_ENTRY = fuse.ENTRY_OUT_HEAD.pack(0, 0, _VALID, 0, 0, 0) + bytes(fuse.ATTR.size)
_STATFS = fuse.KSTATFS.pack(0, 0, 0, 0, 0, 4096, 255, 4096, 0)
_DEFERRED = object()  # the handler answers later, from a thread
_DT_REG, _DT_DIR, _DT_LNK = stat.S_IFREG >> 12, stat.S_IFDIR >> 12, stat.S_IFLNK >> 12
_PADDING = bytes(8)
_ENTRY_OUT_HEAD_PACK = fuse.ENTRY_OUT_HEAD.pack
_DIRENT_HEAD_PACK = fuse.DIRENT_HEAD.pack


class FuseError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.errno = code


class _Malformed(Exception):
    """The request's body does not hold what its opcode needs."""


class KernelRequests:
    """Answers the requests of ``session`` from ``table`` (module docstring). ``uid``/``gid``
    own the files, as in :class:`~.operations.InputFileSystem`."""

    def __init__(self, table: InodeTable, uid: int, gid: int, session: KernelSession, *, page_cache: bool = False,
                 prefetcher: Prefetcher | None = None) -> None:
        self.table = table
        # The page-cache mode (module docstring): OPEN and OPENDIR answer ENOSYS once, and
        # the kernel sends neither again; ``prefetcher`` (that mode only) works ahead.
        self._page_cache = page_cache
        self.prefetcher = prefetcher if page_cache else None
        self._uid = uid
        self._gid = gid
        self._session = session
        self._counts = [0] * 64  # by opcode (a list: cheaper than a Counter per request)
        self._loading: dict[int, threading.Event] = {}  # id(node) -> done, one load per directory
        self._fetching: dict[tuple[int, object], threading.Event] = {}  # one fetch per blob
        self._slow_lock = threading.Lock()
        self._handlers: dict[int, Callable[[int, int, int, memoryview], Any]] = {
            fuse.LOOKUP: self._lookup, fuse.FORGET: self._forget, fuse.BATCH_FORGET: self._batch_forget,
            fuse.GETATTR: self._getattr, fuse.READLINK: self._readlink, fuse.OPEN: self._open,
            fuse.READ: self._read, fuse.RELEASE: self._release, fuse.OPENDIR: self._opendir,
            fuse.READDIR: self._readdir, fuse.READDIRPLUS: self._readdirplus, fuse.RELEASEDIR: self._releasedir,
            fuse.STATFS: self._statfs, fuse.INTERRUPT: self._ignore,
        }
        table.open_files.close_backing = session.backing_close

    def counts(self) -> dict[int, int]:
        """Requests handled so far by opcode (benchmarks, tests)."""
        return {opcode: n for opcode, n in enumerate(self._counts) if n}

    def handle(self, request: memoryview) -> bool:
        """Answer one request; False after DESTROY (the loop ends)."""
        if len(request) < fuse.IN_HEADER.size:
            log.error("a FUSE request of %d bytes, shorter than its header", len(request))
            return True
        length, opcode, unique, nodeid, _, _, pid, extlen, _ = fuse.IN_HEADER.unpack_from(request)
        if opcode < 64:
            self._counts[opcode] += 1
        body = request[fuse.IN_HEADER.size:max(fuse.IN_HEADER.size, min(length, len(request)) - 8 * extlen)]
        if opcode == fuse.DESTROY:
            self._session.reply(unique, 0)
            return False
        handler = self._handlers.get(opcode)
        if handler is None:
            self._session.reply(unique, -(errno.EROFS if opcode in fuse.WRITE_OPCODES else errno.ENOSYS))
            return True
        self._answer(opcode, unique, handler, nodeid, pid, body)
        return True

    def _answer(self, opcode: int, unique: int, handler: Callable[[int, int, int, memoryview], Any],
                nodeid: int, pid: int, body: memoryview) -> None:
        error = 0
        try:
            payload = handler(unique, nodeid, pid, body)
        except FuseError as failure:
            error = failure.errno
        except (_Malformed, struct.error, UnicodeError, ValueError) as failure:
            log.warning("malformed FUSE request (opcode %d): %s", opcode, failure)
            error = errno.EINVAL
        except Exception as failure:  # noqa: BLE001 - the one place every bug becomes EIO
            log.exception("FUSE opcode %d on %d failed", opcode, nodeid)
            self.table.fail_roots(Internal(f"the input file system failed in opcode {opcode}: {failure!r}"))
            error = errno.EIO
        if opcode in fuse.NO_REPLY_OPCODES:
            return
        if error:
            self._session.reply(unique, -error)
        elif payload is not _DEFERRED:
            self._session.reply(unique, 0, payload)

    # -- attributes -----------------------------------------------------------------------

    def _attr(self, inode: Inode | None, ino: int) -> bytes:
        a = attributes(inode, self._uid, self._gid)
        return fuse.ATTR.pack(ino, a.size, (a.size + 511) // 512, _SECONDS, _SECONDS, _SECONDS, _NANOS, _NANOS, _NANOS,
                              a.mode, a.nlink, a.uid, a.gid, 0, 4096, 0)

    def _entry(self, inode: Inode) -> bytes:
        return fuse.ENTRY_OUT_HEAD.pack(inode.ino, 0, _VALID, _VALID, 0, 0) + self._attr(inode, inode.ino)

    def _known(self, ino: int) -> Inode | None:
        """The inode, None for the top directory; ESTALE for a number of a removed root."""
        if ino == ROOT_INODE:
            return None
        inode = self.table.get(ino)
        if inode is None:
            raise FuseError(errno.ESTALE)
        return inode

    # -- name space -----------------------------------------------------------------------

    def _lookup(self, unique: int, parent: int, pid: int, body: memoryview) -> Any:
        return self._lookup_name(unique, parent, os.fsdecode(_name(body)))

    def _lookup_name(self, unique: int, parent: int, text: str) -> Any:
        # A retry gets the name, never ``body``: the loop reuses its buffer meanwhile.
        try:
            with self.table.lock:
                inode = self.table.lookup(parent, text)
                if self._page_cache and type(inode) is FileInode:
                    self.table.note_read(inode)  # its reads may never reach us: see the module docstring
        except NotLoaded as pending:
            return self._after_load(pending, unique, lambda: self._lookup_name(unique, parent, text))
        except KeyError:
            raise FuseError(errno.ESTALE) from None
        except NotADirectoryError:
            raise FuseError(errno.ENOTDIR) from None
        if inode is None:
            if parent == ROOT_INODE:
                raise FuseError(errno.ENOENT)  # roots come and go: never cache a miss
            return _NEGATIVE_ENTRY  # inode 0: the kernel caches the miss
        return self._entry(inode)

    def _forget(self, unique: int, ino: int, pid: int, body: memoryview) -> None:
        (count,) = fuse.FORGET_IN.unpack_from(body)
        with self.table.lock:
            self.table.forget(ino, count)

    def _batch_forget(self, unique: int, ino: int, pid: int, body: memoryview) -> None:
        count, _ = fuse.BATCH_FORGET_IN.unpack_from(body)
        count = min(count, (len(body) - fuse.BATCH_FORGET_IN.size) // fuse.FORGET_ONE.size)
        with self.table.lock:
            for one, nlookup in fuse.FORGET_ONE.iter_unpack(body[fuse.BATCH_FORGET_IN.size:][:count * 16]):
                self.table.forget(one, nlookup)

    def _getattr(self, unique: int, ino: int, pid: int, body: memoryview) -> bytes:
        with self.table.lock:
            return _ATTR_OUT_HEAD + self._attr(self._known(ino), ino)

    def _readlink(self, unique: int, ino: int, pid: int, body: memoryview) -> bytes:
        with self.table.lock:
            link = self._known(ino)
        if type(link) is not LinkInode:
            raise FuseError(errno.EINVAL)
        return link.target

    def _opendir(self, unique: int, ino: int, pid: int, body: memoryview) -> Any:
        if self._page_cache:
            raise FuseError(errno.ENOSYS)  # no OPENDIR/RELEASEDIR from now on
        with self.table.lock:
            directory = self._known(ino)
        if directory is not None and type(directory) is not DirInode:
            raise FuseError(errno.ENOTDIR)
        if directory is not None and directory.node.loaded_entries() is None:
            pending = NotLoaded(directory.node, directory.root)
            return self._after_load(pending, unique, lambda: self._opendir(unique, ino, pid, memoryview(b"")))
        # The handle is the inode; the listing never changes, so the kernel may keep it.
        return fuse.OPEN_OUT.pack(ino, fuse.FOPEN_KEEP_CACHE | fuse.FOPEN_CACHE_DIR, 0)

    def _readdir(self, unique: int, ino: int, pid: int, body: memoryview) -> Any:
        fh, offset, size = fuse.READ_IN.unpack_from(body)
        return self._list(unique, fh or ino, offset, size, plus=False)

    def _readdirplus(self, unique: int, ino: int, pid: int, body: memoryview) -> Any:
        fh, offset, size = fuse.READ_IN.unpack_from(body)
        return self._list(unique, fh or ino, offset, size, plus=True)

    def _list(self, unique: int, ino: int, offset: int, size: int, plus: bool) -> Any:
        """Entries of directory ``ino`` from ``offset``. With OPENDIR the handle is the
        directory's inode; without (the page-cache mode) it is 0 and the request's node id
        says which directory, and one not loaded yet is loaded here (no OPENDIR did it).
        In that mode the listed files are offered to the prefetcher (kernel_prefetch.py)."""
        if ino == ROOT_INODE:
            return b""  # the roots are not listed: each action knows only its own by name
        head = fuse.DIRENT_HEAD.size + (fuse.ENTRY_OUT_HEAD.size + fuse.ATTR.size if plus else 0)
        parts: list[bytes] = []
        listed: list[FileInode] = []
        subdirectories: list[CasDirectory] = []
        used = 0
        with self.table.lock:
            directory = self._known(ino)
            if type(directory) is not DirInode:
                raise FuseError(errno.ENOTDIR)
            entries = directory.node.loaded_entries()
            if entries is None:
                loading: NotLoaded | None = NotLoaded(directory.node, directory.root)
            else:
                loading = None
                names = self.table.names(directory)
                child, attr, entry_head = self.table.child, self._attr, _ENTRY_OUT_HEAD_PACK  # per entry: no lookups
                for index in range(offset, len(names)):
                    text = names[index]
                    name = text.encode("utf-8", "surrogateescape")  # os.fsencode, without its Python frame
                    step = (head + len(name) + 7) & ~7  # fuse.dirent_size
                    if used + step > size:
                        break
                    inode = child(directory, text, entries[text])  # counts a lookup of a file: sent below
                    kind = _DT_REG if type(inode) is FileInode else _DT_DIR if type(inode) is DirInode else _DT_LNK
                    if plus:
                        parts.append(entry_head(inode.ino, 0, _VALID, _VALID, 0, 0))
                        parts.append(attr(inode, inode.ino))
                        if kind == _DT_REG:
                            listed.append(inode)  # type: ignore[arg-type]
                        elif kind == _DT_DIR:
                            subdirectories.append(inode.node)  # type: ignore[union-attr]
                    parts.append(_DIRENT_HEAD_PACK(inode.ino, index + 1, len(name), kind))
                    parts.append(name)
                    parts.append(_PADDING[:(8 - len(name)) % 8])
                    used += step
                if self._page_cache and listed:
                    # Its reads may never reach us: see the module docstring.
                    self.table.note_reads(directory.root.store, listed)
                if self.prefetcher is not None:
                    if subdirectories:
                        self.prefetcher.offer_directories(directory.root, subdirectories)
                    if listed:
                        self.prefetcher.offer_files(directory.root, listed)
        if loading is not None:
            return self._after_load(loading, unique, lambda: self._list(unique, ino, offset, size, plus))
        return b"".join(parts)

    def _releasedir(self, unique: int, ino: int, pid: int, body: memoryview) -> bytes:
        return b""

    def _statfs(self, unique: int, ino: int, pid: int, body: memoryview) -> bytes:
        return _STATFS  # overlayfs refuses a lower layer whose statfs fails

    def _ignore(self, unique: int, ino: int, pid: int, body: memoryview) -> None:
        return None

    # -- contents -------------------------------------------------------------------------

    def _open(self, unique: int, ino: int, pid: int, body: memoryview) -> Any:
        flags, _ = fuse.OPEN_IN.unpack_from(body)
        if flags & _WRITE_FLAGS:
            raise FuseError(errno.EROFS)
        if self._page_cache:
            raise FuseError(errno.ENOSYS)  # no OPEN/RELEASE from now on (module docstring)
        # Who opens matters only for a quota (a /proc lookup per open otherwise).
        opener = opener_of(pid) if self.table.open_files.per_action is not None else None
        try:
            with self.table.lock:
                file = self._known(ino)
                if type(file) is not FileInode:
                    raise FuseError(errno.EISDIR if type(file) is DirInode else errno.EINVAL)
                handle = self.table.share_handle(file, opener)
                if handle is not None:
                    return self._opened(handle)
            fd = open_local(file.store, file.digest)
            if fd is None:
                self._in_thread(unique, lambda: self._open_fetched(file, opener))
                return _DEFERRED
            return self._add(fd, file, opener)
        except QuotaExceeded:
            raise FuseError(errno.EMFILE) from None

    def _add(self, fd: int, file: FileInode, opener: int | None) -> bytes:
        with self.table.lock:
            return self._opened(self.table.add_handle(fd, file, opener))

    def _opened(self, handle: int) -> bytes:
        """The OPEN reply for ``handle``: passthrough to its blob's backing file if the
        kernel takes it (decided once per blob descriptor, since the kernel refuses a file
        opened both ways at once). Called with the table's lock held."""
        files = self.table.open_files
        backing = files.backing(handle)
        if backing is None:
            fd = files.descriptor(handle)
            registered = self._session.backing_open(fd) if self._session.passthrough and fd is not None else None
            backing = -1 if registered is None else registered
            files.set_backing(handle, backing)
        # KEEP_CACHE: the kernel's page cache of a blob outlives its opens. The kernel
        # refuses it beside PASSTHROUGH (the page cache is the backing file's then).
        if backing < 0:
            return fuse.OPEN_OUT.pack(handle, fuse.FOPEN_KEEP_CACHE | fuse.FOPEN_NOFLUSH, 0)
        return fuse.OPEN_OUT.pack(handle, fuse.FOPEN_PASSTHROUGH | fuse.FOPEN_NOFLUSH, backing)

    def _open_fetched(self, file: FileInode, opener: int | None) -> bytes:
        try:
            return self._add(self._fetch(file), file, opener)
        except QuotaExceeded:
            raise FuseError(errno.EMFILE) from None

    def _read(self, unique: int, ino: int, pid: int, body: memoryview) -> Any:
        fh, offset, size = fuse.READ_IN.unpack_from(body)
        if fh == 0 and self._page_cache:
            return self._read_inode(unique, ino, offset, size)
        with self.table.lock:
            fd = self.table.descriptor(fh)
        if fd is None:
            raise FuseError(errno.EBADF)
        return _pread(fd, offset, size)

    def _read_inode(self, unique: int, ino: int, offset: int, size: int) -> Any:
        """READ without OPEN (the page-cache mode): the blob is opened for this one read
        and closed again, so the daemon holds no descriptor for what actions hold open
        (and there is nothing for a quota of open files to count: see the module
        docstring). A blob that is not local is fetched first, in a thread."""
        with self.table.lock:
            file = self._known(ino)
            if type(file) is not FileInode:
                raise FuseError(errno.EISDIR if type(file) is DirInode else errno.EINVAL)
            file.offered = file.read = True  # in the page cache now: never push it
            self.table.note_read(file)
        fd = open_local(file.store, file.digest)
        if fd is None:
            self._in_thread(unique, lambda: _pread_closing(self._fetch(file), offset, size))
            return _DEFERRED
        return _pread_closing(fd, offset, size)

    def _release(self, unique: int, ino: int, pid: int, body: memoryview) -> bytes:
        (fh,) = fuse.RELEASE_IN.unpack_from(body)
        with self.table.lock:
            self.table.close_handle(fh)
        return b""

    # -- the slow path: the remote, in threads --------------------------------------------

    def _after_load(self, pending: NotLoaded, unique: int, retry: Callable[[], Any]) -> Any:
        """Load ``pending``'s directory, then answer with ``retry()``: inline if it is in
        the local cache (a file read), else in a thread with the root's deadline."""
        if self.prefetcher is not None:
            self.prefetcher.wait_for(pending.node)  # parsing it already: not twice at once
            if pending.node.loaded_entries() is not None:
                return retry()
        if is_local(pending.root.store, pending.node.digest()):
            try:
                pending.node.entries()
            except ReapiError as error:
                pending.root.fail(error.within(f"loading input directory {pending.node.digest()}"))
                raise FuseError(errno.EIO) from None
            return retry()

        def load_then_answer() -> Any:
            self._load(pending.node, pending.root)
            return retry()

        self._in_thread(unique, load_then_answer)
        return _DEFERRED

    def _in_thread(self, unique: int, work: Callable[[], Any]) -> None:
        def run() -> None:
            self._answer(0, unique, lambda *_: work(), 0, 0, memoryview(b""))

        threading.Thread(target=run, name="fuse-slow", daemon=True).start()

    def _load(self, node: CasDirectory, root: ActionRoot) -> None:
        """One load per directory, concurrent requests wait for it (in their threads)."""
        key = id(node)
        with self._slow_lock:
            pending = self._loading.get(key)
            if pending is None:
                done = self._loading[key] = threading.Event()
        if pending is not None:
            pending.wait(root.fetch_timeout)
            return  # the retry reloads (and reports) if it failed
        try:
            _with_deadline(node.entries, root.fetch_timeout)
        except ReapiError as error:
            root.fail(error.within(f"loading input directory {node.digest()}"))
            raise FuseError(errno.EIO) from None
        finally:
            with self._slow_lock:
                del self._loading[key]
            done.set()

    def _fetch(self, file: FileInode) -> int:
        """Fetch ``file``'s blob (once, however many open it together) and return a
        descriptor of it; EIO, recorded on the roots that looked it up, on failure."""
        key = (id(file.store), file.digest)
        with self._slow_lock:
            pending = self._fetching.get(key)
            if pending is None:
                done = self._fetching[key] = threading.Event()
        if pending is not None:
            pending.wait(file.fetch_timeout)
            fd = open_local(file.store, file.digest)
            if fd is None:
                raise FuseError(errno.EIO)  # the fetch failed: already recorded
            return fd
        try:
            return _with_deadline(lambda: fetch_and_open(file.store, file.digest), file.fetch_timeout)
        except ReapiError as error:
            error.within(f"fetching input blob {file.digest} on first read")
            self.table.fail_readers(file, error)
            raise FuseError(errno.EIO) from None
        finally:
            with self._slow_lock:
                del self._fetching[key]
            done.set()


#: The most one READ answers (the kernel asks for at most max_pages pages).
fuse_read_limit = 1 << 20


def _pread(fd: int, offset: int, size: int) -> bytes:
    try:
        return os.pread(fd, min(size, fuse_read_limit), offset)
    except OverflowError:
        raise FuseError(errno.EINVAL) from None
    except OSError as error:
        raise FuseError(error.errno or errno.EIO) from None


def _pread_closing(fd: int, offset: int, size: int) -> bytes:
    try:
        return _pread(fd, offset, size)
    finally:
        os.close(fd)


def _name(body: memoryview) -> bytes:
    """A request's NUL-terminated name."""
    raw = bytes(body)
    end = raw.find(b"\0")
    if end <= 0 or b"/" in raw[:end]:
        raise _Malformed("no name, or a name with a '/' or without its NUL")
    return raw[:end]


def _with_deadline(work: Callable[[], T], timeout: float) -> T:
    """Run ``work`` in a thread for at most ``timeout`` seconds: its result or what it
    raised (OSError as Internal), or Unavailable after the deadline — the thread is left
    to finish on its own, and a descriptor it returns late is closed."""
    lock = threading.Lock()
    outcome: list[Any] = []  # [value, error] once done; ["abandoned"] after the deadline
    finished = threading.Event()

    def run() -> None:
        try:
            value, error = work(), None
        except BaseException as caught:  # noqa: BLE001 - handed over below
            value, error = None, caught
        with lock:
            if outcome:
                if isinstance(value, int):
                    os.close(value)
                return
            outcome.extend([value, error])
        finished.set()

    threading.Thread(target=run, name="fuse-fetch", daemon=True).start()
    finished.wait(timeout)
    with lock:
        if not outcome:
            outcome.append("abandoned")
            raise Unavailable(f"no answer within {timeout:g} s")
    value, error = outcome
    if error is not None:
        if isinstance(error, OSError):
            raise Internal(str(error))
        raise error
    return value
