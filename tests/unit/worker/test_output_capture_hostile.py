"""Output capture against trees an action builds to hurt the worker: named after the attack.

Each must end as a clear result (captured, or a status naming the path or the bound),
never INTERNAL with a traceback, and never a dense copy past the output bound.
"""

import contextlib
import os
import resource

import pytest

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import InvalidArgument, ResourceExhausted
from reapi_worker.protos.unbound_fields import OutputDirectoryFormat, root_directory_digest, set_output_directory_format
from reapi_worker.storage.content import MemoryStore
from reapi_worker.storage.digests import Digest
from reapi_worker.worker.action import check_action
from reapi_worker.worker.outputs import capture_outputs

DEPTH = 1500  # past Python's default recursion limit (1000)


def _spec(directory_format=OutputDirectoryFormat.TREE_ONLY, **command_fields):
    command = re_pb2.Command(arguments=["true"], **command_fields)
    set_output_directory_format(command, directory_format)
    empty = Digest.of_bytes(b"")
    return check_action(empty, re_pb2.Action(), command, empty)


def _make_chain(top: str, depth: int) -> None:
    """``top/d/d/.../d/leaf`` ``depth`` directories deep, made through descriptors (the
    path is far longer than PATH_MAX)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"bottom")
        os.close(leaf)
    finally:
        os.close(fd)


def _remove_chain(top: str) -> None:
    """Remove what :func:`_make_chain` made, top down without recursion (pytest's rmtree
    recurses): empty the first level, lift its child into its place, repeat."""
    top_fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while os.path.lexists(os.path.join(top, "d")):
            level = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=top_fd)
            try:
                for name in os.listdir(level):
                    if name == "d":
                        os.rename("d", "next", src_dir_fd=level, dst_dir_fd=top_fd)
                    else:
                        os.unlink(name, dir_fd=level)
            finally:
                os.close(level)
            os.rmdir("d", dir_fd=top_fd)
            if os.path.lexists(os.path.join(top, "next")):
                os.rename("next", "d", src_dir_fd=top_fd, dst_dir_fd=top_fd)
    finally:
        os.close(top_fd)


@pytest.fixture
def deep_tree(tmp_path):
    (tmp_path / "out").mkdir()
    _make_chain(str(tmp_path / "out"), DEPTH)
    yield tmp_path
    _remove_chain(str(tmp_path / "out"))


@pytest.fixture
def few_descriptors():
    """This process may open only 128 more descriptors than it has open now: a capture
    holding one per level of a deep tree would fail."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 128, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("directory_format", list(OutputDirectoryFormat))
def test_output_tree_deeper_than_the_recursion_limit_is_captured_with_few_descriptors(
    deep_tree, few_descriptors, directory_format
):
    store = MemoryStore()
    captured = capture_outputs(str(deep_tree), _spec(directory_format, output_paths=["out"]), store)
    (out,) = captured.result.output_directories
    if directory_format.directory:
        digest = Digest.from_proto(root_directory_digest(out))
        for _ in range(DEPTH):  # follow the chain down: every level is in the store
            directory = re_pb2.Directory.FromString(store.read(digest))
            assert [d.name for d in directory.directories] == ["d"] and not directory.files
            digest = Digest.from_proto(directory.directories[0].digest)
        bottom = re_pb2.Directory.FromString(store.read(digest))
        assert [f.name for f in bottom.files] == ["leaf"]
        assert store.read(Digest.from_proto(bottom.files[0].digest)) == b"bottom"
    if directory_format.tree:
        tree = re_pb2.Tree.FromString(store.read(Digest.from_proto(out.tree_digest)))
        assert len(tree.children) == DEPTH  # every level differs from the others


def test_output_name_that_is_not_utf8_is_invalid_argument_naming_the_path(tmp_path):
    os.makedirs(tmp_path / "out" / "sub")
    open(os.path.join(os.fsencode(tmp_path / "out" / "sub"), b"caf\xe9"), "wb").close()
    store = MemoryStore()
    with pytest.raises(InvalidArgument) as raised:
        capture_outputs(str(tmp_path), _spec(output_paths=["out"]), store)
    assert "b'out/sub/caf\\xe9'" in str(raised.value) and "not valid UTF-8" in str(raised.value)
    assert len(store) == 0  # refused while scanning: nothing stored


@pytest.mark.parametrize("top_level", [True, False])
def test_symlink_target_that_is_not_utf8_is_invalid_argument_naming_the_link(tmp_path, top_level):
    (tmp_path / "out").mkdir()
    link = b"link" if top_level else b"out/link"
    os.symlink(b"\xff\xfe", os.path.join(os.fsencode(tmp_path), link))
    with pytest.raises(InvalidArgument) as raised:
        capture_outputs(str(tmp_path), _spec(output_paths=["link" if top_level else "out"]), MemoryStore())
    assert f"symlink target of {link!r}" in str(raised.value)


def test_output_path_component_longer_than_the_file_system_allows_is_invalid_argument():
    empty = Digest.of_bytes(b"")
    command = re_pb2.Command(arguments=["true"], output_paths=["out/" + "x" * 300])
    with pytest.raises(InvalidArgument, match="longer than 255 bytes"):
        check_action(empty, re_pb2.Action(), command, empty)


def test_sparse_output_costs_its_apparent_size_and_is_refused_before_a_byte_is_stored(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "small").write_bytes(b"small")
    with open(tmp_path / "out" / "sparse", "wb") as stream:
        stream.truncate(4 << 30)  # 4 GiB apparent, nothing allocated
    assert os.stat(tmp_path / "out" / "sparse").st_blocks == 0
    store = MemoryStore()
    with pytest.raises(ResourceExhausted) as raised:
        capture_outputs(str(tmp_path), _spec(output_paths=["out"]), store, max_bytes=1 << 20)
    assert "max_output_size" in str(raised.value) and str(1 << 20) in str(raised.value)
    assert len(store) == 0


def test_outputs_within_the_bound_are_captured_and_the_bound_is_exact(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 600)
    (tmp_path / "b").write_bytes(b"y" * 400)
    spec = _spec(output_paths=["a", "b"])
    captured = capture_outputs(str(tmp_path), spec, MemoryStore(), max_bytes=1000)
    assert [f.path for f in captured.result.output_files] == ["a", "b"]
    with pytest.raises(ResourceExhausted):
        capture_outputs(str(tmp_path), spec, MemoryStore(), max_bytes=999)


def test_many_links_to_one_big_file_cost_it_once(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "big").write_bytes(b"z" * 1000)
    for i in range(50):
        os.link(tmp_path / "out" / "big", tmp_path / "out" / f"link{i}")
    captured = capture_outputs(str(tmp_path), _spec(output_paths=["out", "out/big"]), MemoryStore(), max_bytes=1000)
    assert len(captured.result.output_directories) == 1 and len(captured.result.output_files) == 1


def test_unmodified_inputs_in_an_output_cost_nothing(tmp_path):
    # BuildStream's "." output holds the whole sysroot it was given: those bytes are inputs.
    (tmp_path / "usr").mkdir()
    (tmp_path / "usr" / "libc.so").write_bytes(b"L" * 5000)
    (tmp_path / "new.o").write_bytes(b"o" * 10)
    input_digest = Digest.of_bytes(b"L" * 5000)

    def known(parts, st):
        return input_digest if parts == ("usr", "libc.so") else None

    captured = capture_outputs(str(tmp_path), _spec(output_paths=["."]), MemoryStore(), known=known, max_bytes=10)
    assert input_digest in captured.blobs
