"""TreeFacts: sizes remembered by Directory digest (in-memory store)."""

from __future__ import annotations

from reapi_worker.storage.content import MemoryStore
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.tree_facts import TreeFacts, TreeSize


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
