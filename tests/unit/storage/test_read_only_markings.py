"""``SubtreeReadOnly`` markings read from a CAS tree, and the nearest-marking-wins reduction."""

from __future__ import annotations

import pytest

from fakes.marked_trees import MARK, store_marked_tree

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import InvalidArgument, MissingBlobs
from reapi_worker.storage.content import MemoryStore
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.read_only_markings import MarkingsMemo, read_only_changes, read_only_markings


def markings(spec: dict, memo: MarkingsMemo | None = None, store: MemoryStore | None = None):
    store = MemoryStore() if store is None else store  # (an empty store is falsy)
    return read_only_markings(CasDirectory.from_digest(store, store_marked_tree(store, spec)), memo)


# -- reading -----------------------------------------------------------------------------------


def test_an_unmarked_tree_has_no_markings():
    assert markings({"a": {"b": {"f": b"x"}}, "g": b"y"}) == ()


def test_markings_are_listed_parents_first_with_their_paths():
    spec = {MARK: "true", "b": {MARK: "false", "c": {MARK: "true"}}, "a": {"x": {MARK: "false"}}}
    assert markings(spec) == (
        ((), True), (("a", "x"), False), (("b",), False), (("b", "c"), True),
    )


def test_a_value_other_than_true_or_false_is_invalid_argument_naming_the_directory():
    with pytest.raises(InvalidArgument, match=r"'a/b'.*SubtreeReadOnly='TRUE'"):
        markings({"a": {"b": {MARK: "TRUE"}}})


def test_identical_subtrees_at_two_places_are_both_reported():
    same = {MARK: "true", "f": b"x"}
    assert markings({"one": dict(same), "two": dict(same)}) == ((("one",), True), (("two",), True))


def test_nodes_not_loaded_are_read_shallowly_and_stay_unloaded():
    """The walk a lazy stager pays before the command builds no file entries."""
    store = MemoryStore()
    spec = {"a": {MARK: "true", "b": {"f": b"x", MARK: "false"}}, "g": b"y"}
    root = CasDirectory.from_digest(store, store_marked_tree(store, spec))
    assert read_only_markings(root) == ((("a",), True), (("a", "b"), False))
    assert root.loaded_entries() is None
    loaded = CasDirectory.from_digest(store, root.digest())
    loaded.entries()["a"].entries()  # type: ignore[union-attr]  # partly loaded: both ways meet
    assert read_only_markings(loaded) == read_only_markings(root)


def test_a_hostile_subdirectory_name_in_a_node_read_shallowly_is_refused():
    store = MemoryStore()
    inner = store.write(serialize(re_pb2.Directory()))
    hostile = re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="..", digest=inner.to_proto())])
    root = store.write(serialize(re_pb2.Directory(directories=[
        re_pb2.DirectoryNode(name="a", digest=store.write(serialize(hostile)).to_proto())])))
    with pytest.raises(InvalidArgument, match=r"at 'a': entry '\.\.'"):
        read_only_markings(CasDirectory.from_digest(store, root))


def test_an_absent_directory_read_shallowly_is_named():
    store = MemoryStore()
    gone = Digest.of_bytes(serialize(re_pb2.Directory(files=[re_pb2.FileNode(name="f")])))
    root = store.write(serialize(re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="a", digest=gone.to_proto())])))
    with pytest.raises(MissingBlobs) as raised:
        read_only_markings(CasDirectory.from_digest(store, root))
    assert raised.value.digests == [gone]
    assert "loading directory 'a'" in str(raised.value)


def test_a_subtree_seen_before_is_not_visited_again():
    store, memo = MemoryStore(), MarkingsMemo()
    toolchain = {"bin": {"cc": b"cc"}, "lib": {MARK: "true", "libc": b"c"}}
    assert markings({"usr": toolchain, "src": {"a": b"1"}}, memo, store) == ((("usr", "lib"), True),)
    before = store.reads
    # A new root sharing the toolchain: only the root and src2 are read.
    assert markings({"usr": toolchain, "src2": {"b": b"2"}}, memo, store) == ((("usr", "lib"), True),)
    assert store.reads - before == 2


def test_the_memo_forgets_the_least_recently_used():
    memo = MarkingsMemo(max_entries=2)
    d1, d2, d3 = (Digest.of_bytes(bytes([i])) for i in range(3))
    memo.put(d1, ())
    memo.put(d2, ())
    memo.get(d1)
    memo.put(d3, ())
    assert memo.get(d2) is None and memo.get(d1) == () and memo.get(d3) == ()


def test_node_properties_survive_an_edit_of_the_directory():
    store = MemoryStore()
    root = CasDirectory.from_digest(store, store_marked_tree(store, {MARK: "true", "a": b"1"}))
    assert dict(root.node_properties()) == {"SubtreeReadOnly": "true"}
    root.write_bytes("b", b"2")
    reloaded = CasDirectory.from_digest(store, root.digest())
    assert dict(reloaded.node_properties()) == {"SubtreeReadOnly": "true"}
    assert reloaded.list() == ["a", "b"]


def test_an_unedited_tree_with_node_properties_keeps_its_digest():
    store = MemoryStore()
    digest = store_marked_tree(store, {MARK: "false", "d": {MARK: "true"}})
    tree = CasDirectory.from_digest(store, digest)
    tree.descend("d").list()
    assert tree.digest() == digest
    assert tree.to_tree().root.node_properties.properties[0].value == "false"


# -- nearest marking wins ----------------------------------------------------------------------


@pytest.mark.parametrize("marked, changes", [
    ([], []),
    # a false where nothing is read-only changes nothing
    ([((), False), (("tmp",), False)], []),
    ([((), True)], [((), True)]),
    # BuildStream's shape: a read-only root, writable build dir, install root and tmp
    ([((), True), (("b", "e.bst"), False), (("install",), False), (("tmp",), False)],
     [((), True), (("b", "e.bst"), False), (("install",), False), (("tmp",), False)]),
    # a true inside a true, a false inside a false: no change
    ([((), True), (("usr",), True), (("usr", "src"), False), (("usr", "src", "x"), False)],
     [((), True), (("usr", "src"), False)]),
    # the nearest marked ancestor decides, not the root
    ([((), True), (("a",), False), (("a", "b", "c"), True), (("a", "b", "c", "d"), True)],
     [((), True), (("a",), False), (("a", "b", "c"), True)]),
    # siblings do not inherit from each other
    ([(("a",), True), (("ab",), False), (("a", "x"), False)], [(("a",), True), (("a", "x"), False)]),
])
def test_nearest_marking_wins(marked, changes):
    assert read_only_changes(tuple(marked)) == tuple(changes)
