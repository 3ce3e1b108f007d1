"""Capture an action's outputs into CAS and describe them in an ActionResult.

The build directory was written by an untrusted command, so this module never follows
a symlink: every component is opened relative to its parent's descriptor with
``O_NOFOLLOW``, symlinks are recorded as symlinks, and special files are left out.
It runs after the sandbox has ended, so nothing changes the tree under it.

Capture has two passes. The first (*scan*) lists every output without storing anything:
it finds each output's type, walks output trees (:mod:`.output_walk`: no recursion, a
bounded number of open descriptors, so a tree of any depth is captured), checks every
name and symlink target, and adds up what storing would cost — the apparent size of each
new file (a sparse file costs its full length; an unmodified input, or a second link to
one inode, costs nothing). Past ``max_bytes`` the action fails before a byte is stored:
RESOURCE_EXHAUSTED naming the bound. The second pass stores the files and builds the
Directory messages bottom-up.

REAPI rules followed (v2.3 with the v2.0 fields):
* ``output_paths``: a file goes to ``output_files``, a directory to ``output_directories``,
  a symlink to ``output_symlinks``;
* legacy ``output_files`` / ``output_directories``: symlinks go to
  ``output_file_symlinks`` / ``output_directory_symlinks``; a directory listed as a file
  (or the other way round) is FAILED_PRECONDITION;
* each output is reported under the path the client wrote (``"."``, ``"../x"``), which
  clients resolve against the working directory themselves;
* a directory is described as ``output_directory_format`` asks: a ``Tree``
  (``tree_digest``; TREE_ONLY, the default), its root ``Directory``
  (``root_directory_digest``, every Directory below it stored; DIRECTORY_ONLY), or both;
* a missing output is simply absent;
* names and symlink targets must be UTF-8 (REAPI strings): anything else is
  INVALID_ARGUMENT naming the path;
* ``output_node_properties`` ``mtime`` / ``unix_mode`` are recorded when asked, on output
  files and symlinks and on the file and symlink nodes inside output trees.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import BoundExceeded, FailedPrecondition, Internal, InvalidArgument
from reapi_worker.protos.unbound_fields import OutputDirectoryFormat, set_root_directory_digest
from reapi_worker.storage.content import ContentStore
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.paths import RelPath, join

from .action import ActionSpec, OutputKind, OutputSpec
from .output_walk import DIR_FLAGS, open_directory, walk

#: Asks the stager for the digest of a file it knows without reading it (an unmodified
#: input): (components below the input root, its lstat) -> digest or None.
KnownDigest = Callable[[RelPath, os.stat_result], "Digest | None"]

#: The config key that sets ``max_bytes`` (named in the error an action gets).
MAX_OUTPUT_SIZE_KEY = "max_output_size"

T = TypeVar("T")

_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(slots=True)
class CapturedOutputs:
    """What capture produced: the ActionResult fields and every blob they refer to."""

    result: re_pb2.ActionResult = field(default_factory=re_pb2.ActionResult)
    blobs: set[Digest] = field(default_factory=set)


def capture_outputs(
    root: str,
    spec: ActionSpec,
    store: ContentStore,
    known: KnownDigest | None = None,
    max_bytes: int | None = None,
) -> CapturedOutputs:
    """Store every output of ``spec`` found under the host directory ``root`` (the input
    root as the command saw it) into ``store`` and describe them.

    ``known``, if given, is asked first for each regular file: a digest it returns is used
    as is (the bytes are neither read nor stored: they already are, as an input), so that
    an output which is an unmodified input costs no copy.

    ``max_bytes`` bounds the new file content the outputs may add to ``store`` (None:
    unbounded); it is checked before anything is stored.

    Raises FailedPrecondition for an output of the wrong kind, InvalidArgument for a name
    or symlink target that is not UTF-8, BoundExceeded past ``max_bytes``, Internal
    for I/O errors of the worker's own disk.
    """
    try:
        root_fd = os.open(root, DIR_FLAGS)
    except OSError as error:
        raise Internal(f"capturing outputs: opening the build directory: {error}") from None
    try:
        cost = _Cost(max_bytes)
        scans = [_guarded(output, functools.partial(_scan, root_fd, output, known, cost)) for output in spec.outputs]
        captured = CapturedOutputs()
        writer = _Writer(root_fd, store, spec.node_properties, captured.blobs)
        for scan in scans:
            if scan is not None:
                _guarded(scan.output, functools.partial(_report, scan, writer, spec, captured.result))
        return captured
    finally:
        os.close(root_fd)


def _guarded(output: OutputSpec, step: Callable[[], T]) -> T:
    """Run one step on one output, translating OS errors (the worker's disk) once."""
    try:
        return step()
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise InvalidArgument(f"output {output.path!r}: a name is too long for the file system") from None
        raise Internal(f"capturing output {output.path!r}: {error}") from None


# ------------------------------------------------------------------------ pass 1: scan


@dataclass(slots=True)
class _File:
    name: str
    parts: RelPath  # below the input root
    st: os.stat_result
    digest: Digest | None  # known without reading, else filled when stored


@dataclass(slots=True)
class _Symlink:
    name: str
    target: str
    st: os.stat_result


@dataclass(slots=True)
class _Dir:
    parts: RelPath
    files: list[_File] = field(default_factory=list)
    symlinks: list[_Symlink] = field(default_factory=list)
    subdirs: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Scan:
    """One output as found: exactly one of ``file``, ``symlink``, ``directories`` is set
    (``directories`` in walk order: parents first, the output directory itself first)."""

    output: OutputSpec
    file: _File | None = None
    symlink: _Symlink | None = None
    directories: list[_Dir] | None = None


class _Cost:
    """What storing the scanned files would add to the store, checked against the bound
    as it grows so that a huge tree is refused without being walked to its end."""

    def __init__(self, max_bytes: int | None) -> None:
        self._max = max_bytes
        self._inodes: set[tuple[int, int]] = set()
        self.total = 0

    def add(self, st: os.stat_result) -> None:
        inode = (st.st_dev, st.st_ino)
        if inode in self._inodes:
            return  # another link to a file already counted: stored once
        self._inodes.add(inode)
        self.total += st.st_size  # apparent size: a sparse file is stored dense
        if self._max is not None and self.total > self._max:
            raise BoundExceeded(
                f"outputs hold more than {self._max} bytes of new file content, the bound set by "
                f"{MAX_OUTPUT_SIZE_KEY} (captured nothing)"
            )


def _scan(root_fd: int, output: OutputSpec, known: KnownDigest | None, cost: _Cost) -> _Scan | None:
    """Find ``output`` and list it; None when it is absent or not something REAPI can
    express (a socket, fifo or device)."""
    parts = output.components
    if parts:
        try:
            parent_fd = open_directory(root_fd, parts[:-1])
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None  # a parent is missing, not a directory, or a symlink
            raise
        try:
            try:
                st = os.stat(parts[-1], dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            if stat.S_ISLNK(st.st_mode):
                target = _checked_text(os.readlink(parts[-1], dir_fd=parent_fd), parts, "symlink target")
                return _Scan(output, symlink=_Symlink(parts[-1], target, st))
            if stat.S_ISREG(st.st_mode):
                if output.kind is OutputKind.DIRECTORY:
                    raise FailedPrecondition(f"output directory {output.path!r} is a regular file")
                file = _File(parts[-1], parts, st, known(parts, st) if known else None)
                if file.digest is None:
                    cost.add(st)
                return _Scan(output, file=file)
            if not stat.S_ISDIR(st.st_mode):
                return None  # sockets, fifos and devices are not outputs REAPI can express
        finally:
            os.close(parent_fd)
    if output.kind is OutputKind.FILE:
        raise FailedPrecondition(f"output file {output.path!r} is a directory")
    directories: list[_Dir] = []

    def visit(dir_parts: RelPath, fd: int) -> Iterable[str]:
        directory = _list_directory(fd, dir_parts, known, cost)
        directories.append(directory)
        return directory.subdirs

    walk(root_fd, parts, visit)
    return _Scan(output, directories=directories)


def _list_directory(fd: int, parts: RelPath, known: KnownDigest | None, cost: _Cost) -> _Dir:
    directory = _Dir(parts)
    with os.scandir(fd) as entries:
        listing = sorted(entries, key=lambda entry: entry.name)
    for entry in listing:
        name = _checked_text(entry.name, parts + (entry.name,), "name")
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            file = _File(name, parts + (name,), st, known(parts + (name,), st) if known else None)
            if file.digest is None:
                cost.add(st)
            directory.files.append(file)
        elif stat.S_ISLNK(st.st_mode):
            target = _checked_text(os.readlink(name, dir_fd=fd), parts + (name,), "symlink target")
            directory.symlinks.append(_Symlink(name, target, st))
        elif stat.S_ISDIR(st.st_mode):
            directory.subdirs.append(name)
        # Sockets, fifos and devices are not outputs REAPI can express: left out.
    return directory


def _checked_text(text: str, parts: RelPath, what: str) -> str:
    """``text`` (a name or target from the file system, decoded with surrogateescape) if
    it is UTF-8, as every REAPI string must be; InvalidArgument naming the path if not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(join(parts))
        raise InvalidArgument(f"{what} of {shown!r} below the input root is not valid UTF-8") from None
    return text


# ------------------------------------------------------------------ pass 2: store, describe


class _Writer:
    """Stores scanned files (each inode once) and Directory messages."""

    def __init__(self, root_fd: int, store: ContentStore, properties: frozenset[str], blobs: set[Digest]) -> None:
        self.root_fd = root_fd
        self.store = store
        self.properties = properties
        self.blobs = blobs
        self._by_inode: dict[tuple[int, int], Digest] = {}

    def store_files(self, dir_fd: int, files: Iterable[_File]) -> None:
        for file in files:
            if file.digest is None:
                inode = (file.st.st_dev, file.st.st_ino)
                file.digest = self._by_inode.get(inode) or self._store_file(dir_fd, file)
                self._by_inode[inode] = file.digest
            self.blobs.add(file.digest)

    def _store_file(self, dir_fd: int, file: _File) -> Digest:
        # O_NONBLOCK: a fifo swapped in would otherwise block the open; it is refused below.
        fd = os.open(file.name, _FILE_FLAGS, dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as stream:
            now = os.fstat(fd)
            if not stat.S_ISREG(now.st_mode) or (now.st_ino, now.st_size) != (file.st.st_ino, file.st.st_size):
                raise FailedPrecondition(f"{join(file.parts)!r} changed while being captured")
            return self.store.write_stream(stream)

    def write_directory(self, directory: re_pb2.Directory) -> Digest:
        digest = self.store.write(serialize(directory))
        self.blobs.add(digest)
        return digest

    def file_node(self, file: _File, node: re_pb2.FileNode | re_pb2.OutputFile) -> None:
        assert file.digest is not None
        node.digest.CopyFrom(file.digest.to_proto())
        node.is_executable = bool(file.st.st_mode & stat.S_IXUSR)
        _set_properties(node.node_properties, file.st, self.properties)

    def symlink_node(self, link: _Symlink, node: re_pb2.SymlinkNode | re_pb2.OutputSymlink) -> None:
        node.target = link.target
        _set_properties(node.node_properties, link.st, self.properties)


def _report(scan: _Scan, writer: _Writer, spec: ActionSpec, result: re_pb2.ActionResult) -> None:
    output = scan.output
    if scan.symlink is not None:
        symlinks = {
            OutputKind.PATH: result.output_symlinks,
            OutputKind.FILE: result.output_file_symlinks,
            OutputKind.DIRECTORY: result.output_directory_symlinks,
        }[output.kind]
        writer.symlink_node(scan.symlink, symlinks.add(path=output.path))
    elif scan.file is not None:
        parent_fd = open_directory(writer.root_fd, output.components[:-1])
        try:
            writer.store_files(parent_fd, [scan.file])
        finally:
            os.close(parent_fd)
        writer.file_node(scan.file, result.output_files.add(path=output.path))
    elif scan.directories is not None:
        _report_directory(scan.directories, writer, spec.output_directory_format, result.output_directories.add(path=output.path))


def _report_directory(
    directories: list[_Dir], writer: _Writer, directory_format: OutputDirectoryFormat, out: re_pb2.OutputDirectory
) -> None:
    by_parts = {directory.parts: directory for directory in directories}
    top = directories[0]

    def store(parts: RelPath, fd: int) -> Iterable[str]:
        directory = by_parts[parts]
        writer.store_files(fd, directory.files)
        return directory.subdirs

    walk(writer.root_fd, top.parts, store)

    # Walk order lists parents before children: built in reverse, every child's digest is
    # known when its parent is built, with no recursion.
    built: dict[RelPath, tuple[Digest, re_pb2.Directory]] = {}
    for directory in reversed(directories):
        proto = re_pb2.Directory()
        for file in directory.files:  # each list is sorted by name, as REAPI requires
            writer.file_node(file, proto.files.add(name=file.name))
        for name in directory.subdirs:
            child_digest, _ = built[directory.parts + (name,)]
            proto.directories.add(name=name, digest=child_digest.to_proto())
        for link in directory.symlinks:
            writer.symlink_node(link, proto.symlinks.add(name=link.name))
        # The root Directory is a blob of its own only when the client asked for it;
        # the others always are (as before formats existed).
        if directory is not top or directory_format.directory:
            digest = writer.write_directory(proto)
        else:
            digest = Digest.of_bytes(serialize(proto))
        built[directory.parts] = (digest, proto)

    root_digest, root_proto = built[top.parts]
    if directory_format.tree:
        tree = re_pb2.Tree(root=root_proto)
        children = {digest: proto for parts, (digest, proto) in built.items() if parts != top.parts}
        tree.children.extend(children[digest] for digest in sorted(children))
        out.tree_digest.CopyFrom(writer.write_directory(tree).to_proto())
    if directory_format.directory:
        set_root_directory_digest(out, root_digest.to_proto())


def _set_properties(target: re_pb2.NodeProperties, st: os.stat_result, wanted: frozenset[str]) -> None:
    if "mtime" in wanted:
        stamp = Timestamp()
        stamp.FromNanoseconds(st.st_mtime_ns)
        target.mtime.CopyFrom(stamp)
    if "unix_mode" in wanted:
        target.unix_mode.value = stat.S_IMODE(st.st_mode)
