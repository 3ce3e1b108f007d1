"""What only the CAS backend promises: lazy loading, per-node digest caching, Trees,
and the extra API the executor uses (file_digests, directory_protos, from_tree)."""

from __future__ import annotations

import io
from typing import BinaryIO

from directory_helpers import build_in, snapshot
from reapi_worker.protos import re_pb2
from reapi_worker.storage.content import MemoryStore
from reapi_worker.storage.digests import EMPTY_DIGEST, Digest, serialize
from reapi_worker.storage.directory import CasDirectory

TREE = {
    "a/b/c/f": b"deep",
    "a/b/g": ("x", b"exec"),
    "a/same1/f": b"dup",
    "a/same2/f": b"dup",
    "z/l": ("->", "../a"),
    "z/empty": None,
    "top": b"deep",
}


class CountingStore(MemoryStore):
    """A MemoryStore that counts writes, and the streams it was handed."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[Digest] = []
        self.streams = 0

    def write(self, data: bytes) -> Digest:
        digest = super().write(data)
        self.writes.append(digest)
        return digest

    def write_stream(self, stream: BinaryIO) -> Digest:
        self.streams += 1
        return super().write_stream(stream)


def _stored_tree() -> tuple[MemoryStore, Digest]:
    store = MemoryStore()
    return store, build_in(CasDirectory.empty(store), TREE).digest()


def test_a_tree_reloads_from_its_digest() -> None:
    store, digest = _stored_tree()
    original = build_in(CasDirectory.empty(MemoryStore()), TREE)
    assert snapshot(CasDirectory.from_digest(store, digest)) == snapshot(original)


def test_nodes_are_read_on_first_visit_only() -> None:
    store, digest = _stored_tree()
    store.reads = 0
    tree = CasDirectory.from_digest(store, digest)
    assert tree.digest() == digest and store.reads == 0
    tree.list()
    assert store.reads == 1
    node = tree.descend("a/b")
    assert store.reads == 2  # a was read to find b; b itself not yet
    node.list()
    assert store.reads == 3
    tree.descend("a/b")
    tree.stat("a/b/g")
    assert store.reads == 3
    tree.remove("z", recursive=True)  # removing an unread subtree needs no read
    assert store.reads == 3


def test_an_edit_recomputes_only_the_nodes_on_its_path() -> None:
    store = CountingStore()
    tree = build_in(CasDirectory.empty(store), TREE)
    tree.digest()
    store.writes.clear()
    tree.write_bytes("a/b/c/f", b"changed")
    assert store.writes == [Digest.of_bytes(b"changed")]
    new_root = tree.digest()
    # the file blob, then a/b/c, a/b, a and the root: nothing else is rebuilt
    assert len(store.writes) == 5
    assert store.writes[-1] == new_root
    store.writes.clear()
    assert tree.digest() == new_root and store.writes == []


def test_a_digest_of_an_unchanged_loaded_tree_writes_nothing() -> None:
    base, digest = _stored_tree()
    store = CountingStore()
    for blob in base:
        store.write(base.read(blob))
    store.writes.clear()
    tree = CasDirectory.from_digest(store, digest)
    snapshot(tree)
    assert tree.digest() == digest
    assert store.writes == []


def test_edits_of_a_descended_node_clear_digests_up_to_the_root() -> None:
    store, digest = _stored_tree()
    tree = CasDirectory.from_digest(store, digest)
    deep = tree.descend("a/b/c")
    mid = tree.stat("a").digest
    deep.write_bytes("new", b"n")
    assert tree.digest() != digest
    assert tree.stat("a").digest != mid
    deep.remove("new")
    assert tree.digest() == digest


def test_remove_of_an_unread_empty_directory_needs_no_read() -> None:
    store = MemoryStore()
    tree = CasDirectory.from_digest(store, build_in(CasDirectory.empty(store), {"e": None}).digest())
    tree.list()
    store.reads = 0
    tree.remove("e")
    assert store.reads == 0


def test_copy_shares_nodes_and_rename_moves_them() -> None:
    store, digest = _stored_tree()
    tree = CasDirectory.from_digest(store, digest)
    tree.copy("a", "a2")
    tree.rename("z", "a2/z")
    node = tree.descend("a2/z")
    node.write_bytes("x", b"x")  # the moved node is still part of the tree
    assert tree.read_bytes("a2/z/x") == b"x"
    assert tree.stat("a2/b").digest == tree.stat("a/b").digest


def test_write_stream_streams_into_the_store() -> None:
    store = CountingStore()
    tree = CasDirectory.empty(store)
    tree.write_stream("f", io.BytesIO(b"streamed"), executable=True)
    assert store.streams == 1
    assert store.read(tree.stat("f").digest) == b"streamed"  # type: ignore[arg-type]


def test_file_digests_lists_every_file_with_its_bit() -> None:
    store, digest = _stored_tree()
    files = sorted(CasDirectory.from_digest(store, digest).file_digests())
    assert files == sorted([
        (Digest.of_bytes(b"deep"), False), (Digest.of_bytes(b"exec"), True),
        (Digest.of_bytes(b"dup"), False), (Digest.of_bytes(b"dup"), False), (Digest.of_bytes(b"deep"), False),
    ])


def test_directory_protos_are_distinct_and_hash_to_their_digests() -> None:
    store, digest = _stored_tree()
    protos = list(CasDirectory.from_digest(store, digest).directory_protos())
    assert protos[0][0] == digest
    digests = [d for d, _ in protos]
    assert len(digests) == len(set(digests))
    for d, proto in protos:
        assert Digest.of_bytes(serialize(proto)) == d
    # root, a, a/b, a/b/c, a/same1 (== a/same2), z, z/empty
    assert len(protos) == 7
    assert EMPTY_DIGEST in digests


def test_to_tree_and_from_tree_round_trip() -> None:
    store, digest = _stored_tree()
    tree = CasDirectory.from_digest(store, digest).to_tree()
    assert Digest.of_message(tree.root) == digest
    assert len(tree.children) == 6
    assert len({Digest.of_message(child) for child in tree.children}) == 6
    again = re_pb2.Tree.FromString(serialize(tree))
    fresh = MemoryStore()
    for blob in store:  # file blobs only matter for read_bytes, copy them all
        fresh.write(store.read(blob))
    other = MemoryStore()
    loaded = CasDirectory.from_tree(other, again)
    assert loaded.digest() == digest
    assert [(p, s) for p, s in loaded.walk()] == [(p, s) for p, s in CasDirectory.from_digest(fresh, digest).walk()]


def test_import_from_a_tree_on_another_store_copies_the_blobs() -> None:
    store, digest = _stored_tree()
    other = MemoryStore()
    target = CasDirectory.empty(other)
    target.import_files(CasDirectory.from_digest(store, digest))
    assert target.digest() == digest
    assert snapshot(CasDirectory.from_digest(other, digest)) == snapshot(CasDirectory.from_digest(store, digest))


def test_import_from_the_same_store_shares_blobs() -> None:
    store = CountingStore()
    source = build_in(CasDirectory.empty(store), TREE)
    source.digest()
    store.writes.clear()
    target = CasDirectory.empty(store)
    target.import_files(source)
    assert not any(d in store.writes for d, _ in source.file_digests())
