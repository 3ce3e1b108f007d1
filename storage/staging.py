"""Stagers: turn an input root (a CAS Directory) into a host path a sandbox can use.

One small interface, several strategies behind it:

* :class:`HardlinkStager` — every blob local and pinned, the tree written out by
  hardlinks from the local cache (copies where a link is impossible);
* :class:`~.fuse.stager.FuseStager` — lazy: a read-only FUSE view of the tree under a
  writable overlay per action, a blob fetched when first opened;
* :class:`~.auto_staging.AutoStager` — picks one of the two per action.

Contract of :meth:`Stager.stage`:

* accepts the input root as a :class:`~.directory.cas.CasDirectory`, an empty ``build_dir``
  to stage into (the stager may use it or a path of its own), the relative directories that
  must exist before the command starts (working directory, output parents), and the
  uid/gid that must be able to write in the tree's directories (the sandbox's);
* returns a :class:`StagedInput`, a context manager whose ``path`` is the input root as the
  command must see it; closing it releases pins and hands the tree to a background remover
  (deleting 50k files costs 0.2-0.5 s: never on the critical path);
* raises MissingBlobs naming *every* blob that is absent from the local and remote CAS,
  InvalidArgument for a hostile tree; on any error nothing is left pinned or staged. A
  lazy stager (FUSE) reads nothing before the command but the root Directory, so it
  raises here only what the root shows; what it meets later — every missing blob the
  command touched, named together in one MissingBlobs, or a hostile directory — comes from
  :meth:`StagedInput.check` after the command (the trade-off: ``storage/fuse/stager.py``).
"""

from __future__ import annotations

import abc
import logging
import os
import queue
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from reapi_worker.protos.errors import Internal, InvalidArgument, ReapiError

from .content import LocalContent, PinSet
from .digests import Digest
from .directory.cas import CasDirectory
from .flat_export import write_flat
from .parsed_trees import ParsedTrees
from .paths import RelPath
from .tree_removal import remove_tree

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Owner:
    """Who must be able to create entries in the staged directories."""

    uid: int
    gid: int


class StagedInput(abc.ABC):
    """A staged input root. ``path`` is valid until :meth:`close`; closing twice is fine.

    Called by one thread (the action's) at a time.
    """

    path: str
    #: A directory for the action's other writes (its stdout and stderr), on the same
    #: bounded space as its writable layer; None when the stager bounds nothing.
    scratch_dir: str | None = None
    #: True when every input — files too — is shown as the owner's and any change to one
    #: stays in the action's own layer (an overlay's upper layer), never in the cache: the
    #: action may ``touch``, ``chmod`` and rewrite its inputs in place, as BuildStream's
    #: local sandbox lets a build. False for hardlink staging on its own (its files are the
    #: cache's inodes, which the action may replace but never change) and for FUSE's.
    private_inputs: bool = False
    #: True when ``path`` is a read-only view of the tree alone, without the ``directories``
    #: the stager was asked for: whoever asked must put a writable layer over it and make
    #: them there (:class:`~.bounded_staging.BoundedStager` does). A FUSE view is one,
    #: so that a bounded build directory is one overlay over FUSE, not two.
    read_only_view: bool = False

    @abc.abstractmethod
    def close(self) -> None: ...

    def check(self) -> None:
        """Raise the first error the staged tree met while the command ran — a lazily
        fetched blob that could not be fetched (the reader got EIO), a file system that
        failed; missing blobs as one MissingBlobs naming every one the command met. Eager
        stagers meet none. Call it after the command, before capture."""

    def known_digest(self, parts: RelPath, st: os.stat_result) -> Digest | None:
        """The digest of the regular file at ``parts`` (relative to ``path``, whose ``lstat``
        is ``st``) if the stager knows it without reading the file — an input the command
        left alone — else None (read and hash it). Call only after the command has ended."""
        return None

    def __enter__(self) -> "StagedInput":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Stager(abc.ABC):
    """Materialise input roots. Implementations are safe to use from several threads
    (one call per action)."""

    #: True when the staged input root is a plain directory tree on the build root's file
    #: system (no mount of its own), which an idmapped mount can show as another owner's
    #: (:mod:`.bounded_staging`). An overlay cannot be idmapped (EINVAL on 6.18), nor a
    #: FUSE mount whose daemon does not ask for it.
    plain_tree: bool = False

    @abc.abstractmethod
    def stage(
        self, root: CasDirectory, build_dir: str, directories: Iterable[RelPath] = (), owner: Owner | None = None
    ) -> StagedInput: ...


