"""The abstract ``Directory``: one tree API over a real directory or a Merkle tree in CAS.

Two backends implement it and pass one conformance suite
(``tests/unit/storage/test_directory_conformance.py``):

* :class:`~.filesystem.FileSystemDirectory` over a real directory on disk;
* :class:`~.cas.CasDirectory` over REAPI ``Directory`` protos, loaded lazily from a
  :class:`~reapi_worker.storage.content.ContentStore`, edited in memory, whose digest is
  recomputed only for the nodes a change touched.

Paths are relative POSIX strings checked by :func:`~reapi_worker.storage.paths.split_relative`
(``..``, absolute paths and NUL are refused with InvalidArgument). Intermediate
components are never followed through symlinks: a symlink inside the tree is data.

Errors (all from :mod:`reapi_worker.protos.errors`):

* ``InvalidArgument`` — a bad name or path, a symlink target the policy refuses,
  a non-canonical Directory proto, a tar member we refuse;
* ``NotFound`` — the path (or its parent) does not exist, or a component is not a directory
  (a symlink is never a directory here), or ``read_bytes`` names a non-file;
* ``AlreadyExists`` — the destination of ``rename``/``copy``/``mkdir`` exists
  (``write_bytes`` and ``symlink`` replace a non-directory entry but never a directory),
  a non-directory is in the way of ``descend(create=True)``, or ``export_files``'s
  destination is not an empty directory;
* ``FailedPrecondition`` — ``remove`` of a non-empty directory without ``recursive``;
* ``MissingBlobs`` — a blob the tree refers to is not in the store.

An operation that fails changes nothing: checks happen before the first write. (An I/O
error in the middle of a filesystem write, e.g. a full disk, can still leave part of it.)
Instances are not thread-safe; one action edits its own tree.

Symlink targets are checked against the policy at the link's position relative to the
root of the whole tree (the Directory the caller first built), also for a Directory got
from ``descend``; moving a subtree to a shallower place re-checks the links it holds.
A ``descend``-ed FileSystemDirectory names a path: after that path is renamed away the
handle no longer refers to it (a CasDirectory node moves with the rename).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from ..digests import Digest
from ..paths import SymlinkPolicy

if TYPE_CHECKING:
    from ._importing import ImportSource


class FileType(enum.Enum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"


@dataclass(frozen=True, slots=True)
class FileStat:
    """What a Directory says about one entry. Equality compares every field (generated,
    not hand-written, so no field can be forgotten).

    ``size`` is the file size (0 for directories and symlinks), ``executable`` only
    for files, ``target`` only for symlinks; ``digest`` is the file's blob digest, or for a
    directory its Directory-proto digest, or None for a symlink.
    """

    type: FileType
    size: int = 0
    executable: bool = False
    target: str | None = None
    digest: Digest | None = None


@dataclass(slots=True)
class ImportResult:
    """What :meth:`Directory.import_files` did, path by path (relative to the target),
    each list in walk order.

    ``imported`` holds every entry written or created (files, symlinks and directories
    that did not exist; directories merged into existing ones are not listed);
    ``overwritten`` the subset of ``imported`` that replaced an existing entry;
    ``ignored`` the entries left out by the filter (a directory stands for its whole
    subtree) or kept because ``overwrite`` was False.
    """

    imported: list[str] = field(default_factory=list)
    overwritten: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


# Called with each source path relative to the import root, directories included;
# False leaves it out (for a directory: with everything below it).
ImportFilter = Callable[[str], bool]


class Directory(abc.ABC):
    """A tree of directories, regular files (with an executable bit) and symlinks."""

    #: Which symlink targets this tree accepts on import / symlink().
    symlink_policy: SymlinkPolicy = SymlinkPolicy.ANY

    # -- navigation -------------------------------------------------------------------

    @abc.abstractmethod
    def descend(self, path: str, create: bool = False) -> "Directory":
        """The subdirectory at ``path`` (``""`` is self), creating missing ones if asked.
        Edits through the returned object are edits of this tree. NotFound if a component
        is missing (without ``create``) or not a directory; with ``create``, a
        non-directory in the way is AlreadyExists (as for mkdir)."""

    @abc.abstractmethod
    def stat(self, path: str) -> FileStat:
        """Describe the entry at ``path`` without following a final symlink (``""`` is
        this directory). On a filesystem tree a file's digest means hashing it and a
        directory's digest means hashing its whole subtree."""

    def exists(self, path: str) -> bool:
        from reapi_worker.protos.errors import NotFound

        try:
            self.stat(path)
        except NotFound:
            return False
        return True

    @abc.abstractmethod
    def list(self) -> list[str]:
        """Names of the entries directly in this directory, sorted."""

    @abc.abstractmethod
    def walk(self) -> Iterator[tuple[str, FileStat]]:
        """Every entry below this directory, parents before children, siblings sorted by
        name, as (relative path, stat)."""

    # -- file contents ----------------------------------------------------------------

    @abc.abstractmethod
    def read_bytes(self, path: str) -> bytes:
        """The bytes of the regular file at ``path`` (NotFound for anything else)."""

    @abc.abstractmethod
    def write_bytes(self, path: str, data: bytes, executable: bool = False) -> None:
        """Create or replace the regular file at ``path`` (its parent must exist)."""

    @abc.abstractmethod
    def write_stream(self, path: str, stream: BinaryIO, executable: bool = False) -> None:
        """Like write_bytes, from a stream read to its end (big files never sit in memory)."""

    @abc.abstractmethod
    def symlink(self, path: str, target: str) -> None:
        """Create or replace a symlink at ``path``; ``target`` is checked by the policy."""

    @abc.abstractmethod
    def mkdir(self, path: str) -> None:
        """Create the directory at ``path`` and any missing parents (no error if it exists
        as a directory; AlreadyExists if a non-directory is in the way)."""

    # -- tree edits -------------------------------------------------------------------

    @abc.abstractmethod
    def remove(self, path: str, recursive: bool = False) -> None:
        """Remove a file, symlink or (empty, unless ``recursive``) directory. The
        directory itself (``""``) cannot be removed: InvalidArgument."""

    @abc.abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Move a file, symlink or whole subtree within this tree. ``dst`` must not exist;
        its parent must. Moving a directory into itself is InvalidArgument."""

    @abc.abstractmethod
    def copy(self, src: str, dst: str) -> None:
        """Copy a file, symlink or whole subtree within this tree (same rules as rename).
        CAS trees share the blobs; filesystem trees copy bytes."""

    # -- bulk import/export -----------------------------------------------------------

    @abc.abstractmethod
    def import_files(
        self,
        source: "str | Directory",
        filter: ImportFilter | None = None,
        overwrite: bool = True,
    ) -> ImportResult:
        """Merge a local directory (path) or another Directory into this one.

        Regular files keep their bytes and executable bit, symlinks their target
        (checked by this tree's policy), empty directories are kept. An existing
        non-directory entry is replaced when ``overwrite`` (listed in ``overwritten``),
        else left alone (listed in ``ignored``). A directory never replaces a file or the
        other way round silently: that is AlreadyExists. Paths the filter rejects are
        listed in ``ignored``. Special files (sockets, devices, fifos) are refused with
        InvalidArgument naming the path. If anything is refused, nothing is imported.
        """

    @abc.abstractmethod
    def export_files(self, dest: str, can_link: bool = True) -> None:
        """Write this tree to the local directory ``dest`` (created if absent; must be
        empty if present). With ``can_link`` a CAS tree hardlinks its files from the
        local cache and copies only where a link is impossible (another file system,
        link-count limit).

        Exported files are mode 0644, or 0755 if executable, whether linked from the
        cache or copied, so a staged input is never writable through its mode; a
        filesystem tree always copies. Directories are created 0755 (less the umask).
        ``dest`` is opened without following a symlink."""

    # -- internal part: used between backends, not by callers ------------------------

    def _import_source(self) -> "ImportSource":
        """This tree as the source of another tree's ``import_files``.

        The default reads through the public API (``walk`` and ``read_bytes``); backends
        override it with something cheaper.
        """
        from ._importing import DirectorySource

        return DirectorySource(self)

    @abc.abstractmethod
    def digest(self) -> Digest:
        """The digest of this directory's canonical REAPI Directory proto."""
