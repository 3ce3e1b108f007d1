"""``InputFileSystem``: the pyfuse3 request handlers serving registered input trees read-only.

What each request costs, since every one is a round trip into Python:

* ``lookup``/``getattr``: answered from the Directory protos (a directory is read from the
  local cache on first visit: ~30 µs inline; from the remote in a thread, with a deadline,
  if the cache lost it). Attributes and entries never change, so the kernel may keep them
  for :data:`CACHE_SECONDS`; names that do not exist are cached too (negative entries),
  which matters under an overlay: every file an action creates is first looked up below.
* ``open``: shares the blob's descriptor if it is open already, else opens its cache file;
  a blob not in the local cache is fetched first (in a worker thread, at most
  ``fetch_timeout`` seconds, else EIO), once however many open it together. An action that
  holds its quota of open files gets EMFILE (see :mod:`.open_files`). ``keep_cache`` keeps the kernel's page cache across opens: a blob read
  once is served by the kernel afterwards, for every action sharing the inode.
* ``read``: one ``pread`` of the cached file. ``flush`` is left unimplemented (ENOSYS), so
  the kernel stops sending it; ``release`` drops the handle (and the descriptor with the
  blob's last handle).
* Every write-side request fails with EROFS (the mount is read-only: actions write to an
  overlay's upper directory, never through this daemon).

Errors: a failed fetch returns EIO to the reader and is recorded on every registered root
that looked the blob up (the stager turns it into the action's status). Any unexpected
exception in a handler is logged, recorded as Internal and answered with EIO: pyfuse3
would otherwise end its main loop, i.e. the mount, for every action.

Runs in the one FUSE thread (trio); see :mod:`.inodes` for the locking.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

from reapi_worker.protos.errors import Internal, ReapiError, Unavailable

from ..digests import Digest
from ..directory.cas import CasDirectory
from .blobs import fetch_and_open as _fetch_and_open
from .blobs import is_local as _is_local
from .blobs import open_local as _open_local
from .inodes import ROOT_INODE, ActionRoot, DirInode, FileInode, InodeTable, LinkInode, NotLoaded, attributes
from .open_files import QuotaExceeded, opener_of

log = logging.getLogger(__name__)

#: How long the kernel may trust an answer. Inputs never change while mounted, and a
#: removed root is invalidated explicitly, so the only limit is memory, which the kernel
#: manages itself.
CACHE_SECONDS = 3600.0
#: Every time stamp of an input. Fixed, so actions are reproducible, and after 1980 so
#: that tools which refuse older times (zip) accept inputs (BuildStream uses this one).
INPUT_MTIME_NS = 1321009871 * 10**9  # 2011-11-11 11:11:11 UTC
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT

T = TypeVar("T")
P = ParamSpec("P")


def _handler(
    method: Callable[Concatenate[InputFileSystem, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[InputFileSystem, P], Coroutine[Any, Any, T]]:
    """Answer every unexpected exception with EIO (recorded on all roots) instead of
    letting it end pyfuse3's main loop."""

    @functools.wraps(method)
    async def wrapper(self: InputFileSystem, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as error:  # noqa: BLE001 - the one place every bug becomes EIO
            log.exception("FUSE %s%r failed", method.__name__, args[:2])
            self.table.fail_roots(Internal(f"the input file system failed in {method.__name__}: {error!r}"))
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class InputFileSystem(pyfuse3.Operations):
    """Serves the roots in ``table`` (see the module docstring). ``uid``/``gid`` own the
    mount's top directory; each root's directories, files and symlinks are owned by the
    uid the sandbox runs as (:mod:`.inodes`: why files too)."""

    # No "." / ".." lookups: the kernel resolves ".." itself (no NFS export here).
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, table: InodeTable, uid: int, gid: int) -> None:
        super().__init__()
        self.table = table
        self._uid = uid
        self._gid = gid
        self._loading: dict[int, trio.Event] = {}  # id(node) -> done, one load per directory
        self._fetching: dict[tuple[int, Digest], trio.Event] = {}  # one fetch per blob

    # -- attributes -----------------------------------------------------------------------

    def _attributes(self, inode: DirInode | LinkInode | FileInode | None, ino: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = ino
        attrs.entry_timeout = CACHE_SECONDS
        attrs.attr_timeout = CACHE_SECONDS
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = INPUT_MTIME_NS
        attrs.st_blksize = 4096
        these = attributes(inode, self._uid, self._gid)
        attrs.st_mode, attrs.st_nlink, attrs.st_uid, attrs.st_gid = these.mode, these.nlink, these.uid, these.gid
        attrs.st_size, attrs.st_blocks = these.size, (these.size + 511) // 512
        return attrs

    def _known(self, ino: int) -> DirInode | LinkInode | FileInode | None:
        """The inode, None for the top directory; ESTALE for a number of a removed root."""
        if ino == ROOT_INODE:
            return None
        inode = self.table.get(ino)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return inode

    # -- name space -----------------------------------------------------------------------

    @_handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(name)
        while True:
            try:
                with self.table.lock:
                    inode = self.table.lookup(parent_inode, text)
                    break
            except NotLoaded as pending:
                await self._load(pending.node, pending.root)
            except KeyError:
                raise pyfuse3.FUSEError(errno.ESTALE) from None
            except NotADirectoryError:
                raise pyfuse3.FUSEError(errno.ENOTDIR) from None
        if inode is None:
            if parent_inode == ROOT_INODE:
                raise pyfuse3.FUSEError(errno.ENOENT)  # roots come and go: never cache a miss
            negative = pyfuse3.EntryAttributes()  # inode 0: the kernel caches the miss
            negative.entry_timeout = CACHE_SECONDS
            return negative
        return self._attributes(inode, inode.ino)

    @_handler
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        with self.table.lock:
            for ino, count in inode_list:
                self.table.forget(ino, count)

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        with self.table.lock:
            return self._attributes(self._known(inode), inode)

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        with self.table.lock:
            link = self._known(inode)
        if type(link) is not LinkInode:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return link.target

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        with self.table.lock:
            directory = self._known(inode)
        if directory is not None and type(directory) is not DirInode:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if directory is not None and directory.node.loaded_entries() is None:
            await self._load(directory.node, directory.root)
        return inode  # the handle is the inode: readdir gets only the handle

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh == ROOT_INODE:
            return  # the roots are not listed: each action knows only its own by name
        with self.table.lock:
            directory = self._known(fh)
            assert type(directory) is DirInode
            names = self.table.names(directory)
            for index in range(start_id, len(names)):
                name = names[index]
                inode = self.table.lookup(fh, name)
                assert inode is not None
                if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attributes(inode, inode.ino), index + 1):
                    if type(inode) is FileInode:
                        self.table.forget(inode.ino, 1)  # not sent: the kernel did not count it
                    break

    @_handler
    async def releasedir(self, fh: int) -> None:
        return None

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # overlayfs refuses a lower layer whose statfs fails.
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data

    # -- contents -------------------------------------------------------------------------

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        with self.table.lock:
            file = self._known(inode)
        if type(file) is not FileInode:
            raise pyfuse3.FUSEError(errno.EISDIR if type(file) is DirInode else errno.EINVAL)
        opener = opener_of(ctx.pid)
        try:
            with self.table.lock:
                handle = self.table.share_handle(file, opener)
            if handle is None:
                fd = _open_local(file.store, file.digest)
                if fd is None:
                    fd = await self._fetch(file)
                with self.table.lock:
                    handle = self.table.add_handle(fd, file, opener)
        except QuotaExceeded:
            raise pyfuse3.FUSEError(errno.EMFILE) from None
        return pyfuse3.FileInfo(fh=handle, keep_cache=True)

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        with self.table.lock:
            fd = self.table.descriptor(fh)
        if fd is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        # Inline: the cache file is local and most likely in the page cache already; a
        # thread hop would cost more than the read.
        return os.pread(fd, size, off)

    @_handler
    async def release(self, fh: int) -> None:
        with self.table.lock:
            self.table.close_handle(fh)

    # -- loading --------------------------------------------------------------------------

    async def _load(self, node: CasDirectory, root: ActionRoot) -> None:
        """Read a directory's proto: inline if it is in the local cache (a file read), else
        in a thread with a deadline, so that the FUSE thread never waits on the network.
        One load per directory; concurrent requests wait for it."""
        key = id(node)
        pending = self._loading.get(key)
        if pending is not None:
            await pending.wait()
            return
        done = self._loading[key] = trio.Event()
        try:
            try:
                if _is_local(root.store, node.digest()):
                    node.entries()
                    return
                await _in_thread(node.entries, root.fetch_timeout)
            except ReapiError as error:
                root.fail(error.within(f"loading input directory {node.digest()}"))
                raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            del self._loading[key]
            done.set()

    async def _fetch(self, file: FileInode) -> int:
        """Fetch ``file``'s blob into the local cache (once, however many open it at the
        same time) and return a descriptor of it; EIO, recorded on the roots, on failure."""
        key = (id(file.store), file.digest)
        pending = self._fetching.get(key)
        if pending is not None:
            await pending.wait()
            fd = _open_local(file.store, file.digest)
            if fd is None:
                raise pyfuse3.FUSEError(errno.EIO)  # the fetch failed: already recorded
            return fd
        done = self._fetching[key] = trio.Event()
        try:
            return await _in_thread(functools.partial(_fetch_and_open, file.store, file.digest), file.fetch_timeout)
        except ReapiError as error:
            error.within(f"fetching input blob {file.digest} on first read")  # once: shared below
            self.table.fail_readers(file, error)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            del self._fetching[key]
            done.set()


