"""Output capture on real directories with the in-memory store."""

import os
import stat

import pytest

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import FailedPrecondition
from reapi_worker.storage.content import MemoryStore
from reapi_worker.storage.digests import Digest
from reapi_worker.worker.action import check_action
from reapi_worker.worker.outputs import capture_outputs


def _spec(**command_fields):
    command = re_pb2.Command(arguments=["true"], **command_fields)
    empty = Digest.of_bytes(b"")
    return check_action(empty, re_pb2.Action(), command, empty)


def _tree(store, digest_proto):
    tree = re_pb2.Tree()
    tree.ParseFromString(store.read(Digest.from_proto(digest_proto)))
    return tree


def test_file_directory_and_symlink_output_paths(tmp_path):
    (tmp_path / "f").write_bytes(b"file")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "x").write_bytes(b"x")
    os.symlink("f", tmp_path / "l")
    store = MemoryStore()
    captured = capture_outputs(str(tmp_path), _spec(output_paths=["f", "d", "l", "absent"]), store)
    result = captured.result
    assert [f.path for f in result.output_files] == ["f"]
    assert store.read(Digest.from_proto(result.output_files[0].digest)) == b"file"
    assert [(s.path, s.target) for s in result.output_symlinks] == [("l", "f")]
    tree = _tree(store, result.output_directories[0].tree_digest)
    assert [d.name for d in tree.root.directories] == ["sub"]
    assert [f.name for f in tree.children[0].files] == ["x"]
    assert all(store.find_missing([d]) == set() for d in captured.blobs)


def test_output_symlink_to_etc_passwd_is_captured_as_a_symlink(tmp_path):
    os.symlink("/etc/passwd", tmp_path / "leak")
    store = MemoryStore()
    result = capture_outputs(str(tmp_path), _spec(output_paths=["leak"]), store).result
    assert [(s.path, s.target) for s in result.output_symlinks] == [("leak", "/etc/passwd")]
    legacy = capture_outputs(str(tmp_path), _spec(output_files=["leak"]), store).result
    assert [s.target for s in legacy.output_file_symlinks] == ["/etc/passwd"]
    assert not result.output_files and not legacy.output_files
    passwd = open("/etc/passwd", "rb").read()
    assert store.find_missing([Digest.of_bytes(passwd)]) == {Digest.of_bytes(passwd)}


def test_symlinked_parent_directory_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(str(outside), root / "out")
    result = capture_outputs(str(root), _spec(output_paths=["out/secret"]), MemoryStore()).result
    assert not result.output_files and not result.output_symlinks


def test_symlink_inside_output_directory_stays_a_symlink(tmp_path):
    (tmp_path / "d").mkdir()
    os.symlink("/etc", tmp_path / "d" / "etc")
    store = MemoryStore()
    result = capture_outputs(str(tmp_path), _spec(output_directories=["d"]), store).result
    tree = _tree(store, result.output_directories[0].tree_digest)
    assert [(s.name, s.target) for s in tree.root.symlinks] == [("etc", "/etc")]
    assert not tree.root.directories


def test_identical_subdirectories_are_deduplicated_in_the_tree(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "d" / name).mkdir(parents=True)
        (tmp_path / "d" / name / "same").write_bytes(b"same")
    store = MemoryStore()
    result = capture_outputs(str(tmp_path), _spec(output_paths=["d"]), store).result
    tree = _tree(store, result.output_directories[0].tree_digest)
    assert len(tree.root.directories) == 2 and len(tree.children) == 1


def test_executable_bit_and_node_properties(tmp_path):
    path = tmp_path / "tool"
    path.write_bytes(b"#!/bin/sh\n")
    path.chmod(0o751)
    os.utime(path, ns=(1_000_000_123, 1_700_000_000_123_456_789))
    result = capture_outputs(str(tmp_path), _spec(output_paths=["tool"], output_node_properties=["mtime", "unix_mode"]),
                             MemoryStore()).result
    out = result.output_files[0]
    assert out.is_executable
    assert out.node_properties.unix_mode.value == 0o751
    assert out.node_properties.mtime.ToNanoseconds() == 1_700_000_000_123_456_789


def test_no_node_properties_unless_asked(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    out = capture_outputs(str(tmp_path), _spec(output_paths=["f"]), MemoryStore()).result.output_files[0]
    assert not out.HasField("node_properties")
    assert not out.is_executable


def test_legacy_output_file_that_is_a_directory_is_a_failed_precondition(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(FailedPrecondition, match="'d'"):
        capture_outputs(str(tmp_path), _spec(output_files=["d"]), MemoryStore())


def test_fifo_output_is_left_out(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    result = capture_outputs(str(tmp_path), _spec(output_paths=["pipe"]), MemoryStore()).result
    assert not result.output_files and not result.output_symlinks and not result.output_directories


def test_outputs_relative_to_working_directory_keep_the_client_path(tmp_path):
    (tmp_path / "w" / "out").mkdir(parents=True)
    (tmp_path / "w" / "out" / "o").write_bytes(b"o")
    result = capture_outputs(str(tmp_path), _spec(working_directory="w", output_paths=["out/o"]), MemoryStore()).result
    assert [f.path for f in result.output_files] == ["out/o"]
    assert stat.S_ISDIR(os.stat(tmp_path / "w").st_mode)


def test_a_file_whose_digest_the_stager_knows_is_neither_read_nor_stored(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "input").write_bytes(b"as staged")
    (tmp_path / "d" / "made").write_bytes(b"made by the action")
    (tmp_path / "top").write_bytes(b"as staged")
    known_digest = Digest.of_bytes(b"as staged")
    asked = []

    def known(parts, st):
        asked.append(parts)
        return known_digest if parts[-1] in ("input", "top") and st.st_size == 9 else None

    store = MemoryStore()
    captured = capture_outputs(str(tmp_path), _spec(output_paths=["d", "top"]), store, known=known)
    assert sorted(asked) == [("d", "input"), ("d", "made"), ("top",)]
    assert Digest.from_proto(captured.result.output_files[0].digest) == known_digest
    assert store.find_missing([known_digest]) == {known_digest}  # never read, never stored
    tree = _tree(store, captured.result.output_directories[0].tree_digest)
    assert {f.name: Digest.from_proto(f.digest) for f in tree.root.files} == {
        "input": known_digest, "made": Digest.of_bytes(b"made by the action")}
    assert known_digest in captured.blobs  # still named, so it is uploaded if the remote lacks it
