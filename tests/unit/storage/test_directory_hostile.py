"""Hostile input to the Directory backends, each test named after the attack it stops."""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Iterator

import pytest

from directory_helpers import (  # noqa: F401  (fixtures are used by name)
    DirectoryFactory,
    build_in,
    build_local,
    d,
    kind,
    make_factory,
    new_dir,
    snapshot,
)
from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import AlreadyExists, InvalidArgument, NotFound, ReapiError
from reapi_worker.storage.content import MemoryStore
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.directory import CasDirectory, Directory, FileSystemDirectory, FileType
from reapi_worker.storage.paths import SymlinkPolicy

BAD_NAMES = ["", ".", "..", "a/b", "a\0b"]
ESCAPING_PATHS = ["../x", "a/../../x", "/etc/passwd", "a/\0/b", "..", "/"]


# -- names and paths --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ESCAPING_PATHS)
def test_dotdot_absolute_and_nul_paths_are_refused_by_every_operation(d: Directory, path: str) -> None:
    d.mkdir("a")
    d.write_bytes("f", b"")
    calls = [
        lambda: d.descend(path),
        lambda: d.descend(path, create=True),
        lambda: d.stat(path),
        lambda: d.read_bytes(path),
        lambda: d.write_bytes(path, b"x"),
        lambda: d.symlink(path, "t"),
        lambda: d.mkdir(path),
        lambda: d.remove(path, recursive=True),
        lambda: d.rename("f", path),
        lambda: d.rename(path, "g"),
        lambda: d.copy("f", path),
        lambda: d.copy(path, "g"),
    ]
    before = snapshot(d)
    for call in calls:
        with pytest.raises(InvalidArgument):
            call()
    assert snapshot(d) == before


@pytest.mark.parametrize("name", ["", ".", "./"])
def test_empty_and_dot_names_cannot_be_written(d: Directory, name: str) -> None:
    for call in (lambda: d.write_bytes(name, b""), lambda: d.symlink(name, "x"), lambda: d.remove(name)):
        with pytest.raises(InvalidArgument):
            call()


def test_name_with_nul_is_refused(d: Directory) -> None:
    with pytest.raises(InvalidArgument):
        d.write_bytes("a\0b", b"")


def test_symlink_target_with_nul_is_refused(d: Directory) -> None:
    with pytest.raises(InvalidArgument):
        d.symlink("l", "a\0b")


