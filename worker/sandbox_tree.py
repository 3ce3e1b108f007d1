"""What the sandbox needs of an action's input root, read from its CAS tree before staging.

Two things, both the client's doing and so both reported as INVALID_ARGUMENT naming the
path, never left for bubblewrap to trip over as a sandbox set-up failure:

* **Mount points.** In CHROOT mode the input root is ``/`` and the sandbox mounts a fresh
  ``/proc``, a minimal ``/dev``, a tmpfs ``/tmp`` and the operator's binds over it.
  bubblewrap follows a symlink there (a loop or a dangling link fails, an absolute one
  points anywhere in the root) and cannot mount a directory over a file, so every existing
  component of those paths must be a directory; absent ones are created. (The leaf of an
  operator bind may be a regular file, for a bound file.)
* **Read-only subtrees.** ``SubtreeReadOnly`` markings
  (:mod:`reapi_worker.storage.read_only_markings`) become the request's
  :class:`~reapi_worker.sandbox.request.SubtreeAccess` entries.

Both read only the tree: nothing here touches the disk.
"""

from __future__ import annotations

from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.sandbox.request import CHROOT_MOUNT_POINTS, Bind, RootMode, SubtreeAccess, mount_points
from reapi_worker.storage.directory.cas import CasDirectory, FileEntry, LinkEntry
from reapi_worker.storage.paths import join
from reapi_worker.storage.read_only_markings import MarkingsMemo, read_only_changes, read_only_markings


class InputRootRules:
    """Checks an input root against the sandbox it will become and reads its markings.

    ``extra_ro_binds`` are the operator's binds (their targets are mount points in CHROOT
    mode). Thread-safe: the markings memo is shared by every action.
    """

    def __init__(self, extra_ro_binds: tuple[Bind, ...] = (), memo: MarkingsMemo | None = None) -> None:
        self._binds = extra_ro_binds
        self._memo = memo if memo is not None else MarkingsMemo()

    def subtree_access(self, root: CasDirectory, root_mode: RootMode) -> tuple[SubtreeAccess, ...]:
        """Check ``root``'s mount points for ``root_mode`` and return its read-only subtrees.
        Raises InvalidArgument naming the offending path or marking; MissingBlobs if a
        Directory of the tree is absent. Call before staging (the tree is not shared yet)."""
        check_mount_points(root, root_mode, self._binds)
        changes = read_only_changes(read_only_markings(root, self._memo))
        return tuple(SubtreeAccess("/".join(path), read_only) for path, read_only in changes)


def check_mount_points(root: CasDirectory, root_mode: RootMode, binds: tuple[Bind, ...] = ()) -> None:
    """InvalidArgument if a path the sandbox of ``root_mode`` mounts over is, in ``root``'s
    tree, anything but a directory (or, at a bind's leaf, a regular file); see the module
    docstring. Loads only the nodes along those paths."""
    for point in mount_points(root_mode, binds):
        parts = tuple(point.split("/"))
        node = root
        for depth, name in enumerate(parts, start=1):
            entry = node.entries().get(name)
            if entry is None:
                break  # bubblewrap creates the rest
            if isinstance(entry, CasDirectory):
                node = entry
                continue
            leaf = depth == len(parts)
            if leaf and type(entry) is FileEntry and point not in CHROOT_MOUNT_POINTS:
                break
            raise InvalidArgument(
                f"input root entry {join(parts[:depth])!r} is {_kind(entry)}, but the sandbox "
                f"mounts /{point} there (chroot root mode): it must be a directory or absent"
            )


def _kind(entry: object) -> str:
    if type(entry) is LinkEntry:
        return f"a symlink (to {entry.target!r})"  # type: ignore[attr-defined]
    return "a regular file"
