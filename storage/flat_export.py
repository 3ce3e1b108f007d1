"""Write a :class:`~.parsed_trees.FlatTree` out by hardlinks from a local store: hardlink
staging of a root whose parsed, flattened form is already known.

Why not :meth:`CasDirectory.export_files`: it walks (and on first visit parses) every node
of the tree it is given, and the executor hands each action a fresh, unparsed tree — so a
root staged a hundred times was parsed a hundred times (~75 ms of a 10,000-file stage, as
much as the links themselves; ``bench/bench_tree_cache.py``, ``hardlink: seen``). A flat
tree is parsed once per root, then this is a loop of mkdir and link.

The same rules as that exporter: a file is a hardlink of the store's 0644/0755 inode where
the stager allows links, a copy of exactly that mode where it does not or where a link is
impossible (another file system, the inode's link limit, a file system that forbids
links); directories are 0755, owned by ``dir_owner`` when given. Paths are joined as
strings: every name was checked when its Directory was parsed, and every directory is
created here, in an empty destination nothing else writes to before the command starts.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from reapi_worker.protos.errors import from_os_error

from .content import LocalContent
from .digests import Digest
from .directory import _local
from .parsed_trees import FlatTree

# errno values where a hardlink is impossible but a copy will do (as in the CAS exporter).
_LINK_FALLBACK = frozenset((errno.EXDEV, errno.EMLINK, errno.EPERM))


def write_flat(
    tree: FlatTree, store: LocalContent, dest: str, *, link: bool = True, dir_owner: tuple[int, int] | None = None
) -> None:
    """Write ``tree`` into ``dest`` (created; it must not exist or be empty). Every blob
    must be local and pinned. OS errors are raised as the project's (``from_os_error``)."""
    out = _local.empty_dest(dest)
    try:
        if dir_owner is not None:
            os.fchown(out, *dir_owner)
    finally:
        os.close(out)
    object_path: Callable[[Digest], str] | None = getattr(store, "object_path", None)
    variants: dict[tuple[Digest, bool], str] = {}
    paths = [dest]
    path = dest
    try:
        for parts in tree.dirs:
            path = dest + "/" + "/".join(parts)
            os.mkdir(path, 0o755)
            if dir_owner is not None:
                os.chown(path, *dir_owner, follow_symlinks=False)
            paths.append(path)
        for index, name, digest, executable in tree.files:
            path = paths[index] + "/" + name
            if link:
                if not executable and object_path is not None:
                    source = object_path(digest)  # string formatting only
                else:
                    source = variants.get((digest, executable)) or variants.setdefault(
                        (digest, executable), store.path(digest, executable))
                try:
                    os.link(source, path, follow_symlinks=False)
                    continue
                except OSError as err:
                    if err.errno not in _LINK_FALLBACK:
                        raise
                    link = err.errno != errno.EXDEV  # the whole destination is elsewhere
            _copy(store, digest, executable, path)
        for index, name, target in tree.links:
            path = paths[index] + "/" + name
            os.symlink(target, path)
    except OSError as err:
        raise from_os_error(err, f"exporting {path}") from None


def _copy(store: LocalContent, digest: Digest, executable: bool, path: str) -> None:
    parent, name = os.path.split(path)
    dir_fd = os.open(parent, _local.DIR_FLAGS)
    try:
        out = _local.create_file(dir_fd, name, _local.EXPORT_MODES[executable])
    finally:
        os.close(dir_fd)
    try:
        src = os.open(store.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _local.copy_fd(src, out)
        finally:
            os.close(src)
    finally:
        os.close(out)