def test_local_name_that_is_not_utf8_is_refused_on_import(d: Directory, tmp_path: pathlib.Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    fd = os.open(os.path.join(os.fsencode(source), b"bad\xff"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)
    with pytest.raises(InvalidArgument, match="UTF-8"):
        d.import_files(str(source))
    assert d.list() == []


# -- symlink policy ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/etc/passwd", "/", "../outside", "a/../../outside", "sub/../../x"])
def test_absolute_and_escaping_symlink_targets_are_refused_under_relative_inside(
    new_dir: DirectoryFactory, target: str
) -> None:
    d = new_dir(SymlinkPolicy.RELATIVE_INSIDE)
    with pytest.raises(InvalidArgument):
        d.symlink("link", target)
    assert d.list() == []


def test_symlink_escaping_from_a_descended_directory_is_checked_against_the_whole_tree(
    new_dir: DirectoryFactory,
) -> None:
    d = new_dir(SymlinkPolicy.RELATIVE_INSIDE)
    sub = d.descend("a/b", create=True)
    sub.symlink("ok", "../../top")  # stays inside the tree's root
    with pytest.raises(InvalidArgument):
        sub.symlink("escape", "../../../outside")


def test_relative_policy_refuses_absolute_but_allows_dotdot(new_dir: DirectoryFactory) -> None:
    d = new_dir(SymlinkPolicy.RELATIVE)
    d.symlink("up", "../../elsewhere")
    with pytest.raises(InvalidArgument):
        d.symlink("abs", "/etc")


def test_escaping_symlink_in_an_imported_local_tree_is_refused(new_dir: DirectoryFactory, tmp_path: pathlib.Path) -> None:
    d = new_dir(SymlinkPolicy.RELATIVE_INSIDE)
    source = build_local(tmp_path / "src", {"fine": ("->", "x"), "dir/bad": ("->", "/etc/shadow")})
    with pytest.raises(InvalidArgument, match="dir/bad"):
        d.import_files(str(source))
    assert d.list() == []


def test_moving_a_symlink_up_so_that_it_escapes_is_refused(new_dir: DirectoryFactory) -> None:
    d = new_dir(SymlinkPolicy.RELATIVE_INSIDE)
    d.mkdir("a/b")
    d.symlink("a/b/link", "../../x")
    before = snapshot(d)
    for move in (d.rename, d.copy):
        with pytest.raises(InvalidArgument):
            move("a/b/link", "link")
        with pytest.raises(InvalidArgument):
            move("a/b", "b")  # the subtree carries the link up with it
    assert snapshot(d) == before
    d.rename("a/b", "a/c")  # same depth: still inside


# -- symlinks inside a filesystem tree are never followed -------------------------------------


@pytest.fixture
def outside(tmp_path: pathlib.Path) -> pathlib.Path:
    place = tmp_path / "outside"
    place.mkdir()
    (place / "secret").write_bytes(b"do not touch")
    return place


@pytest.fixture
def fs_with_escape(tmp_path: pathlib.Path, outside: pathlib.Path) -> FileSystemDirectory:
    """A filesystem tree holding ``link -> <outside dir>`` and ``flink -> <outside file>``
    (as an action could leave them), opened with the permissive policy."""
    root = tmp_path / "tree"
    root.mkdir()
    os.symlink(outside, root / "link")
    os.symlink(outside / "secret", root / "flink")
    return FileSystemDirectory(root)


def _outside_unchanged(outside: pathlib.Path) -> None:
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_bytes() == b"do not touch"


def test_write_through_a_symlink_to_outside_does_not_create_outside(
    fs_with_escape: FileSystemDirectory, outside: pathlib.Path
) -> None:
    with pytest.raises(NotFound):
        fs_with_escape.write_bytes("link/x", b"pwned")
    with pytest.raises(NotFound):
        fs_with_escape.symlink("link/x", "y")
    with pytest.raises(AlreadyExists):
        fs_with_escape.mkdir("link/x")
    with pytest.raises(AlreadyExists):
        fs_with_escape.descend("link/x", create=True)
    _outside_unchanged(outside)


def test_descend_into_a_symlink_to_outside_is_not_found(fs_with_escape: FileSystemDirectory) -> None:
    with pytest.raises(NotFound):
        fs_with_escape.descend("link")
    with pytest.raises(NotFound):
        fs_with_escape.stat("link/secret")
    with pytest.raises(NotFound):
        fs_with_escape.read_bytes("link/secret")
    with pytest.raises(NotFound):
        fs_with_escape.read_bytes("flink")


def test_overwriting_a_symlink_to_an_outside_file_replaces_the_link(
    fs_with_escape: FileSystemDirectory, outside: pathlib.Path
) -> None:
    fs_with_escape.write_bytes("flink", b"pwned")
    assert fs_with_escape.stat("flink").type is FileType.FILE
    _outside_unchanged(outside)


def test_remove_recursive_of_a_symlink_to_outside_removes_only_the_link(
    fs_with_escape: FileSystemDirectory, outside: pathlib.Path
) -> None:
    fs_with_escape.remove("link", recursive=True)
    assert not fs_with_escape.exists("link")
    _outside_unchanged(outside)


def test_rename_and_copy_into_a_symlink_to_outside_are_refused(
    fs_with_escape: FileSystemDirectory, outside: pathlib.Path
) -> None:
    fs_with_escape.write_bytes("f", b"x")
    for move in (fs_with_escape.rename, fs_with_escape.copy):
        with pytest.raises(NotFound):
            move("f", "link/f")
    fs_with_escape.copy("link", "link2")  # copies the link itself
    assert fs_with_escape.stat("link2").target == str(outside)
    _outside_unchanged(outside)


def test_import_through_a_symlink_to_outside_is_refused(
    fs_with_escape: FileSystemDirectory, outside: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    source = build_local(tmp_path / "src", {"link/x": b"pwned"})
    with pytest.raises(AlreadyExists):
        fs_with_escape.import_files(str(source))
    _outside_unchanged(outside)


def test_walk_digest_and_export_do_not_follow_a_symlink_to_outside(
    fs_with_escape: FileSystemDirectory, outside: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    assert [path for path, _ in fs_with_escape.walk()] == ["flink", "link"]
    fs_with_escape.export_files(str(tmp_path / "out"))
    assert os.readlink(tmp_path / "out" / "link") == str(outside)
    cas = CasDirectory.empty(MemoryStore())
    cas.import_files(fs_with_escape)
    assert cas.digest() == fs_with_escape.digest()
    _outside_unchanged(outside)


def test_import_source_with_a_symlinked_subdirectory_is_not_followed(tmp_path: pathlib.Path, outside: pathlib.Path) -> None:
    source = build_local(tmp_path / "src", {"real/f": b"1"})
    os.symlink(outside, source / "sneaky")
    cas = CasDirectory.empty(MemoryStore())
    cas.import_files(str(source))
    assert cas.stat("sneaky").type is FileType.SYMLINK
    assert not any("secret" in path for path, _ in cas.walk())


# -- non-canonical Directory protos ------------------------------------------------------------


def _file(name: str, data: bytes = b"x") -> re_pb2.FileNode:
    return re_pb2.FileNode(name=name, digest=Digest.of_bytes(data).to_proto())


def _store_dir(store: MemoryStore, proto: re_pb2.Directory) -> Digest:
    return store.write(serialize(proto))


def _root_holding(store: MemoryStore, child: Digest) -> Digest:
    return _store_dir(store, re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="sub", digest=child.to_proto())]))


NON_CANONICAL = {
    "unsorted_files": re_pb2.Directory(files=[_file("b"), _file("a")]),
    "duplicate_files": re_pb2.Directory(files=[_file("a"), _file("a")]),
    "unsorted_directories": re_pb2.Directory(directories=[
        re_pb2.DirectoryNode(name="z", digest=Digest.of_bytes(b"").to_proto()),
        re_pb2.DirectoryNode(name="y", digest=Digest.of_bytes(b"").to_proto()),
    ]),
    "unsorted_symlinks": re_pb2.Directory(symlinks=[
        re_pb2.SymlinkNode(name="b", target="x"), re_pb2.SymlinkNode(name="a", target="x"),
    ]),
    "name_in_files_and_directories": re_pb2.Directory(
        files=[_file("a")], directories=[re_pb2.DirectoryNode(name="a", digest=Digest.of_bytes(b"").to_proto())]
    ),
    "name_in_files_and_symlinks": re_pb2.Directory(files=[_file("a")], symlinks=[re_pb2.SymlinkNode(name="a", target="t")]),
    **{f"bad_name_{i}": re_pb2.Directory(files=[_file(name)]) for i, name in enumerate(BAD_NAMES)},
    "bad_directory_name_dotdot": re_pb2.Directory(
        directories=[re_pb2.DirectoryNode(name="..", digest=Digest.of_bytes(b"").to_proto())]
    ),
    "file_digest_is_a_path": re_pb2.Directory(files=[
        re_pb2.FileNode(name="f", digest=re_pb2.Digest(hash="../../../etc/passwd", size_bytes=1)),
    ]),
    "symlink_target_empty": re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="l", target="")]),
}