class TreeRemover:
    """Deletes staged trees in a background thread.

    A tree is first renamed into ``trash_dir`` (instant, same file system) so its build
    directory name is free at once, then removed by the thread (:func:`remove_tree`:
    iterative, whatever depth the action made). Trees left in the trash by a crash are
    removed when the next remover starts. An error on one tree is logged and the thread
    goes on with the next.
    """

    def __init__(self, trash_dir: str) -> None:
        self._trash = trash_dir
        os.makedirs(trash_dir, mode=0o700, exist_ok=True)  # only the worker deletes there
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="tree-remover", daemon=True)
        self._thread.start()
        for leftover in os.listdir(trash_dir):
            self._queue.put(os.path.join(trash_dir, leftover))

    def remove(self, path: str) -> None:
        target = os.path.join(self._trash, uuid.uuid4().hex)
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return
        except OSError:
            target = path  # another file system: delete in place, still off the caller's path
        self._queue.put(target)

    def drain(self) -> None:
        """Block until every queued tree is gone (tests, shutdown)."""
        self._queue.join()

    def _run(self) -> None:
        while True:
            path = self._queue.get()
            try:
                if path is not None:
                    remove_tree(path)
            except OSError as error:  # one stubborn tree must not stop the thread
                log.warning("could not remove %s: %s", path, error)
            except Exception:  # nor a bug: log it and go on with the next tree
                log.exception("removing %s", path)
            finally:
                self._queue.task_done()


class _HardlinkedInput(StagedInput):
    def __init__(self, path: str, pins: PinSet, remover: TreeRemover) -> None:
        self.path = path
        self._pins = pins
        self._remover = remover
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._pins.release()
        finally:
            self._remover.remove(self.path)


class HardlinkStager(Stager):
    """Stage by hardlinks from the local cache: the blobs are fetched and pinned for the
    action's lifetime, then the tree is written out with one link per file.

    Why links are safe: cache files are owned by the worker (0644/0755: the owner bits alone allow writing), while the
    sandbox runs as another uid; it can replace a staged file (its directory is its own)
    but not write or chmod the shared inode. A worker that cannot run the sandbox as another
    uid must pass ``link=False`` (copies).

    Under a :class:`~.bounded_staging.BoundedStager` its tree is shown through an idmapped
    overlay, where the files are the action's own (``StagedInput.private_inputs``).

    With ``parsed``, a root is flattened once (:class:`~.parsed_trees.ParsedTrees`) and
    written out from that form (:mod:`.flat_export`): a root staged before is not parsed again.
    """

    plain_tree = True

    def __init__(
        self, store: LocalContent, remover: TreeRemover, link: bool = True, parsed: ParsedTrees | None = None
    ) -> None:
        self._store = store
        self._remover = remover
        self._link = link
        self._parsed = parsed

    def stage(
        self, root: CasDirectory, build_dir: str, directories: Iterable[RelPath] = (), owner: Owner | None = None
    ) -> StagedInput:
        pins = self._store.pin_set()
        dir_owner = None if owner is None else (owner.uid, owner.gid)
        try:
            if self._parsed is not None:
                flat = self._parsed.flat(self._store, root.digest())
                pins.add(flat.digests)
                self._store.fetch(flat.digests)
                write_flat(flat, self._store, build_dir, link=self._link, dir_owner=dir_owner)
            else:
                digests = {digest for digest, _ in root.file_digests()}
                pins.add(digests)
                self._store.fetch(digests)
                root.export_files(build_dir, can_link=self._link, dir_owner=dir_owner)
            for parts in directories:
                make_dirs(build_dir, parts, owner)
            # Private to the sandbox's uid (its owner): no other host user reads the inputs,
            # the outputs, or runs what an action leaves behind.
            os.chmod(build_dir, 0o700)
        except BaseException as error:
            pins.release()
            if os.path.lexists(build_dir):
                self._remover.remove(build_dir)
            if isinstance(error, OSError):
                raise Internal(f"staging input root into {build_dir}: {error}") from None
            if isinstance(error, ReapiError):
                raise error.within("staging input root") from None
            raise
        return _HardlinkedInput(build_dir, pins, self._remover)


def make_dirs(root: str, parts: RelPath, owner: Owner | None) -> None:
    """Create ``root/parts...`` (owned by ``owner``) without following symlinks staged from
    the input root. InvalidArgument if a component exists and is not a directory."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for part in parts:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
                if owner is not None:
                    os.chown(part, owner.uid, owner.gid, dir_fd=fd, follow_symlinks=False)
            except FileExistsError:
                pass
            try:
                next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                raise InvalidArgument(f"{'/'.join(parts)}: {part!r} in the input root is not a directory") from None
            os.close(fd)
            fd = next_fd
    finally:
        os.close(fd)