class _Ticket:
    """The result of a thread the FUSE thread may stop waiting for: whichever side comes
    second cleans up, so a descriptor opened after the deadline is closed, not leaked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None


async def _in_thread(work: Callable[[], T], timeout: float) -> T:
    """Run blocking ``work`` in a worker thread for at most ``timeout`` seconds. Raises
    what it raises (ReapiError), or Unavailable when the deadline passes first (the thread
    is left to finish on its own, bounded by the remote client's own deadlines)."""
    ticket = _Ticket()

    def run() -> None:
        try:
            value, error = work(), None
        except BaseException as caught:  # noqa: BLE001 - handed over below
            value, error = None, caught
        with ticket.lock:
            if ticket.abandoned:
                if isinstance(value, int):
                    os.close(value)
                return
            ticket.done, ticket.value, ticket.error = True, value, error

    with trio.move_on_after(timeout):
        await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    with ticket.lock:
        if not ticket.done:
            ticket.abandoned = True
            raise Unavailable(f"no answer within {timeout:g} s")
    if ticket.error is not None:
        if isinstance(ticket.error, ReapiError):
            raise ticket.error
        if isinstance(ticket.error, OSError):
            raise Internal(str(ticket.error))
        raise ticket.error
    return ticket.value


__all__ = ["CACHE_SECONDS", "INPUT_MTIME_NS", "InputFileSystem"]