@pytest.mark.parametrize("case", sorted(NON_CANONICAL))
def test_non_canonical_directory_proto_is_invalid_argument_naming_its_digest(case: str) -> None:
    store = MemoryStore()
    bad = _store_dir(store, NON_CANONICAL[case])
    tree = CasDirectory.from_digest(store, _root_holding(store, bad))
    assert tree.list() == ["sub"]  # the root is fine; the child is read on first visit
    with pytest.raises(InvalidArgument) as caught:
        tree.descend("sub").list()
    assert str(bad) in str(caught.value)
    with pytest.raises(InvalidArgument):
        CasDirectory.from_digest(store, bad).list()


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff", b"garbage!", b"\x0a\x05hello"])
def test_garbage_bytes_as_a_directory_are_invalid_argument_naming_the_digest(garbage: bytes) -> None:
    store = MemoryStore()
    bad = store.write(garbage)
    with pytest.raises(InvalidArgument) as caught:
        list(CasDirectory.from_digest(store, bad).walk())
    assert str(bad) in str(caught.value)


@pytest.mark.parametrize("target", ["/etc/passwd", "../../outside"])
def test_stored_symlink_escaping_the_tree_is_refused_on_load_under_relative_inside(target: str) -> None:
    store = MemoryStore()
    bad = _store_dir(store, re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="evil", target=target)]))
    tree = CasDirectory.from_digest(store, _root_holding(store, bad), symlink_policy=SymlinkPolicy.RELATIVE_INSIDE)
    with pytest.raises(InvalidArgument) as caught:
        tree.stat("sub/evil")
    assert str(bad) in str(caught.value) and "evil" in str(caught.value)
    # The same proto is acceptable data under the permissive policy.
    assert CasDirectory.from_digest(store, bad).stat("evil").target == target


