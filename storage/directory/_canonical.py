"""Canonical REAPI ``Directory`` protos: built from entries, checked when loaded.

Canonical means: each of ``files``, ``directories`` and ``symlinks`` sorted by name with
no repeats, no name in two of them, every name a valid component. A Directory's own
``node_properties`` (e.g. BuildStream's ``SubtreeReadOnly``) are kept, sorted by name as
REAPI asks; file and symlink node properties are not produced.
Both backends build their digests here, which is why they agree. Names sort by code
point, which is the order of their UTF-8 bytes.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.message import DecodeError

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import InvalidArgument

from ..digests import Digest, serialize
from ..paths import RelPath, SymlinkPolicy, check_name, join


def build_proto(
    files: Iterable[tuple[str, Digest, bool]],
    directories: Iterable[tuple[str, Digest]],
    symlinks: Iterable[tuple[str, str]],
    properties: Iterable[tuple[str, str]] = (),
) -> re_pb2.Directory:
    """The Directory holding these entries. Each iterable must already be sorted by name
    (the callers sort once, over all entries of a directory together); ``properties`` are
    the directory's own node properties, as (name, value), sorted here."""
    proto = re_pb2.Directory()
    try:
        for name, value in sorted(properties):
            proto.node_properties.properties.add(name=name, value=value)
        file_nodes = proto.files
        for name, digest, executable in files:
            node = file_nodes.add(name=name, is_executable=executable)
            node.digest.hash = digest.hash
            node.digest.size_bytes = digest.size_bytes
        dir_nodes = proto.directories
        for name, digest in directories:
            node = dir_nodes.add(name=name)
            node.digest.hash = digest.hash
            node.digest.size_bytes = digest.size_bytes
        link_nodes = proto.symlinks
        for name, target in symlinks:
            link_nodes.add(name=name, target=target)
    except (UnicodeError, ValueError) as err:
        # A local name that is not valid UTF-8 cannot be a REAPI name.
        raise InvalidArgument(f"name or symlink target is not valid UTF-8: {err}") from None
    return proto


def build(
    files: Iterable[tuple[str, Digest, bool]],
    directories: Iterable[tuple[str, Digest]],
    symlinks: Iterable[tuple[str, str]],
    properties: Iterable[tuple[str, str]] = (),
) -> tuple[Digest, bytes]:
    """The digest and bytes of :func:`build_proto`'s Directory."""
    data = serialize(build_proto(files, directories, symlinks, properties))
    return Digest.of_bytes(data), data


def parse(
    data: bytes, digest: Digest, where: RelPath, policy: SymlinkPolicy
) -> re_pb2.Directory:
    """Parse the Directory blob ``digest`` sitting at ``where`` in its tree and check it is
    canonical and its symlinks pass ``policy``. InvalidArgument names the digest and the
    offending entry."""
    try:
        proto: re_pb2.Directory = re_pb2.Directory.FromString(data)
    except DecodeError as err:
        raise InvalidArgument(f"Directory {digest} at {join(where) or '.'!r} is not a Directory proto: {err}") from None

    def refuse(name: str, problem: str) -> InvalidArgument:
        return InvalidArgument(f"Directory {digest} at {join(where) or '.'!r}: entry {name!r} {problem}")

    seen: set[str] = set()
    for nodes in (proto.files, proto.directories, proto.symlinks):
        previous = None
        for node in nodes:
            name = node.name
            try:
                check_name(name)
            except InvalidArgument as err:
                raise refuse(name, f"is an invalid name ({err})") from None
            if previous is not None and name <= previous:
                raise refuse(name, "is out of order or repeated (not canonical)")
            if name in seen:
                raise refuse(name, "is listed twice, as two kinds of entry (not canonical)")
            seen.add(name)
            previous = name
    for link in proto.symlinks:
        try:
            policy.check(where + (link.name,), link.target)
        except InvalidArgument as err:
            raise refuse(link.name, f"is refused: {err}") from None
    return proto


def child_digest(proto: re_pb2.Digest, parent: Digest, name: str) -> Digest:
    """A digest inside a Directory proto, checked (it becomes part of a cache path)."""
    try:
        return Digest(proto.hash, proto.size_bytes)
    except InvalidArgument as err:
        raise InvalidArgument(f"Directory {parent}: entry {name!r} has {err}") from None
