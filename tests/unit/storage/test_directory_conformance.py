"""One conformance suite for every Directory backend (base.py's contract, operation by
operation). Each test runs once per backend through the ``d`` / ``new_dir`` fixtures."""

from __future__ import annotations

import io
import os
import pathlib
import stat as stat_mod

import pytest

from directory_helpers import (  # noqa: F401  (fixtures are used by name)
    BACKENDS,
    DirectoryFactory,
    build_in,
    build_local,
    d,
    kind,
    make_factory,
    new_dir,
    snapshot,
)
from reapi_worker.protos.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from reapi_worker.storage.digests import EMPTY_DIGEST, Digest
from reapi_worker.storage.directory import Directory, FileStat, FileSystemDirectory, FileType
from reapi_worker.storage.paths import SymlinkPolicy

SAMPLE = {
    "a.txt": b"alpha",
    "bin/tool": ("x", b"#!/bin/sh\n"),
    "bin/link": ("->", "tool"),
    "empty": None,
    "src/deep/er/file.c": b"int x;",
}


# -- navigation -----------------------------------------------------------------------------


def test_empty_directory_has_nothing_and_the_empty_digest(d: Directory) -> None:
    assert d.list() == []
    assert list(d.walk()) == []
    assert d.digest() == EMPTY_DIGEST
    assert d.stat("") == FileStat(FileType.DIRECTORY, digest=EMPTY_DIGEST)


def test_descend_missing_is_not_found(d: Directory) -> None:
    with pytest.raises(NotFound):
        d.descend("nope")


def test_descend_create_makes_every_missing_level(d: Directory) -> None:
    sub = d.descend("a/b/c", create=True)
    assert sub.list() == []
    assert d.stat("a/b/c").type is FileType.DIRECTORY
    assert d.descend("a/b", create=True).list() == ["c"]


def test_descend_through_a_file_is_not_found_and_create_is_already_exists(d: Directory) -> None:
    d.write_bytes("f", b"")
    with pytest.raises(NotFound):
        d.descend("f")
    with pytest.raises(NotFound):
        d.descend("f/x")
    with pytest.raises(AlreadyExists):
        d.descend("f/x", create=True)


def test_descend_empty_path_is_the_directory_itself(d: Directory) -> None:
    d.descend("").write_bytes("x", b"1")
    assert d.read_bytes("x") == b"1"


def test_edits_through_a_descended_directory_are_edits_of_the_tree(d: Directory, new_dir: DirectoryFactory) -> None:
    d.mkdir("a/b")
    before = d.digest()
    sub = d.descend("a/b")
    sub.write_bytes("f", b"data", executable=True)
    sub.symlink("l", "f")
    assert d.read_bytes("a/b/f") == b"data"
    assert d.stat("a/b/l").target == "f"
    after = d.digest()
    assert after != before
    expected = build_in(new_dir(), {"a/b/f": ("x", b"data"), "a/b/l": ("->", "f")})
    assert after == expected.digest()
    assert sub.digest() == d.stat("a/b").digest


def test_mkdir_creates_parents_and_accepts_an_existing_directory(d: Directory) -> None:
    d.mkdir("p/q/r")
    d.mkdir("p/q/r")
    d.mkdir("p")
    d.mkdir("")
    assert [path for path, _ in d.walk()] == ["p", "p/q", "p/q/r"]


def test_mkdir_over_a_file_or_symlink_is_already_exists(d: Directory) -> None:
    d.write_bytes("f", b"")
    d.mkdir("real")
    d.symlink("l", "real")
    for path in ("f", "f/sub", "l", "l/sub"):
        with pytest.raises(AlreadyExists):
            d.mkdir(path)
    assert d.stat("real").digest == EMPTY_DIGEST


# -- file contents --------------------------------------------------------------------------


def test_write_then_read_bytes(d: Directory) -> None:
    d.write_bytes("f", b"hello")
    assert d.read_bytes("f") == b"hello"
    d.write_bytes("f", b"replaced")
    assert d.read_bytes("f") == b"replaced"
    d.write_bytes("empty", b"")
    assert d.read_bytes("empty") == b""


def test_write_into_a_missing_parent_is_not_found(d: Directory) -> None:
    with pytest.raises(NotFound):
        d.write_bytes("no/f", b"")
    assert d.list() == []


