"""Staged inputs the command may change in place: the subtrees a client marked writable.

Both stagers hand the command input files it cannot write: hardlinks of the cache's
read-only inodes, or files of the read-only FUSE view, owned by the worker while the sandbox
runs as another uid (see :mod:`reapi_worker.sandbox.identity`). In a directory the command
owns it may still *replace* them, which is all a Bazel action does. BuildStream asks for
more: it marks its build directory and install root ``SubtreeReadOnly=false`` and builds
there the way its local sandbox lets it, on sources that are the command's own files —
``chmod +x configure``, ``echo >> file``, ``touch``, patching in place. So below an explicit
``false`` marking every regular input file becomes a private copy owned by the sandbox uid
(same bytes, mtime and executable bit; mode 0644 or 0755, as BuildStream's sandbox shows
them). The cache is never written: a hardlink is replaced, not opened for writing, and with
FUSE the copy lands in the action's own overlay.

Unmarked trees are not copied (REAPI does not promise writable inputs, and copying a
Bazel tree, or a BuildStream script's whole sysroot, would cost more than staging it).
Where the stager puts an overlay over the inputs (``StagedInput.private_inputs``: cached
staging, hardlink staging under a bound) they are the action's own already, through an
idmapped lower layer (:mod:`.idmapped_mounts`): ``touch`` and ``chmod`` work and overlayfs
keeps the change private; the CAS's modes are 0644/0755, like these copies. So below a
``false`` marking a copy adds nothing there, and the executor skips it for such a stager.
FUSE staging's daemon shows input files as the action's own too, 0644/0755. Elsewhere
(hardlink staging without an overlay) unmarked inputs stay unwritable: see the README's
staging notes. A deeper ``true`` marking inside a writable subtree stays as staged: it is
read-only anyway.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Collection, Iterable

from reapi_worker.protos.errors import Internal

from .content import BLOB_MODES
from .paths import RelPath
from .staging import Owner


def copy_writable_inputs(
    root: str, writable: Iterable[RelPath], read_only: Collection[RelPath] = (), owner: Owner | None = None
) -> int:
    """Replace every regular file below each ``writable`` subtree of the staged input root
    at ``root`` (not descending into a ``read_only`` one) by a private copy owned by
    ``owner`` (the worker itself if None). Returns how many files were copied.

    Call after staging and before the command runs: the tree is the worker's own then, so
    walking it by path follows no symlink the command made (symlinks are never followed
    and never copied). A writable subtree that is absent is skipped. Raises Internal with
    the path on an I/O error.
    """
    copied = 0
    read_only = frozenset(read_only)
    for top in writable:
        top_path = os.path.join(root, *top)
        if not os.path.isdir(top_path) or os.path.islink(top_path):
            continue
        try:
            for directory, subdirs, files in os.walk(top_path, onerror=_raise):
                relative = tuple(part for part in os.path.relpath(directory, root).split(os.sep) if part != ".")
                subdirs[:] = [d for d in subdirs if relative + (d,) not in read_only]
                for name in files:
                    copied += _make_private(directory, name, owner)
        except OSError as error:
            raise Internal(f"making the inputs below {top_path} writable: {error}") from None
    return copied


def _raise(error: OSError) -> None:
    raise error


def _make_private(directory: str, name: str, owner: Owner | None) -> int:
    path = os.path.join(directory, name)
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        return 0
    fd, temporary = tempfile.mkstemp(prefix=".reapi-writable-", dir=directory)
    try:
        with open(path, "rb") as source, os.fdopen(fd, "wb", closefd=False) as target:
            shutil.copyfileobj(source, target, 1 << 20)
        os.fchmod(fd, BLOB_MODES[bool(st.st_mode & stat.S_IXUSR)])
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.close(fd)
        fd = -1
        os.rename(temporary, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    return 1
