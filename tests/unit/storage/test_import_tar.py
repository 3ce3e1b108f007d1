"""import_tar: same digest as ``tar -x`` + import, for every compression; hostile members
refused (named after the attack) with nothing left behind."""

from __future__ import annotations

import gzip
import io
import pathlib
import subprocess
import tarfile

import pytest

from conftest import require_tool
from directory_helpers import (  # noqa: F401  (fixtures are used by name)
    DirectoryFactory,
    build_in,
    build_local,
    d,
    kind,
    new_dir,
    snapshot,
)
from reapi_worker.protos.errors import AlreadyExists, InvalidArgument
from reapi_worker.storage.content import MemoryStore
from reapi_worker.storage.directory import CasDirectory, Directory, FileSystemDirectory, import_tar
from reapi_worker.storage.paths import SymlinkPolicy

SPEC = {
    "README": b"hello\n",
    "bin/tool": ("x", b"#!/bin/sh\necho hi\n"),
    "bin/link": ("->", "tool"),
    "empty/also-empty": None,
    "src/a/b/deep.c": b"int main(void) { return 0; }\n" * 100,
    "src/up": ("->", "../README"),
}

COMPRESSORS = {"": None, "gz": "gzip", "bz2": "bzip2", "xz": "xz"}


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """The SPEC tree tarred by GNU tar, once plain and once per compressor."""
    tar = require_tool("tar")
    base = tmp_path_factory.mktemp("tars")
    source = build_local(base / "src", SPEC)
    plain = base / "tree.tar"
    subprocess.run([tar, "-cf", str(plain), "-C", str(source), "."], check=True)
    made = {"": plain}
    for suffix, tool in COMPRESSORS.items():
        if tool is None:
            continue
        out = base / f"tree.tar.{suffix}"
        with open(out, "wb") as sink:
            subprocess.run([require_tool(tool), "-c", str(plain)], stdout=sink, check=True)
        made[suffix] = out
    return made