def test_write_over_a_directory_is_already_exists(d: Directory) -> None:
    d.mkdir("dir")
    with pytest.raises(AlreadyExists):
        d.write_bytes("dir", b"x")
    with pytest.raises(AlreadyExists):
        d.write_stream("dir", io.BytesIO(b"x"))
    assert d.stat("dir").type is FileType.DIRECTORY


def test_write_replaces_a_symlink_itself(d: Directory) -> None:
    d.write_bytes("target", b"original")
    d.symlink("link", "target")
    d.write_bytes("link", b"new")
    assert d.stat("link").type is FileType.FILE
    assert d.read_bytes("target") == b"original"


def test_write_with_no_name_is_invalid(d: Directory) -> None:
    for path in ("", ".", "./"):
        with pytest.raises(InvalidArgument):
            d.write_bytes(path, b"")


def test_read_bytes_of_anything_but_a_file_is_not_found(d: Directory) -> None:
    d.mkdir("dir")
    d.write_bytes("f", b"x")
    d.symlink("link", "f")
    for path in ("dir", "link", "missing", "missing/f", "f/g"):
        with pytest.raises(NotFound):
            d.read_bytes(path)


def test_write_stream_reads_to_the_end(d: Directory) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    d.write_stream("big", io.BytesIO(data), executable=True)
    assert d.read_bytes("big") == data
    assert d.stat("big") == FileStat(FileType.FILE, size=len(data), executable=True, digest=Digest.of_bytes(data))


def test_executable_bit_is_kept_and_cleared_by_a_rewrite(d: Directory) -> None:
    d.write_bytes("tool", b"#!", executable=True)
    assert d.stat("tool").executable
    d.write_bytes("tool", b"#!")
    assert not d.stat("tool").executable


def test_symlinks_are_data(d: Directory) -> None:
    d.symlink("dangling", "does/not/exist")
    d.symlink("abs", "/etc/passwd")
    assert d.stat("dangling") == FileStat(FileType.SYMLINK, target="does/not/exist")
    assert d.stat("abs").target == "/etc/passwd"
    d.symlink("dangling", "other")  # replaces a symlink
    assert d.stat("dangling").target == "other"
    d.write_bytes("f", b"")
    d.symlink("f", "x")  # replaces a file
    assert d.stat("f").type is FileType.SYMLINK


def test_symlink_over_a_directory_is_already_exists(d: Directory) -> None:
    d.mkdir("dir")
    with pytest.raises(AlreadyExists):
        d.symlink("dir", "x")


def test_symlink_with_an_empty_target_is_invalid(d: Directory) -> None:
    with pytest.raises(InvalidArgument):
        d.symlink("l", "")


def test_stat_describes_each_kind(d: Directory, new_dir: DirectoryFactory) -> None:
    build_in(d, SAMPLE)
    assert d.stat("a.txt") == FileStat(FileType.FILE, size=5, digest=Digest.of_bytes(b"alpha"))
    assert d.stat("bin/tool") == FileStat(
        FileType.FILE, size=10, executable=True, digest=Digest.of_bytes(b"#!/bin/sh\n")
    )
    assert d.stat("bin/link") == FileStat(FileType.SYMLINK, target="tool")
    assert d.stat("empty") == FileStat(FileType.DIRECTORY, digest=EMPTY_DIGEST)
    deep = build_in(new_dir(), {"er/file.c": b"int x;"})
    assert d.stat("src/deep") == FileStat(FileType.DIRECTORY, digest=deep.digest())
    assert d.stat("") == FileStat(FileType.DIRECTORY, digest=d.digest())
    assert d.exists("bin/link") and not d.exists("bin/nope")
    with pytest.raises(NotFound):
        d.stat("missing")
    with pytest.raises(NotFound):
        d.stat("a.txt/inside")


def test_list_is_sorted_and_walk_is_parents_first_siblings_sorted(d: Directory) -> None:
    for path in ("b", "a/z", "a/b", "a-c", "a/b/0", "B"):
        d.mkdir(path)
    d.write_bytes("a/b/0/f", b"")
    assert d.list() == ["B", "a", "a-c", "b"]
    assert [path for path, _ in d.walk()] == ["B", "a", "a/b", "a/b/0", "a/b/0/f", "a/z", "a-c", "b"]
    assert [path for path, _ in d.descend("a").walk()] == ["b", "b/0", "b/0/f", "z"]


