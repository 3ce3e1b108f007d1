"""``BoundedStager``: every action writes into a size-limited file system of its own.

Why: a worker must tell "the action ran out of space" (its result) from "the worker's disk
ran out of space" (never a result: worker/faults.py), exactly. Sampling the shared disk's
free space before and after a run cannot: a burst between two samples, or space freed
before the end, goes unseen, and an output cut short by ENOSPC would be reported and cached
as a normal result. So the action is never let near the shared disk: everything it can
write — its changes to the input root and its stdout/stderr — goes to a tmpfs mounted for
it alone, of ``bound_bytes``. Then:

* the shared disk (cache, build root) holds only what the worker itself writes; an ENOSPC
  there raises in the worker's own code and the lease is UNAVAILABLE;
* an ENOSPC the action meets is its own bound. The kernel enforces it (a write past the
  size fails), and nothing else writes to that file system, so after the run its free
  space says exactly whether the action went past its bound: :meth:`check` raises
  :class:`BoundExceeded` naming it when the action used more than ``bound_bytes`` or every
  inode. The tmpfs is mounted one page larger than the bound, so an action that writes
  exactly ``bound_bytes`` is within it; one that met ENOSPC has filled it to the last page.
  (An action that fills it, then deletes what it wrote and exits as it likes, gets its own
  result: with that bound it would do the same on any worker.) Its stdout and stderr share
  the bound, so what it writes to them after hitting it is lost; the status says how much
  it had used.

Layout of one action's build directory::

    <build_dir>/lower        the wrapped stager's build directory (hardlinks, or FUSE's)
    <build_dir>/mapped       mount point of lower's idmapped clone (hardlinks only;
                             detached once the overlay holds it)
    <build_dir>/space        the tmpfs: upper/ and work/ of the overlay, streams/
    <build_dir>/root         overlayfs: lower read-only below, space/upper taking every
                             change — StagedInput.path, what the sandbox binds

Inputs the action owns: a wrapped stager that stages a plain tree (``Stager.plain_tree``:
hardlink staging, files root's) stages it all root's (no owner), and the overlay's lower
layer is an idmapped clone of it showing root as the action's uid (:mod:`.idmapped_mounts`).
So the action may ``touch``, ``chmod`` and, once it has a write bit, rewrite an input file
in place, as BuildStream's local sandbox lets a build: the kernel's permission check passes
on the overlay's inode, overlayfs copies the file up into the tmpfs (counted against the
bound) and the hardlinked CAS blob never changes. Mounting the clone costs ~0.1 ms. Cached
staging brings its own (idmapped) overlay and FUSE its read-only view, whose files its
daemon shows as the action's; neither can be idmapped (an overlay or a FUSE mount:
EINVAL), and neither needs to be: their tree is used as it is.

Why tmpfs and not a quota on the cache's disk: hardlinked inputs must stay on the cache's
file system, and a project quota (xfs, or ext4 with the ``project`` feature) can follow a
directory only with a file system prepared for it, and ``link(2)`` into a quota'd directory
fails with EXDEV; this machine's ext4 has neither. An overlay upper layer on a per-action
tmpfs needs root only. Its pages are RAM (or swap), charged to the writer's memory
cgroup, like a ``/tmp`` tmpfs: an action's memory bound covers its build directory too.
Measured here (30 runs, /dev/shm, median): tmpfs + overlay mounted in 0.06 ms, both
unmounted in 0.2 ms; and removal is free (the unmount drops every file the action made).
Deleting lower is the wrapped stager's business, as before.

Overlay options as in storage/fuse/kernel_mounts.py. A wrapped stager that gives a
read-only view (FUSE: :attr:`~.staging.StagedInput.read_only_view`) gets this overlay
straight on it, and the directories the action needs are made here, in the tmpfs: FUSE
with kernel passthrough counts as one file system in the kernel's stack of at most two,
so an overlay over FUSE staging's own overlay would be refused.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable

from reapi_worker.host import format_bytes
from reapi_worker.protos.errors import BoundExceeded, Internal, ReapiError

from .digests import Digest
from .directory.cas import CasDirectory
from .fuse import kernel_mounts
from .idmapped_mounts import OwnerMappings, attach_idmapped
from .paths import RelPath
from .staging import Owner, StagedInput, Stager, make_dirs

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE")


class BoundedStager(Stager):
    """Wrap ``inner`` so that each staged input root is writable only through an overlay
    on a tmpfs of ``bound_bytes`` (module docstring). Needs root; thread-safe as ``inner``.
    ``mappings``: the user namespaces of idmapped lower layers (made as needed; closed by
    :meth:`close`)."""

    def __init__(self, inner: Stager, bound_bytes: int, mappings: OwnerMappings | None = None) -> None:
        if bound_bytes <= 0:
            raise Internal(f"a build directory bound must be positive, not {bound_bytes}")
        self._inner = inner
        self.bound_bytes = bound_bytes
        self._mappings = mappings or OwnerMappings()
        # A plain tree of root's files is shown as the owner's (idmapped); an inner
        # overlay keeps what it shows (module docstring).
        self._mapped = inner.plain_tree

    def close(self) -> None:
        self._mappings.close()

    def stage(
        self, root: CasDirectory, build_dir: str, directories: Iterable[RelPath] = (), owner: Owner | None = None
    ) -> StagedInput:
        kernel_mounts.check_mountable_path(build_dir, "build directory")
        os.mkdir(build_dir, 0o700)
        bounded = _BoundedInput(build_dir, self.bound_bytes)
        try:
            # Private to the sandbox's uid, which must pass through it to the overlay: no
            # other uid reaches the inputs, the outputs, or anything the action left.
            if owner is not None:
                os.chown(build_dir, owner.uid, owner.gid)
            # The wrapped stager's errors carry their own context. A tree whose files are
            # root's is staged root's throughout and shown as the owner's (idmapped).
            inner_owner = None if self._mapped else owner
            bounded.lower = self._inner.stage(root, os.path.join(build_dir, "lower"), directories, inner_owner)
            bounded.private_inputs = self._mapped or bounded.lower.private_inputs
            userns = None
            if self._mapped:
                ids = (owner.uid, owner.gid) if owner is not None else (os.geteuid(), os.getegid())
                userns = self._mappings.userns_fd(*ids)
            try:
                bounded.mount(userns)
                if bounded.lower.read_only_view:  # the directories are ours to make
                    for parts in directories:
                        make_dirs(bounded.path, parts, owner)
            except OSError as error:
                raise Internal(f"staging input root into {build_dir}: {error}") from error
            except ReapiError as error:
                raise error.within("staging input root") from None
        except BaseException:
            bounded.close()
            raise
        return bounded


class _BoundedInput(StagedInput):
    """The overlay of one action. ``close`` unmounts the overlay and the tmpfs (which drops
    everything the action wrote), closes the wrapped input, removes the empty directories."""

    def __init__(self, build_dir: str, bound_bytes: int) -> None:
        self._build_dir = build_dir
        self._bound = bound_bytes
        self._space = os.path.join(build_dir, "space")
        self._upper = os.path.join(self._space, "upper")
        self.path = os.path.join(build_dir, "root")
        self.scratch_dir: str | None = None
        self.lower: StagedInput | None = None
        self._mounts: list[str] = []  # innermost last
        self._closed = False

    def mount(self, userns: int | None) -> None:
        """``userns``: show the lower tree through an idmapped clone with its mapping."""
        assert self.lower is not None
        os.mkdir(self._space, 0o755)
        os.mkdir(self.path, 0o755)
        # One page over the bound: writing exactly bound_bytes fits (see check).
        kernel_mounts.mount_tmpfs(self._space, self._bound + _PAGE)
        self._mounts.append(self._space)
        work = os.path.join(self._space, "work")
        streams = os.path.join(self._space, "streams")
        for directory in (self._upper, work, streams):
            os.mkdir(directory, 0o700)
        lower = self.lower.path
        if userns is not None:
            lower = os.path.join(self._build_dir, "mapped")
            os.mkdir(lower, 0o700)
            attach_idmapped(self.lower.path, lower, userns)
        try:
            # The upper dir's root is the merged root's inode: give it the lower root's
            # owner (as the action sees it) and mode, so the sandbox may write where the
            # wrapped stager let it.
            st = os.stat(lower)
            os.chown(self._upper, st.st_uid, st.st_gid)
            os.chmod(self._upper, stat.S_IMODE(st.st_mode))
            kernel_mounts.mount_overlay(lower, self._upper, work, self.path)
            self._mounts.append(self.path)
        finally:
            if userns is not None:  # the overlay holds its layer; the mount point goes
                kernel_mounts.detach(lower)
                os.rmdir(lower)
        self.scratch_dir = streams

    def check(self) -> None:
        if self.lower is not None:
            self.lower.check()
        if self._space not in self._mounts:
            return
        st = os.statvfs(self._space)
        if st.f_bavail * st.f_frsize < _PAGE or st.f_favail == 0:
            used = (st.f_blocks - st.f_bavail) * st.f_frsize
            raise BoundExceeded(
                f"the action went past its build directory bound of {format_bytes(self._bound, exact=True)} "
                f"(build_dir_size: files it wrote, stdout and stderr; {format_bytes(used)} used, "
                f"{st.f_files - st.f_favail} inodes)"
            )

    def known_digest(self, parts: RelPath, st: os.stat_result) -> Digest | None:
        """Only an entry the action did not touch (absent from the upper layer: with
        ``redirect_dir=off`` it is the lower entry at the same path) can be known."""
        if self.lower is None or not parts:
            return None
        if not kernel_mounts.untouched_in_overlay(self._upper, parts):
            return None
        return self.lower.known_digest(parts, st)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        stuck = not kernel_mounts.unmount_before_removal(reversed(self._mounts), self._build_dir)
        try:
            if self.lower is not None:
                self.lower.close()
        finally:
            if not stuck:
                for path in (self.path, self._space, self._build_dir):
                    try:
                        os.rmdir(path)
                    except FileNotFoundError:
                        pass
                    except OSError as error:
                        log.warning("removing %s: %s", path, error)
