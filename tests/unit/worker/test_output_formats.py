"""Output directories in each ``output_directory_format``, checked against the files on
disk: the Tree's and the Directory hierarchy's contents, and every Directory in the store.
Also the outputs BuildStream asks for: ``"."`` and paths climbing out with ``..``."""

import os

import pytest

from reapi_worker.protos import re_pb2
from reapi_worker.protos.unbound_fields import OutputDirectoryFormat, root_directory_digest, set_output_directory_format
from reapi_worker.storage.content import MemoryStore
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.worker.action import check_action
from reapi_worker.worker.outputs import capture_outputs


def _spec(directory_format=OutputDirectoryFormat.TREE_ONLY, **command_fields):
    command = re_pb2.Command(arguments=["true"], **command_fields)
    set_output_directory_format(command, directory_format)
    empty = Digest.of_bytes(b"")
    return check_action(empty, re_pb2.Action(), command, empty)


def _on_disk(top):
    """{relative path: bytes | ("dir",) | ("link", target)} of everything below ``top``."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(top):
        rel = os.path.relpath(dirpath, top)
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            key = os.path.normpath(os.path.join(rel, name))
            if os.path.islink(path):
                found[key] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                found[key] = ("dir",)
            else:
                found[key] = open(path, "rb").read()
    return found


def _from_directories(store, root):
    """The same mapping, read from a Directory hierarchy in ``store`` (every blob must be there)."""
    found = {}
    pending = [("", Digest.from_proto(root))]
    while pending:
        prefix, digest = pending.pop()
        directory = re_pb2.Directory.FromString(store.read(digest))
        for f in directory.files:
            found[prefix + f.name] = store.read(Digest.from_proto(f.digest))
        for s in directory.symlinks:
            found[prefix + s.name] = ("link", s.target)
        for d in directory.directories:
            found[prefix + d.name] = ("dir",)
            pending.append((prefix + d.name + "/", Digest.from_proto(d.digest)))
    return found


def _from_tree(store, tree_digest):
    tree = re_pb2.Tree.FromString(store.read(Digest.from_proto(tree_digest)))
    by_digest = {Digest.of_bytes(serialize(child)): child for child in tree.children}
    found = {}
    pending = [("", tree.root)]
    while pending:
        prefix, directory = pending.pop()
        for f in directory.files:
            found[prefix + f.name] = store.read(Digest.from_proto(f.digest))
        for s in directory.symlinks:
            found[prefix + s.name] = ("link", s.target)
        for d in directory.directories:
            found[prefix + d.name] = ("dir",)
            pending.append((prefix + d.name + "/", by_digest[Digest.from_proto(d.digest)]))
    return tree, found


@pytest.fixture
def tree(tmp_path):
    out = tmp_path / "out"
    (out / "a" / "b").mkdir(parents=True)
    (out / "empty").mkdir()
    (out / "a" / "b" / "deep").write_bytes(b"deep")
    (out / "a" / "same").write_bytes(b"same")
    (out / "top").write_bytes(b"top")
    os.symlink("a/same", out / "link")
    return tmp_path


def test_tree_only_reports_a_tree_of_the_files_and_no_root_directory(tree):
    store = MemoryStore()
    captured = capture_outputs(str(tree), _spec(output_paths=["out"]), store)
    (out,) = captured.result.output_directories
    assert root_directory_digest(out) is None
    tree_proto, found = _from_tree(store, out.tree_digest)
    assert found == _on_disk(tree / "out")
    assert Digest.of_bytes(serialize(tree_proto.root)) not in set(store)  # legacy: the root is only in the Tree
    assert all(not store.find_missing([d]) for d in captured.blobs)


def test_directory_only_reports_the_root_directory_with_every_directory_stored(tree):
    store = MemoryStore()
    captured = capture_outputs(str(tree), _spec(OutputDirectoryFormat.DIRECTORY_ONLY, output_paths=["out"]), store)
    (out,) = captured.result.output_directories
    assert not out.HasField("tree_digest")
    root = root_directory_digest(out)
    assert _from_directories(store, root) == _on_disk(tree / "out")  # reads every Directory from the store
    # What is uploaded is exactly the hierarchy and its files: no Tree is made.
    assert captured.blobs == _reachable(store, Digest.from_proto(root))


def _reachable(store, root):
    blobs, pending = set(), [root]
    while pending:
        digest = pending.pop()
        blobs.add(digest)
        directory = re_pb2.Directory.FromString(store.read(digest))
        blobs.update(Digest.from_proto(f.digest) for f in directory.files)
        pending.extend(Digest.from_proto(d.digest) for d in directory.directories)
    return blobs


def test_tree_and_directory_agree_on_the_root(tree):
    store = MemoryStore()
    spec = _spec(OutputDirectoryFormat.TREE_AND_DIRECTORY, output_paths=["out"])
    (out,) = capture_outputs(str(tree), spec, store).result.output_directories
    tree_proto, from_tree = _from_tree(store, out.tree_digest)
    root = root_directory_digest(out)
    assert Digest.from_proto(root) == Digest.of_bytes(serialize(tree_proto.root))  # REAPI: MUST match
    assert from_tree == _from_directories(store, root) == _on_disk(tree / "out")


def test_the_root_directory_digest_survives_packing_into_a_lease_result(tree):
    store = MemoryStore()
    spec = _spec(OutputDirectoryFormat.DIRECTORY_ONLY, output_paths=["out"])
    result = capture_outputs(str(tree), spec, store).result
    packed = re_pb2.ActionResult(exit_code=0)
    packed.MergeFrom(result)  # what the executor does
    again = re_pb2.ActionResult.FromString(packed.SerializeToString())
    assert root_directory_digest(again.output_directories[0]) == root_directory_digest(result.output_directories[0])


def test_dot_and_dotdot_outputs_are_reported_under_the_clients_paths(tmp_path):
    # BuildStream: working directory buildstream/p/e.bst, outputs "." and the install root.
    work = tmp_path / "buildstream" / "p" / "e.bst"
    work.mkdir(parents=True)
    (work / "built.o").write_bytes(b"object")
    (tmp_path / "buildstream-install" / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "buildstream-install" / "usr" / "bin" / "tool").write_bytes(b"tool")
    store = MemoryStore()
    spec = _spec(OutputDirectoryFormat.DIRECTORY_ONLY, working_directory="buildstream/p/e.bst",
                 output_paths=[".", "../../../buildstream-install"])
    result = capture_outputs(str(tmp_path), spec, store).result
    assert [d.path for d in result.output_directories] == [".", "../../../buildstream-install"]
    assert not result.output_files
    work_out, install_out = result.output_directories
    assert _from_directories(store, root_directory_digest(work_out)) == {"built.o": b"object"}
    assert _from_directories(store, root_directory_digest(install_out)) == {
        "usr": ("dir",), "usr/bin": ("dir",), "usr/bin/tool": b"tool"}


def test_the_input_root_itself_as_an_output(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "f").write_bytes(b"f")
    store = MemoryStore()
    spec = _spec(OutputDirectoryFormat.DIRECTORY_ONLY, working_directory="w", output_paths=[".."])
    (out,) = capture_outputs(str(tmp_path), spec, store).result.output_directories
    assert out.path == ".."
    assert _from_directories(store, root_directory_digest(out)) == {"w": ("dir",), "f": b"f"}