def test_walk_stats_equal_stat(d: Directory) -> None:
    build_in(d, SAMPLE)
    for path, stat in d.walk():
        assert d.stat(path) == stat


# -- tree edits -----------------------------------------------------------------------------


def test_remove_file_symlink_and_empty_directory(d: Directory) -> None:
    build_in(d, SAMPLE)
    d.remove("a.txt")
    d.remove("bin/link")
    d.remove("empty")
    assert d.list() == ["bin", "src"]
    assert d.descend("bin").list() == ["tool"]


def test_remove_non_empty_directory_needs_recursive(d: Directory) -> None:
    build_in(d, SAMPLE)
    before = snapshot(d)
    with pytest.raises(FailedPrecondition):
        d.remove("src")
    assert snapshot(d) == before
    d.remove("src", recursive=True)
    assert not d.exists("src")
    assert d.exists("a.txt")


def test_remove_missing_is_not_found_and_root_is_invalid(d: Directory) -> None:
    with pytest.raises(NotFound):
        d.remove("missing")
    with pytest.raises(NotFound):
        d.remove("missing/deeper")
    with pytest.raises(InvalidArgument):
        d.remove("", recursive=True)


def test_rename_file_symlink_and_subtree(d: Directory) -> None:
    build_in(d, SAMPLE)
    src_digest = d.stat("src").digest
    d.rename("a.txt", "b.txt")
    d.rename("bin/link", "link")
    d.rename("src", "empty/moved")
    assert d.read_bytes("b.txt") == b"alpha" and not d.exists("a.txt")
    assert d.stat("link").target == "tool" and not d.exists("bin/link")
    assert d.stat("empty/moved").digest == src_digest and not d.exists("src")
    assert d.read_bytes("empty/moved/deep/er/file.c") == b"int x;"


def test_rename_rules(d: Directory) -> None:
    build_in(d, SAMPLE)
    before = snapshot(d)
    with pytest.raises(NotFound):
        d.rename("missing", "x")
    with pytest.raises(AlreadyExists):
        d.rename("a.txt", "bin/tool")
    with pytest.raises(AlreadyExists):
        d.rename("a.txt", "empty")
    with pytest.raises(AlreadyExists):
        d.rename("a.txt", "a.txt")
    with pytest.raises(NotFound):
        d.rename("a.txt", "nodir/a.txt")
    with pytest.raises(InvalidArgument):
        d.rename("src", "src/deep/inside")
    with pytest.raises(InvalidArgument):
        d.rename("", "x")
    assert snapshot(d) == before


def test_copy_file_and_subtree_are_independent(d: Directory) -> None:
    build_in(d, SAMPLE)
    d.copy("bin/tool", "tool2")
    assert d.stat("tool2") == d.stat("bin/tool")
    d.copy("src", "src2")
    assert d.stat("src2") == d.stat("src")
    d.write_bytes("src2/deep/er/file.c", b"changed")
    assert d.read_bytes("src/deep/er/file.c") == b"int x;"
    assert d.stat("src2").digest != d.stat("src").digest
    d.copy("bin/link", "link2")
    assert d.stat("link2").target == "tool"


def test_copy_rules(d: Directory) -> None:
    build_in(d, SAMPLE)
    before = snapshot(d)
    with pytest.raises(NotFound):
        d.copy("missing", "x")
    with pytest.raises(AlreadyExists):
        d.copy("a.txt", "bin/tool")
    with pytest.raises(NotFound):
        d.copy("a.txt", "nodir/a.txt")
    with pytest.raises(InvalidArgument):
        d.copy("src", "src/deep/copy")
    assert snapshot(d) == before


# -- digests --------------------------------------------------------------------------------


def test_digest_does_not_depend_on_creation_order(d: Directory, new_dir: DirectoryFactory) -> None:
    build_in(d, SAMPLE)
    other = build_in(new_dir(), dict(reversed(list(SAMPLE.items()))))
    assert d.digest() == other.digest()


def test_digest_follows_every_change(d: Directory, new_dir: DirectoryFactory) -> None:
    build_in(d, SAMPLE)
    seen = {d.digest()}
    d.write_bytes("src/deep/er/file.c", b"int y;")
    seen.add(d.digest())
    d.write_bytes("src/deep/er/file.c", b"int y;", executable=True)
    seen.add(d.digest())
    d.symlink("bin/link", "elsewhere")
    seen.add(d.digest())
    d.remove("empty")
    seen.add(d.digest())
    assert len(seen) == 5
    expected = build_in(new_dir(), {
        "a.txt": b"alpha", "bin/tool": ("x", b"#!/bin/sh\n"), "bin/link": ("->", "elsewhere"),
        "src/deep/er/file.c": ("x", b"int y;"),
    })
    assert d.digest() == expected.digest()


