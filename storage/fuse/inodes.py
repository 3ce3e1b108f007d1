"""The inode table of the input file system: which number means which entry of which tree.

Numbering, and why:

* ``ROOT_INODE`` (1) is the mount's top directory; each registered action root is a
  directory in it, named by the root's token.
* Directories and symlinks get a number per *action root* and path, from a counter that
  never repeats. An action's tree is its own (no ``..`` confusion between trees that share
  a subtree, since a kernel directory inode has one parent), and all of its numbers are
  dropped at once when the root is removed.
* Files get one number per *(store, digest, executable, owner)*, shared by every root of
  that owner and path that holds that blob. Contents are immutable, so sharing is safe,
  and it lets the kernel page cache of a blob serve every action that reads it (with
  passthrough the page cache is the backing file's, shared by all). The owner is the
  root's (its ``dir_uid``/``dir_gid``, the action's uid): an input file is the action's
  own, as in a local build's staged tree, so it may ``chmod``, ``touch`` or rewrite it —
  the overlay above copies it up first, and the read-only mount never changes. A file inode lives while the
  kernel knows it (its lookup count, decremented by ``forget``), so its number is stable
  for as long as anything can observe it.

The table also holds the open files (:mod:`.open_files`: a handle per ``open``, one
descriptor per blob shared by its handles and closed with the last ``release``, a quota of
handles per action; descriptors are bounded by what actions hold open, not by what the
kernel remembers, and an open descriptor keeps the bytes readable even if the cache evicts
the file meanwhile) and, per file inode, the roots that looked it up, so that
a failed fetch can be reported to the actions that could have read it.

Thread-safety: every method must be called with :attr:`InodeTable.lock` held. The FUSE
thread holds it for each request; executor threads hold it to add and remove roots.
Nothing here blocks or reads the store except :meth:`InodeTable.lookup`, which visits a
directory only when :meth:`~..directory.cas.CasDirectory.loaded_entries` says it is loaded
(the caller loads it first otherwise).
"""

from __future__ import annotations

import itertools
import os
import stat
import threading
import weakref
from dataclasses import dataclass, field

from reapi_worker.protos.errors import MissingBlobs, ReapiError

from ..content import BLOB_MODES, LocalContent
from ..digests import Digest
from ..directory.cas import CasDirectory, FileEntry, LinkEntry
from .open_files import Opener, OpenFiles

ROOT_INODE = 1


class NotLoaded(Exception):
    """The directory must be loaded (read from the store) before the request can be
    answered; the caller loads ``node`` outside the lock and asks again."""

    def __init__(self, node: CasDirectory, root: "ActionRoot") -> None:
        super().__init__("directory not loaded")
        self.node = node
        self.root = root


@dataclass(eq=False, slots=True, weakref_slot=True)
class ActionRoot:
    """One action's input tree as registered with the mount.

    ``failure`` is the first error met while serving it (a blob that could not be fetched),
    reported by the stager after the command has run — except that missing blobs add up:
    while the first error is a MissingBlobs, it names every blob (file or Directory) this
    root met missing, since a client re-uploads exactly the digests listed.
    """

    token: str
    tree: CasDirectory
    store: LocalContent
    dir_uid: int
    dir_gid: int
    fetch_timeout: float
    inode: int = 0
    failure: ReapiError | None = None
    inodes: list[int] = field(default_factory=list)
    missing: set[Digest] = field(default_factory=set)
    pushed_bytes: int = 0  # offered to the kernel backend's prefetcher (kernel_prefetch.py)
    removed: bool = False  # no longer served (what is still queued for it is dropped)

    def fail(self, error: ReapiError) -> None:
        if isinstance(error, MissingBlobs):
            self.missing.update(error.digests)
            if self.failure is None or isinstance(self.failure, MissingBlobs):
                self.failure = MissingBlobs(self.missing, "reading inputs (staged lazily)")
        elif self.failure is None:
            self.failure = error


@dataclass(eq=False, slots=True)
class DirInode:
    ino: int
    node: CasDirectory
    root: ActionRoot
    names: list[str] | None = None  # sorted, for readdir; made on first readdir
    children: dict[str, int] = field(default_factory=dict)  # name -> inode of dirs and links


@dataclass(eq=False, slots=True)
class LinkInode:
    ino: int
    target: bytes
    root: ActionRoot


