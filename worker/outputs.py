"""Capture an action's outputs into CAS and describe them in an ActionResult.

The build directory was written by an untrusted command, so this module never follows
a symlink: every component is opened relative to its parent's descriptor with
``O_NOFOLLOW``, symlinks are recorded as symlinks, and special files are left out.
It runs after the sandbox has ended, so nothing changes the tree under it.

REAPI rules followed (v2.1 with the v2.0 fields):
* ``output_paths``: a file goes to ``output_files``, a directory to ``output_directories``
  (as a ``Tree``), a symlink to ``output_symlinks``;
* legacy ``output_files`` / ``output_directories``: symlinks go to
  ``output_file_symlinks`` / ``output_directory_symlinks``; a directory listed as a file
  (or the other way round) is FAILED_PRECONDITION;
* a missing output is simply absent;
* ``output_node_properties`` ``mtime`` / ``unix_mode`` are recorded when asked, on output
  files and on the file nodes inside output trees.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import FailedPrecondition, Internal
from reapi_worker.storage.content import ContentStore
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.paths import RelPath

from .action import ActionSpec, OutputKind, OutputSpec

#: Asks the stager for the digest of a file it knows without reading it (an unmodified
#: input): (components below the input root, its lstat) -> digest or None.
KnownDigest = Callable[[RelPath, os.stat_result], "Digest | None"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(slots=True)
class CapturedOutputs:
    """What capture produced: the ActionResult fields and every blob they refer to."""

    result: re_pb2.ActionResult = field(default_factory=re_pb2.ActionResult)
    blobs: set[Digest] = field(default_factory=set)


def capture_outputs(
    root: str, spec: ActionSpec, store: ContentStore, known: KnownDigest | None = None
) -> CapturedOutputs:
    """Store every output of ``spec`` found under the host directory ``root`` (the input
    root as the command saw it) into ``store`` and describe them.

    ``known``, if given, is asked first for each regular file: a digest it returns is used
    as is (the bytes are neither read nor stored: they already are, as an input), so that
    an output which is an unmodified input costs no copy.

    Raises FailedPrecondition for an output of the wrong kind, Internal for I/O errors
    of the worker's own disk.
    """
    captured = CapturedOutputs()
    properties = spec.node_properties
    for output in spec.outputs:
        try:
            _capture_one(root, output, store, properties, captured, known)
        except OSError as error:
            raise Internal(f"capturing output {output.path!r}: {error}") from None
    return captured


def _capture_one(
    root: str,
    output: OutputSpec,
    store: ContentStore,
    properties: frozenset[str],
    captured: CapturedOutputs,
    known: KnownDigest | None,
) -> None:
    with _open_parent(root, output.components) as parent_fd:
        if parent_fd is None:
            return  # a parent is missing, not a directory, or a symlink: no such output
        name = output.components[-1] if output.components else "."
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        result = captured.result
        if stat.S_ISLNK(st.st_mode):
            symlink = re_pb2.OutputSymlink(path=output.path, target=os.readlink(name, dir_fd=parent_fd))
            _set_properties(symlink.node_properties, st, properties)
            {
                OutputKind.PATH: result.output_symlinks,
                OutputKind.FILE: result.output_file_symlinks,
                OutputKind.DIRECTORY: result.output_directory_symlinks,
            }[output.kind].append(symlink)
        elif stat.S_ISREG(st.st_mode):
            if output.kind is OutputKind.DIRECTORY:
                raise FailedPrecondition(f"output directory {output.path!r} is a regular file")
            digest = _file_digest(parent_fd, name, output.components, st, store, known)
            captured.blobs.add(digest)
            out = result.output_files.add(path=output.path, digest=digest.to_proto(), is_executable=_is_exec(st))
            _set_properties(out.node_properties, st, properties)
        elif stat.S_ISDIR(st.st_mode):
            if output.kind is OutputKind.FILE:
                raise FailedPrecondition(f"output file {output.path!r} is a directory")
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            try:
                tree = re_pb2.Tree()
                children: dict[Digest, re_pb2.Directory] = {}
                tree.root.CopyFrom(
                    _directory_proto(fd, output.components, store, properties, children, captured.blobs, known)
                )
            finally:
                os.close(fd)
            tree.children.extend(children[d] for d in sorted(children))
            tree_digest = store.write(serialize(tree))
            captured.blobs.add(tree_digest)
            result.output_directories.add(path=output.path, tree_digest=tree_digest.to_proto())
        # Sockets, fifos and devices are not outputs REAPI can express: left out.


@contextlib.contextmanager
def _open_parent(root: str, components: tuple[str, ...]) -> Iterator[int | None]:
    """Open the directory holding the last component, never following a symlink."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in components[:-1]:
            try:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as error:
                if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    os.close(fd)
                    fd = -1
                    yield None
                    return
                raise
            os.close(fd)
            fd = next_fd
        yield fd
    finally:
        if fd >= 0:
            os.close(fd)


def _directory_proto(
    fd: int,
    parts: RelPath,
    store: ContentStore,
    properties: frozenset[str],
    children: dict[Digest, re_pb2.Directory],
    blobs: set[Digest],
    known: KnownDigest | None,
) -> re_pb2.Directory:
    """The canonical Directory proto of the open directory ``fd`` (at ``parts`` below the
    input root), storing its files and collecting every descendant Directory (deduplicated
    by digest) into ``children``."""
    directory = re_pb2.Directory()
    with os.scandir(fd) as entries:
        listing = sorted(entries, key=lambda entry: entry.name)
    for entry in listing:
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            digest = _file_digest(fd, entry.name, parts + (entry.name,), st, store, known)
            blobs.add(digest)
            node = directory.files.add(name=entry.name, digest=digest.to_proto(), is_executable=_is_exec(st))
            _set_properties(node.node_properties, st, properties)
        elif stat.S_ISLNK(st.st_mode):
            node = directory.symlinks.add(name=entry.name, target=os.readlink(entry.name, dir_fd=fd))
            _set_properties(node.node_properties, st, properties)
        elif stat.S_ISDIR(st.st_mode):
            child_fd = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
            try:
                child = _directory_proto(child_fd, parts + (entry.name,), store, properties, children, blobs, known)
            finally:
                os.close(child_fd)
            child_digest = store.write(serialize(child))
            blobs.add(child_digest)
            children.setdefault(child_digest, child)
            directory.directories.add(name=entry.name, digest=child_digest.to_proto())
    return directory


def _file_digest(
    dir_fd: int, name: str, parts: RelPath, st: os.stat_result, store: ContentStore, known: KnownDigest | None
) -> Digest:
    if known is not None:
        digest = known(parts, st)
        if digest is not None:
            return digest
    return _store_file(dir_fd, name, store)


def _store_file(dir_fd: int, name: str, store: ContentStore) -> Digest:
    # O_NONBLOCK: a fifo swapped in would otherwise block the open; it is refused below.
    fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FailedPrecondition(f"output {name!r} changed type while being captured")
        return store.write_stream(stream)


def _is_exec(st: os.stat_result) -> bool:
    return bool(st.st_mode & stat.S_IXUSR)


def _set_properties(target: re_pb2.NodeProperties, st: os.stat_result, wanted: frozenset[str]) -> None:
    if "mtime" in wanted:
        stamp = Timestamp()
        stamp.FromNanoseconds(st.st_mtime_ns)
        target.mtime.CopyFrom(stamp)
    if "unix_mode" in wanted:
        target.unix_mode.value = stat.S_IMODE(st.st_mode)