# -- import_files ---------------------------------------------------------------------------


def test_import_from_a_local_path(d: Directory, tmp_path: pathlib.Path, new_dir: DirectoryFactory) -> None:
    source = build_local(tmp_path / "src", SAMPLE)
    result = d.import_files(str(source))
    assert result.imported == ["a.txt", "bin", "bin/link", "bin/tool", "empty", "src", "src/deep",
                               "src/deep/er", "src/deep/er/file.c"]
    assert result.overwritten == [] and result.ignored == []
    assert snapshot(d) == snapshot(build_in(new_dir(), SAMPLE))


def test_import_with_a_filter(d: Directory, tmp_path: pathlib.Path) -> None:
    source = build_local(tmp_path / "src", {**SAMPLE, "bin/tool.o": b"obj"})
    result = d.import_files(str(source), filter=lambda path: not path.endswith(".o") and path != "src")
    assert sorted(result.ignored) == ["bin/tool.o", "src"]
    assert d.list() == ["a.txt", "bin", "empty"]
    assert d.descend("bin").list() == ["link", "tool"]


def test_import_overwrite_on_and_off(d: Directory, tmp_path: pathlib.Path) -> None:
    d.mkdir("bin")
    d.write_bytes("a.txt", b"old")
    d.write_bytes("bin/link", b"a file where the source has a symlink")
    d.write_bytes("keep", b"mine")
    source = build_local(tmp_path / "src", SAMPLE)

    kept = d.import_files(str(source), overwrite=False)
    assert sorted(kept.ignored) == ["a.txt", "bin/link"]
    assert d.read_bytes("a.txt") == b"old"
    assert d.stat("bin/link").type is FileType.FILE
    assert "bin/tool" in kept.imported

    replaced = d.import_files(str(source), overwrite=True)
    assert sorted(replaced.overwritten) == ["a.txt", "bin/link", "bin/tool", "src/deep/er/file.c"]
    assert set(replaced.overwritten) <= set(replaced.imported)
    assert d.read_bytes("a.txt") == b"alpha"
    assert d.stat("bin/link").target == "tool"
    assert d.read_bytes("keep") == b"mine"


def test_import_keeps_empty_dirs_symlinks_and_exec_bits(d: Directory, tmp_path: pathlib.Path) -> None:
    source = build_local(tmp_path / "src", {"e1/e2": None, "x": ("x", b"run"), "l": ("->", "../../out")})
    d.import_files(str(source))
    assert d.stat("e1/e2") == FileStat(FileType.DIRECTORY, digest=EMPTY_DIGEST)
    assert d.stat("x").executable
    assert d.stat("l").target == "../../out"


def test_import_directory_over_file_is_already_exists_and_changes_nothing(d: Directory, tmp_path: pathlib.Path) -> None:
    d.write_bytes("bin", b"a file")
    before = snapshot(d)
    with pytest.raises(AlreadyExists):
        d.import_files(str(build_local(tmp_path / "src", SAMPLE)))
    assert snapshot(d) == before


def test_import_file_over_directory_is_already_exists_and_changes_nothing(d: Directory, tmp_path: pathlib.Path) -> None:
    d.mkdir("zzz")
    before = snapshot(d)
    with pytest.raises(AlreadyExists):
        d.import_files(str(build_local(tmp_path / "src", {**SAMPLE, "zzz": b"file"})), overwrite=True)
    assert snapshot(d) == before


def test_import_of_a_special_file_is_refused_and_imports_nothing(d: Directory, tmp_path: pathlib.Path) -> None:
    source = build_local(tmp_path / "src", SAMPLE)
    os.mkfifo(source / "src" / "pipe")
    with pytest.raises(InvalidArgument, match="src/pipe"):
        d.import_files(str(source))
    assert d.list() == []


def test_import_into_a_subdirectory(d: Directory, tmp_path: pathlib.Path) -> None:
    source = build_local(tmp_path / "src", SAMPLE)
    d.descend("under/here", create=True).import_files(str(source))
    assert d.read_bytes("under/here/bin/tool") == b"#!/bin/sh\n"
    assert d.stat("under/here/bin/tool").executable