@dataclass(eq=False, slots=True)
class FileInode:
    ino: int
    store: LocalContent
    digest: Digest
    executable: bool
    fetch_timeout: float
    uid: int
    gid: int
    nlookup: int = 0
    # The roots that looked it up, weakly (a WeakSet per inode cost ~2 µs of each listed
    # file's ~5: see live_roots).
    roots: "list[weakref.ref[ActionRoot]]" = field(default_factory=list)
    offered: bool = False  # queued to be pushed into the kernel's page cache: not again
    read: bool = False  # a READ put it into the kernel's page cache: a push is not needed

    def add_root(self, root: ActionRoot) -> None:
        ref = weakref.ref(root)  # CPython hands out the same ref while one lives
        roots = self.roots
        if roots and roots[-1] is ref:
            return
        if ref not in roots:
            if len(roots) >= 8:
                roots[:] = [alive for alive in roots if alive() is not None]
            roots.append(ref)

    def live_roots(self) -> list[ActionRoot]:
        """The roots that looked it up and are still registered somewhere."""
        return [root for root in (ref() for ref in self.roots) if root is not None]


def file_links(inode: object) -> int:
    """The link count to report for ``inode``: 2 for a file, 1 for anything else ("count
    unknown", as btrfs; find copes). A file inode is shared by every path of its blob, and
    overlayfs (index=off) shares one overlay inode between the paths of a lower inode whose
    link count is 1: copying one path up for a write would then show the change at every
    other path of the same blob (checked on 6.18). A count above 1 tells it the paths are
    hardlinks, which a copy-up separates — two paths stay two files, as in a local build."""
    return 2 if type(inode) is FileInode else 1


Inode = DirInode | LinkInode | FileInode


@dataclass(frozen=True, slots=True)
class Attributes:
    """What both FUSE backends report for an inode (each packs it its own way)."""

    size: int
    mode: int
    nlink: int
    uid: int
    gid: int


def attributes(inode: Inode | None, top_uid: int, top_gid: int) -> Attributes:
    """The attributes of ``inode``; ``None`` is the mount's top directory, owned by
    ``top_uid``/``top_gid`` and open to them only (overlayfs reads below as its mounter).
    Files are owned by their root's uid and moded as the local cache stores blobs
    (:data:`~..content.BLOB_MODES`); directories and symlinks by their root's owner."""
    if type(inode) is FileInode:
        return Attributes(inode.digest.size_bytes, stat.S_IFREG | BLOB_MODES[inode.executable], file_links(inode),
                          inode.uid, inode.gid)
    if type(inode) is LinkInode:
        return Attributes(len(inode.target), stat.S_IFLNK | 0o777, 1, inode.root.dir_uid, inode.root.dir_gid)
    if type(inode) is DirInode:
        return Attributes(0, stat.S_IFDIR | 0o755, 1, inode.root.dir_uid, inode.root.dir_gid)
    return Attributes(0, stat.S_IFDIR | 0o700, 1, top_uid, top_gid)


