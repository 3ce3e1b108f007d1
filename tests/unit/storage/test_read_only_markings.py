"""``SubtreeReadOnly`` markings read from a CAS tree, and the nearest-marking-wins reduction."""

from __future__ import annotations

import os
import threading

import pytest

from fakes.marked_trees import MARK, store_marked_tree

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import InvalidArgument, MissingBlobs
from reapi_worker.storage.content import MemoryStore
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.local_cas import LocalCAS
from reapi_worker.storage.read_only_markings import MarkingsMemo, read_only_changes, read_only_markings


def markings(spec: dict, memo: MarkingsMemo | None = None, store: MemoryStore | LocalCAS | None = None):
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


def _big_tree(marked_at: tuple[str, ...] | None = None, value: str = "true") -> dict:
    """Many directories three levels deep, files in each; one marking at ``marked_at``."""
    tree: dict = {f"p{i}": {f"d{j}": {f"e{k}": {"f.c": b"%d" % (i * 100 + j * 10 + k)} for k in range(3)}
                            for j in range(4)} for i in range(12)}
    if marked_at is not None:
        node = tree
        for name in marked_at:
            node = node[name]
        node[MARK] = value
    return tree


def test_a_tree_without_markings_is_remembered_as_such_in_every_subtree():
    """The shortcut for the common case (no combine pass) still fills the memo for every
    node: a later tree sharing any of them reads only its new nodes."""
    store, memo = MemoryStore(), MarkingsMemo()
    assert markings(_big_tree(), memo, store) == ()
    before = store.reads
    assert markings({"new": _big_tree()["p3"], "also": _big_tree()["p7"]["d1"]}, memo, store) == ()
    assert store.reads - before == 1  # the new root alone


def test_a_marking_deep_in_a_big_tree_is_found():
    assert markings(_big_tree(("p9", "d2", "e1"))) == ((("p9", "d2", "e1"), True),)


def test_a_subtree_known_unmarked_under_a_new_marked_parent_is_covered_by_it():
    """The memo says a shared subtree has no marking of its own; the new tree marks a
    directory above it and another deep in its new part: both are found, with paths."""
    store, memo = MemoryStore(), MarkingsMemo()
    shared = _big_tree()["p5"]
    assert markings({"lib": shared, "src": {"a": b"1"}}, memo, store) == ()
    before = store.reads
    found = markings({"sys": {MARK: "true", "lib": shared}, "src": {"x": {"y": {MARK: "false"}}}}, memo, store)
    assert found == ((("src", "x", "y"), False), (("sys",), True))
    assert read_only_changes(found) == ((("sys",), True),)
    assert store.reads - before == 5  # root, sys, src, x, y: never the shared subtree


def test_a_known_subtree_with_a_marking_is_reported_at_each_new_place():
    store, memo = MemoryStore(), MarkingsMemo()
    marked = _big_tree(("p1", "d3"), "false")["p1"]
    assert markings({"a": marked}, memo, store) == ((("a", "d3"), False),)
    assert markings({"b": {"c": marked}, "z": marked}, memo, store) == (
        (("b", "c", "d3"), False), (("z", "d3"), False),
    )


def test_the_propertys_name_elsewhere_in_a_directory_is_no_marking():
    """The byte check that skips the property scan is only a shortcut: the name as a file
    name, or as another property's value, marks nothing; another property beside it does
    not hide it."""
    store = MemoryStore()
    decoy = re_pb2.Directory(files=[re_pb2.FileNode(name="SubtreeReadOnly", digest=store.write(b"x").to_proto())])
    decoy.node_properties.properties.add(name="Other", value="SubtreeReadOnly")
    marked = re_pb2.Directory()
    marked.node_properties.properties.add(name="Before", value="x")
    marked.node_properties.properties.add(name="SubtreeReadOnly", value="false")
    root = store.write(serialize(re_pb2.Directory(directories=[
        re_pb2.DirectoryNode(name="decoy", digest=store.write(serialize(decoy)).to_proto()),
        re_pb2.DirectoryNode(name="marked", digest=store.write(serialize(marked)).to_proto()),
    ])))
    assert read_only_markings(CasDirectory.from_digest(store, root)) == ((("marked",), False),)


def test_a_directory_blob_that_is_not_a_directory_proto_is_invalid_argument_naming_it():
    store = MemoryStore()
    junk = store.write(b"\xff\xff\xff not a proto")
    root = store.write(serialize(re_pb2.Directory(
        directories=[re_pb2.DirectoryNode(name="a", digest=junk.to_proto())])))
    with pytest.raises(InvalidArgument, match=r"at 'a' is not a Directory proto"):
        read_only_markings(CasDirectory.from_digest(store, root))


# -- reading the local cache's files directly --------------------------------------------------


@pytest.fixture
def cache(tmp_path):
    with LocalCAS(tmp_path / "cas", max_bytes=1 << 30) as local:
        yield local


def test_a_tree_in_a_local_cache_is_read_from_its_files(cache):
    assert markings(_big_tree(("p2", "d0", "e2")), store=cache) == ((("p2", "d0", "e2"), True),)


def test_a_directory_file_gone_from_the_cache_is_missing_blobs_naming_it(cache):
    root = store_marked_tree(cache, {"a": {"b": {MARK: "true"}}})
    gone = Digest.of_bytes(serialize(_marked_directory("true")))
    os.unlink(cache.object_path(gone))
    with pytest.raises(MissingBlobs) as raised:
        read_only_markings(CasDirectory.from_digest(cache, root))
    assert raised.value.digests == [gone]
    assert "loading directory 'a/b'" in str(raised.value)


def test_a_directory_file_of_the_wrong_size_is_not_trusted(cache):
    """A file that does not hold the blob whole is never parsed: the store's own read
    decides (here: the cache refuses it, MissingBlobs)."""
    root = store_marked_tree(cache, {"a": {"b": {MARK: "true"}}})
    torn = Digest.of_bytes(serialize(_marked_directory("true")))
    path = cache.object_path(torn)
    os.chmod(path, 0o644)
    with open(path, "r+b") as blob:
        blob.truncate(torn.size_bytes - 1)
    with pytest.raises(MissingBlobs) as raised:
        read_only_markings(CasDirectory.from_digest(cache, root))
    assert raised.value.digests == [torn]


def _marked_directory(value: str) -> re_pb2.Directory:
    directory = re_pb2.Directory()
    directory.node_properties.properties.add(name="SubtreeReadOnly", value=value)
    return directory


def test_walks_in_several_threads_sharing_one_memo_agree_with_a_walk_alone():
    """Actions run concurrently and share the executor's memo: walks of trees that share
    subtrees, at once, each give what a walk with a memo of its own gives."""
    store, shared = MemoryStore(), MarkingsMemo(max_entries=40)  # small: evictions meanwhile
    specs = [_big_tree((f"p{i}", "d1"), "true" if i % 2 else "false") for i in range(8)]
    roots = [store_marked_tree(store, spec) for spec in specs]
    expected = [read_only_markings(CasDirectory.from_digest(store, root)) for root in roots]
    results: list[list] = [[] for _ in roots]

    def walk(index: int) -> None:
        for _ in range(5):
            results[index].append(read_only_markings(CasDirectory.from_digest(store, roots[index]), shared))

    threads = [threading.Thread(target=walk, args=(i,)) for i in range(len(roots))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [[markings] * 5 for markings in expected]


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
