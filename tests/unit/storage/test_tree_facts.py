"""TreeFacts: sizes and completeness remembered by Directory digest (in-memory store)."""

from __future__ import annotations

import pytest

from reapi_worker.protos.errors import MissingBlobs
from reapi_worker.storage.content import MemoryStore
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.tree_facts import TreeFacts, TreeSize


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _tree(store: MemoryStore) -> Digest:
    tree = CasDirectory.empty(store)
    for path in ("a/x", "a/y", "b/c/z", "top"):
        parent = path.rpartition("/")[0]
        if parent:
            tree.mkdir(parent)
        tree.write_bytes(path, path.encode() * 3)
    tree.mkdir("a/empty")
    tree.symlink("link", "top")
    return tree.digest()


def test_size_counts_files_directories_and_bytes_and_is_remembered_by_digest():
    store = MemoryStore()
    root = _tree(store)
    facts = TreeFacts()
    # directories: the root, a, a/empty, b, b/c
    expected = TreeSize(files=4, directories=5, bytes=sum(3 * len(p) for p in ("a/x", "a/y", "b/c/z", "top")))
    assert facts.size(CasDirectory.from_digest(store, root)) == expected
    reads = store.reads
    assert facts.size(CasDirectory.from_digest(store, root)) == expected  # a new tree object
    assert store.reads == reads  # not one Directory read again


def test_a_new_root_sharing_a_subtree_reads_only_its_new_parts():
    store = MemoryStore()
    first = CasDirectory.from_digest(store, _tree(store))
    facts = TreeFacts()
    facts.size(first)
    second = CasDirectory.from_digest(store, _tree(store))
    second.write_bytes("new", b"new")
    root = second.digest()
    reads = store.reads
    assert facts.size(CasDirectory.from_digest(store, root)).files == 5
    assert store.reads - reads == 1  # the new root only: a, b, b/c are known


def test_check_complete_names_every_missing_blob():
    store = MemoryStore()
    root = _tree(store)
    complete = MemoryStore()
    for digest in store:
        complete.write(store.read(digest))
    gone = [Digest.of_bytes(b"a/x" * 3), Digest.of_bytes(b"b/c/z" * 3)]
    partial = MemoryStore()
    for digest in store:
        if digest not in gone:
            partial.write(store.read(digest))
    with pytest.raises(MissingBlobs) as raised:
        TreeFacts().check_complete(CasDirectory.from_digest(partial, root), partial)
    assert raised.value.digests == sorted(gone)
    TreeFacts().check_complete(CasDirectory.from_digest(complete, root), complete)


def test_a_complete_tree_is_trusted_for_the_ttl_then_checked_again():
    store = MemoryStore()
    root = _tree(store)
    clock = Clock()
    facts = TreeFacts(complete_ttl=10, clock=clock)
    facts.check_complete(CasDirectory.from_digest(store, root), store)
    reads = store.reads
    clock.now = 9
    facts.check_complete(CasDirectory.from_digest(store, root), store)
    assert store.reads == reads  # the root is known complete: nothing read
    clock.now = 11
    facts.check_complete(CasDirectory.from_digest(store, root), store)
    assert store.reads > reads


def test_a_missing_blob_marks_nothing_complete():
    store = MemoryStore()
    tree = CasDirectory.empty(store)
    tree.write_bytes("f", b"f")
    root = tree.digest()
    empty = MemoryStore()
    empty.write(store.read(root))
    facts = TreeFacts()
    for _ in range(2):
        with pytest.raises(MissingBlobs):
            facts.check_complete(CasDirectory.from_digest(empty, root), empty)
