"""``import_tar``: a tar stream straight into a Directory, with no unpack directory.

The archive is read once, as a stream (``tarfile`` mode ``r|...``), into a fresh
CasDirectory (in the target's store when the target is a CasDirectory, else in memory);
only when every member has been accepted is that merged into the target with
``import_files``. A refused archive therefore leaves the target untouched (blobs it
already wrote to the store stay there as unreferenced garbage, which is harmless).

Refused, with InvalidArgument naming the member: absolute paths, ``..`` components,
device and fifo members, hardlinks that do not point to an earlier regular file,
members that would pass through a symlink or replace a directory. Symlink targets are
checked by the target directory's policy at their final place, by ``import_files``.

A stream that ends cleanly between members without the end-of-archive blocks is
accepted (as ``tar -x`` does); one cut inside a member is refused. Compressed streams
are decoded by ``tarfile``, which does not check the gzip trailer's CRC.

Hardlinks to an earlier regular member are accepted: in a Merkle tree a hardlink is
just a second file with the same digest and executable bit, which is what ``tar -x``
followed by an import produces too. Nothing on disk is linked, so nothing can be
reached through one.
"""

from __future__ import annotations

import lzma
import tarfile
import zlib
from typing import BinaryIO, Literal, cast

from reapi_worker.protos.errors import AlreadyExists, InvalidArgument, NotFound, ReapiError

from ..content import MemoryStore
from ..paths import split_relative
from .base import Directory, FileType, ImportResult
from .cas import CasDirectory

_Mode = Literal["r|*", "r|", "r|gz", "r|bz2", "r|xz"]
_MODES: dict[str | None, _Mode] = {None: "r|*", "": "r|", "gz": "r|gz", "bz2": "r|bz2", "xz": "r|xz"}


def import_tar(directory: Directory, fileobj: BinaryIO, compression: str | None = None) -> ImportResult:
    """Merge the tar archive read from ``fileobj`` into ``directory``.

    ``compression`` is ``"gz"``, ``"bz2"``, ``"xz"``, ``""`` (plain), or None to detect
    it. Existing non-directory entries are replaced (as ``import_files`` with
    ``overwrite=True``). Returns what ``import_files`` did. Raises InvalidArgument for
    a refused member or a stream that is not a (complete) tar archive; on any error the
    directory is unchanged.
    """
    try:
        mode = _MODES[compression]
    except KeyError:
        raise InvalidArgument(f"import_tar: unknown compression {compression!r} (gz, bz2, xz, '' or None)") from None
    store = directory.store if isinstance(directory, CasDirectory) else MemoryStore()
    staging = CasDirectory.empty(store)  # links are checked at their final place, below
    try:
        with tarfile.open(fileobj=fileobj, mode=mode) as archive:
            for member in archive:
                try:
                    _add(staging, archive, member)
                except (NotFound, AlreadyExists) as err:
                    # A member that cannot be placed (through a symlink, over a directory)
                    # is a bad archive, not a missing or taken path of the caller's.
                    raise InvalidArgument(f"import_tar: member {member.name!r}: {err.reason}") from None
                except ReapiError as err:
                    raise err.within(f"import_tar: member {member.name!r}") from None
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as err:
        # gzip reports a bad stream as OSError (BadGzipFile), bz2 too.
        raise InvalidArgument(f"import_tar: not a valid tar stream: {err}") from None
    try:
        return directory.import_files(staging)
    except ReapiError as err:
        raise err.within("import_tar") from None


def _add(staging: CasDirectory, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    if member.name.startswith("/"):
        raise InvalidArgument("absolute member path refused")
    parts = split_relative(member.name, "member path")
    path = "/".join(parts)
    if member.isdir():
        staging.mkdir(path)
        return
    if not parts:
        raise InvalidArgument("a non-directory member cannot be the archive's root")
    if member.ischr() or member.isblk() or member.isfifo():
        raise InvalidArgument("device and fifo members are refused")
    staging.mkdir("/".join(parts[:-1]))  # tar -x creates missing parents too
    if member.isreg():
        stream = archive.extractfile(member)
        assert stream is not None  # a regular member always has a stream
        staging.write_stream(path, cast(BinaryIO, stream), executable=bool(member.mode & 0o100))
    elif member.issym():
        staging.symlink(path, member.linkname)
    elif member.islnk():
        _hardlink(staging, member.linkname, path)
    else:
        raise InvalidArgument(f"unsupported member type {member.type!r}")


def _hardlink(staging: CasDirectory, linkname: str, path: str) -> None:
    if linkname.startswith("/"):
        raise InvalidArgument(f"hardlink to absolute path {linkname!r} refused")
    target = "/".join(split_relative(linkname, "hardlink target"))
    if not target or not staging.exists(target) or staging.stat(target).type is not FileType.FILE:
        raise InvalidArgument(f"hardlink to {linkname!r}, which is not an earlier regular file member")
    if target == path:
        return
    if staging.exists(path):
        staging.remove(path)  # a later member replaces an earlier one, as tar -x does
    staging.copy(target, path)