@pytest.fixture(scope="module")
def unpacked_digest(archives: dict[str, pathlib.Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """What ``tar -x`` then a filesystem import gives: the reference."""
    dest = tmp_path_factory.mktemp("unpacked")
    subprocess.run([require_tool("tar"), "-xf", str(archives[""]), "-C", str(dest)], check=True)
    return str(FileSystemDirectory(dest).digest())


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
@pytest.mark.parametrize("autodetect", [True, False], ids=["auto", "named"])
def test_every_compression_gives_the_digest_of_tar_x(
    d: Directory, archives: dict[str, pathlib.Path], unpacked_digest: str, compression: str, autodetect: bool
) -> None:
    with open(archives[compression], "rb") as stream:
        import_tar(d, stream, None if autodetect else compression)
    assert str(d.digest()) == unpacked_digest


def test_import_tar_into_a_subdirectory_merges(d: Directory, archives: dict[str, pathlib.Path]) -> None:
    d.write_bytes("mine", b"kept")
    sub = d.descend("sub", create=True)
    with open(archives["gz"], "rb") as stream:
        result = import_tar(sub, stream)
    assert "bin/tool" in result.imported
    assert d.read_bytes("mine") == b"kept"
    assert d.stat("sub/bin/tool").executable


def test_import_tar_reads_a_non_seekable_stream(archives: dict[str, pathlib.Path]) -> None:
    class OneWay(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
            chunk = self._data.read(len(buffer))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    tree = CasDirectory.empty(MemoryStore())
    import_tar(tree, OneWay(archives["xz"].read_bytes()))  # type: ignore[arg-type]
    assert tree.read_bytes("src/a/b/deep.c") == SPEC["src/a/b/deep.c"]


# -- hand-made archives ------------------------------------------------------------------------


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    buffer.seek(0)
    return buffer


def _file(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def _special(name: str, type_: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = linkname
    return info, None


def test_hardlink_to_an_earlier_regular_member_is_a_copy(d: Directory, tmp_path: pathlib.Path) -> None:
    archive = _tar(_file("dir/orig", b"shared", 0o755), _special("alias", tarfile.LNKTYPE, "dir/orig"))
    import_tar(d, archive)
    assert d.stat("alias") == d.stat("dir/orig")
    archive.seek(0)
    (tmp_path / "x").mkdir()
    subprocess.run([require_tool("tar"), "-xf", "-", "-C", str(tmp_path / "x")], input=archive.read(), check=True)
    assert d.digest() == FileSystemDirectory(tmp_path / "x").digest()


HOSTILE = {
    "absolute_member_path": [_file("/etc/cron.d/evil")],
    "dotdot_member_path": [_file("../escape")],
    "dotdot_inside_member_path": [_file("a/../../escape")],
    "character_device_member": [_special("dev/null", tarfile.CHRTYPE)],
    "block_device_member": [_special("dev/sda", tarfile.BLKTYPE)],
    "fifo_member": [_special("pipe", tarfile.FIFOTYPE)],
    "hardlink_to_absolute_path": [_special("shadow", tarfile.LNKTYPE, "/etc/shadow")],
    "hardlink_escaping_with_dotdot": [_special("shadow", tarfile.LNKTYPE, "../../etc/shadow")],
    "hardlink_to_a_later_member": [_special("early", tarfile.LNKTYPE, "late"), _file("late")],
    "hardlink_to_a_directory": [_special("d", tarfile.DIRTYPE), _special("h", tarfile.LNKTYPE, "d")],
    "member_through_a_symlink_to_outside": [_special("l", tarfile.SYMTYPE, "/tmp"), _file("l/planted")],
    "member_through_a_symlink_inside": [_special("l", tarfile.SYMTYPE, "."), _file("l/planted")],
    "file_member_over_a_directory_member": [_special("d", tarfile.DIRTYPE), _file("d")],
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_hostile_member_is_refused_naming_it_and_nothing_is_left(new_dir: DirectoryFactory, attack: str) -> None:
    members = HOSTILE[attack]
    # A good member first, so that refusing later must also undo (not write) it.
    archive = _tar(_file("fine/first", b"first"), *members)
    d = build_in(new_dir(), {"mine": b"kept"})
    before = snapshot(d)
    with pytest.raises(InvalidArgument) as caught:
        import_tar(d, archive)
    assert any(info.name in str(caught.value) for info, _ in members)
    assert snapshot(d) == before


@pytest.mark.parametrize("target", ["/etc/passwd", "../../outside", "a/../../../outside"])
def test_symlink_member_refused_by_the_directory_policy(new_dir: DirectoryFactory, target: str) -> None:
    d = new_dir(SymlinkPolicy.RELATIVE_INSIDE)
    archive = _tar(_file("fine", b"1"), _special("sub/evil", tarfile.SYMTYPE, target))
    with pytest.raises(InvalidArgument, match="sub/evil"):
        import_tar(d, archive)
    assert d.list() == []


def test_symlink_member_inside_the_tree_is_accepted_under_relative_inside(new_dir: DirectoryFactory) -> None:
    d = new_dir(SymlinkPolicy.RELATIVE_INSIDE)
    import_tar(d, _tar(_file("a/f"), _special("a/b/l", tarfile.SYMTYPE, "../f")))
    assert d.stat("a/b/l").target == "../f"


def test_conflict_with_the_target_changes_nothing(d: Directory) -> None:
    d.write_bytes("dir", b"a file where the archive has a directory")
    before = snapshot(d)
    with pytest.raises(AlreadyExists):
        import_tar(d, _tar(_file("a"), _file("dir/inner")))
    assert snapshot(d) == before


@pytest.mark.parametrize(
    "data", [b"", b"not a tar at all" * 64, b"\x1f\x8b\x08\x00garbage-gzip", b"BZh9garbage"], ids=["empty", "text", "gz", "bz2"]
)
def test_garbage_stream_is_invalid_argument(d: Directory, data: bytes) -> None:
    with pytest.raises(InvalidArgument):
        import_tar(d, io.BytesIO(data))
    assert d.list() == []


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
def test_archive_cut_inside_a_member_is_refused_and_changes_nothing(
    d: Directory, archives: dict[str, pathlib.Path], compressed: bool
) -> None:
    plain = archives[""].read_bytes()
    with tarfile.open(archives[""]) as listing:
        member = listing.getmember("./src/a/b/deep.c")
    cut = plain[: member.offset_data + 100]
    with pytest.raises(InvalidArgument):
        import_tar(d, io.BytesIO(gzip.compress(cut) if compressed else cut))
    assert d.list() == []


def test_unknown_compression_name_is_invalid_argument(d: Directory) -> None:
    with pytest.raises(InvalidArgument):
        import_tar(d, io.BytesIO(b""), "zstd")


def test_later_member_replaces_an_earlier_one_like_tar_x(d: Directory) -> None:
    import_tar(d, _tar(_file("f", b"first"), _file("f", b"second", 0o755), _special("./", tarfile.DIRTYPE)))
    assert d.read_bytes("f") == b"second"
    assert d.stat("f").executable