def test_missing_directory_blob_is_missing_blobs_naming_it(tmp_path: pathlib.Path) -> None:
    store = MemoryStore()
    absent = Digest.of_bytes(b"never stored")
    tree = CasDirectory.from_digest(store, _root_holding(store, absent))
    with pytest.raises(ReapiError) as caught:
        tree.descend("sub").list()
    assert absent in getattr(caught.value, "digests", [])
    with pytest.raises(ReapiError):
        tree.export_files(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # checked before anything is written


# -- a tree deeper than Python's recursion limit ----------------------------------------------


@pytest.fixture
def shm() -> Iterator[pathlib.Path]:
    """A scratch directory on tmpfs (deep trees on ext4 are slow, docs/measured.md), removed
    with the Directory's own remover: pytest's clean-up (shutil.rmtree) recurses."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = pathlib.Path(tempfile.mkdtemp(prefix="deep-tree-", dir=base))
    try:
        yield path
    finally:
        FileSystemDirectory(path.parent).remove(path.name, recursive=True)


def test_tree_deeper_than_the_recursion_limit_is_handled_without_recursion(kind: str, shm: pathlib.Path) -> None:
    """An action can build a tree thousands of levels deep through descriptors (no path
    is ever that long); capturing, digesting, copying and deleting it must still work."""
    depth = 1200  # Python's recursion limit is 1000
    source = shm / "deep"
    source.mkdir()
    fd = os.open(source, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("a", dir_fd=fd)
        child = os.open("a", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.symlink("f", "l", dir_fd=fd)
    os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o755, dir_fd=fd))
    os.close(fd)
    (shm / "trees").mkdir()
    d = make_factory(kind, shm / "trees")()

    d.import_files(str(source))
    digest = d.digest()
    assert digest == FileSystemDirectory(source).digest()
    assert len(list(d.walk())) == depth + 2
    d.copy("a", "b")
    d.rename("b", "c")
    d.export_files(str(shm / "out"))
    assert FileSystemDirectory(shm / "out").digest() == d.digest()
    d.remove("c", recursive=True)
    assert d.digest() == digest
    d.remove("a", recursive=True)
    assert d.list() == []