def test_import_of_a_missing_local_path_is_not_found(d: Directory, tmp_path: pathlib.Path) -> None:
    with pytest.raises(NotFound):
        d.import_files(str(tmp_path / "missing"))


@pytest.mark.parametrize("source_kind", BACKENDS)
def test_import_another_directory(d: Directory, source_kind: str, tmp_path: pathlib.Path, new_dir: DirectoryFactory) -> None:
    (tmp_path / "other").mkdir()
    source = build_in(make_factory(source_kind, tmp_path / "other")(), SAMPLE)
    d.write_bytes("a.txt", b"old")
    result = d.import_files(source)
    assert result.overwritten == ["a.txt"]
    assert snapshot(d) == snapshot(build_in(new_dir(), SAMPLE))
    assert d.digest() == source.digest()


@pytest.mark.parametrize("source_kind", BACKENDS)
def test_import_a_descended_directory(d: Directory, source_kind: str, tmp_path: pathlib.Path, new_dir: DirectoryFactory) -> None:
    (tmp_path / "other").mkdir()
    source = build_in(make_factory(source_kind, tmp_path / "other")(), SAMPLE)
    d.import_files(source.descend("src/deep"), filter=lambda p: p != "nothing")
    assert snapshot(d) == snapshot(build_in(new_dir(), {"er/file.c": b"int x;"}))


# -- export_files ---------------------------------------------------------------------------


def test_export_writes_the_tree_read_only(d: Directory, tmp_path: pathlib.Path) -> None:
    build_in(d, SAMPLE)
    dest = tmp_path / "out" / "deeper"
    d.export_files(str(dest))
    exported = FileSystemDirectory(dest)
    assert snapshot(exported) == snapshot(d)
    assert stat_mod.S_IMODE(os.lstat(dest / "a.txt").st_mode) == 0o644
    assert stat_mod.S_IMODE(os.lstat(dest / "bin/tool").st_mode) == 0o755
    assert os.readlink(dest / "bin/link") == "tool"
    assert os.listdir(dest / "empty") == []


def test_export_into_an_existing_empty_directory(d: Directory, tmp_path: pathlib.Path) -> None:
    build_in(d, {"f": b"x"})
    (tmp_path / "out").mkdir()
    d.export_files(str(tmp_path / "out"), can_link=False)
    assert (tmp_path / "out" / "f").read_bytes() == b"x"


def test_export_into_a_non_empty_directory_is_already_exists(d: Directory, tmp_path: pathlib.Path) -> None:
    build_in(d, {"f": b"x"})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "other").write_bytes(b"")
    with pytest.raises(AlreadyExists):
        d.export_files(str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["other"]


def test_export_of_a_subdirectory(d: Directory, tmp_path: pathlib.Path) -> None:
    build_in(d, SAMPLE)
    d.descend("src").export_files(str(tmp_path / "out"))
    assert (tmp_path / "out" / "deep" / "er" / "file.c").read_bytes() == b"int x;"


# -- failure atomicity ----------------------------------------------------------------------


def test_an_import_refused_by_the_symlink_policy_changes_nothing(new_dir: DirectoryFactory, tmp_path: pathlib.Path) -> None:
    d = build_in(new_dir(SymlinkPolicy.RELATIVE_INSIDE), {"a.txt": b"mine", "keep": b"k"})
    before = snapshot(d)
    source = build_local(tmp_path / "src", {**SAMPLE, "zz/escape": ("->", "../../outside")})
    with pytest.raises(InvalidArgument, match="zz/escape"):
        d.import_files(str(source))
    assert snapshot(d) == before


@pytest.mark.parametrize("source_kind", BACKENDS)
def test_an_import_of_a_directory_refused_midway_changes_nothing(
    new_dir: DirectoryFactory, source_kind: str, tmp_path: pathlib.Path
) -> None:
    d = build_in(new_dir(), {"a.txt": b"mine", "zz": b"a file in the way"})
    before = snapshot(d)
    (tmp_path / "other").mkdir()
    source = build_in(make_factory(source_kind, tmp_path / "other")(), {**SAMPLE, "zz/inner": b"x"})
    with pytest.raises(AlreadyExists):
        d.import_files(source)
    assert snapshot(d) == before