class InodeTable:
    """Numbers and state of every inode the kernel may ask about (see the module docstring)."""

    def __init__(self, open_files_per_action: int | None = None) -> None:
        self.lock = threading.Lock()
        self._next = itertools.count(ROOT_INODE + 1)
        self._inodes: dict[int, Inode] = {}
        self._roots: dict[str, ActionRoot] = {}
        # Keyed by the digest's hash string, not the Digest: a str caches its hash, a
        # dataclass recomputes it in Python on every lookup (one per listed file).
        self._files: dict[tuple[LocalContent, str, int, bool, int, int], FileInode] = {}
        self.open_files = OpenFiles(open_files_per_action)
        self._opened: dict[LocalContent, set[Digest]] = {}  # blobs read since last taken

    # -- roots (executor threads) ---------------------------------------------------------

    def add_root(self, root: ActionRoot) -> None:
        root.inode = next(self._next)
        self._roots[root.token] = root
        self._inodes[root.inode] = DirInode(root.inode, root.tree, root)
        root.inodes.append(root.inode)

    def remove_root(self, token: str) -> ActionRoot | None:
        """Forget a root and its directory and symlink inodes at once; its file inodes go
        when the kernel forgets them."""
        root = self._roots.pop(token, None)
        if root is not None:
            root.removed = True
            for ino in root.inodes:
                self._inodes.pop(ino, None)
            root.inodes.clear()
        return root

    def roots(self) -> list[ActionRoot]:
        return list(self._roots.values())

    def fail_roots(self, error: ReapiError) -> None:
        """Record ``error`` on every registered root (an error that cannot be pinned on one)."""
        with self.lock:
            for root in self._roots.values():
                root.fail(error)

    def fail_readers(self, file: FileInode, error: ReapiError) -> None:
        """Record ``error`` on every live root that looked ``file`` up (its blob failed)."""
        with self.lock:
            for root in file.live_roots():
                root.fail(error)

    # -- requests (the FUSE thread) -------------------------------------------------------

    def get(self, ino: int) -> Inode | None:
        return self._inodes.get(ino)

    def lookup(self, parent: int, name: str) -> Inode | None:
        """The inode for ``name`` in directory ``parent`` (None: no such entry), counting one
        kernel lookup for a file. Raises KeyError for an unknown (stale) parent, NotADirectory
        for a parent that is not a directory, NotLoaded when the parent must be read first."""
        if parent == ROOT_INODE:
            root = self._roots.get(name)
            return None if root is None else self._inodes.get(root.inode)
        directory = self._inodes[parent]
        if not isinstance(directory, DirInode):
            raise NotADirectoryError(name)
        entries = directory.node.loaded_entries()
        if entries is None:
            raise NotLoaded(directory.node, directory.root)
        entry = entries.get(name)
        if entry is None:
            return None
        return self.child(directory, name, entry)

    def child(self, directory: DirInode, name: str, entry: "FileEntry | LinkEntry | CasDirectory") -> Inode:
        """The inode of ``entry``, found at ``name`` in the loaded ``directory`` (what
        :meth:`lookup` does once it has the entry; a listing calls it per entry)."""
        if type(entry) is FileEntry:
            return self._file(entry, directory.root)
        ino = directory.children.get(name)
        if ino is not None:
            return self._inodes[ino]
        root = directory.root
        made: Inode
        if type(entry) is LinkEntry:
            made = LinkInode(next(self._next), os.fsencode(entry.target), root)
        else:
            assert isinstance(entry, CasDirectory)
            made = DirInode(next(self._next), entry, root)
        self._inodes[made.ino] = made
        directory.children[name] = made.ino
        root.inodes.append(made.ino)
        return made

    def names(self, directory: DirInode) -> list[str]:
        """The sorted entry names of a loaded directory (NotLoaded otherwise)."""
        if directory.names is None:
            entries = directory.node.loaded_entries()
            if entries is None:
                raise NotLoaded(directory.node, directory.root)
            directory.names = sorted(entries)
        return directory.names

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped ``count`` lookups of ``ino``: a file inode whose count reaches
        zero is gone. Directory and symlink inodes live as long as their root, whatever the
        kernel says."""
        inode = self._inodes.get(ino)
        if type(inode) is not FileInode:
            return
        inode.nlookup -= count
        if inode.nlookup <= 0:
            del self._inodes[ino]
            digest = inode.digest
            del self._files[(inode.store, digest.hash, digest.size_bytes, inode.executable, inode.uid, inode.gid)]

    def share_handle(self, file: FileInode, opener: Opener) -> int | None:
        """A handle on ``file``'s blob if a descriptor of it is open, else None (open one and
        :meth:`add_handle` it). Raises QuotaExceeded when ``opener`` holds its quota."""
        handle = self.open_files.share((file.store, file.digest), opener)
        if handle is not None:
            self._opened.setdefault(file.store, set()).add(file.digest)
        return handle

    def add_handle(self, fd: int, file: FileInode, opener: Opener) -> int:
        """Register a descriptor of ``file``'s blob just opened; returns its handle (the
        table now owns ``fd``). Raises QuotaExceeded (``fd`` closed)."""
        handle = self.open_files.add((file.store, file.digest), fd, opener)
        self._opened.setdefault(file.store, set()).add(file.digest)
        return handle

    def note_read(self, file: FileInode) -> None:
        """Record a use of ``file`` that no open announced (the page-cache mode, where the
        kernel sends no OPEN: a lookup, a listing, a READ)."""
        self._opened.setdefault(file.store, set()).add(file.digest)

    def note_reads(self, store: LocalContent, files: list[FileInode]) -> None:
        """:meth:`note_read` for many files of ``store``."""
        self._opened.setdefault(store, set()).update(file.digest for file in files)

    def take_opened(self, store: LocalContent) -> set[Digest]:
        """The blobs of ``store`` opened since the last call (to record their use in the
        cache's LRU, which reads through FUSE do not)."""
        return self._opened.pop(store, set())

    def descriptor(self, handle: int) -> int | None:
        return self.open_files.descriptor(handle)

    def close_handle(self, handle: int) -> None:
        self.open_files.release(handle)

    def open_handles(self) -> int:
        return self.open_files.handles

    def close_all(self) -> None:
        """Drop everything (the mount is gone): close every descriptor."""
        self.open_files.close_all()
        self._inodes.clear()
        self._files.clear()
        self._roots.clear()
        self._opened.clear()

    def _file(self, entry: FileEntry, root: ActionRoot) -> FileInode:
        digest = entry.digest
        key = (root.store, digest.hash, digest.size_bytes, entry.executable, root.dir_uid, root.dir_gid)
        inode = self._files.get(key)
        if inode is None:
            inode = FileInode(next(self._next), root.store, entry.digest, entry.executable, root.fetch_timeout,
                              root.dir_uid, root.dir_gid)
            self._files[key] = inode
            self._inodes[inode.ino] = inode
        inode.nlookup += 1
        inode.add_root(root)
        return inode
