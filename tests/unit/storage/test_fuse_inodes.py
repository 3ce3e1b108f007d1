"""The FUSE inode table on in-memory trees: numbering, sharing, lifetimes."""

from __future__ import annotations

import pytest

from reapi_worker.storage.content import MemoryStore
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.fuse.inodes import ROOT_INODE, ActionRoot, DirInode, FileInode, InodeTable, LinkInode, NotLoaded


def _root(store: MemoryStore, token: str, files: dict[str, bytes]) -> ActionRoot:
    tree = CasDirectory.empty(store)
    for path, data in files.items():
        parent = path.rpartition("/")[0]
        if parent:
            tree.mkdir(parent)
        tree.write_bytes(path, data)
    tree.symlink("link", "a")
    return ActionRoot(token, CasDirectory.from_digest(store, tree.digest()), store, 65534, 65534, 1.0)  # type: ignore[arg-type]


def _lookup(table: InodeTable, parent: int, name: str):  # type: ignore[no-untyped-def]
    while True:
        try:
            return table.lookup(parent, name)
        except NotLoaded as pending:
            pending.node.entries()  # what the file system does, outside the lock


def test_a_blob_is_one_inode_across_roots_and_directories_are_per_root():
    store = MemoryStore()
    table = InodeTable()
    one, two = _root(store, "one", {"a": b"same", "d/b": b"x"}), _root(store, "two", {"a": b"same", "d/b": b"y"})
    table.add_root(one)
    table.add_root(two)
    file_one = _lookup(table, one.inode, "a")
    file_two = _lookup(table, two.inode, "a")
    assert isinstance(file_one, FileInode) and file_one is file_two and file_one.nlookup == 2
    dir_one, dir_two = _lookup(table, one.inode, "d"), _lookup(table, two.inode, "d")
    assert isinstance(dir_one, DirInode) and dir_one.ino != dir_two.ino
    assert _lookup(table, one.inode, "d") is dir_one  # stable while the root lives
    assert isinstance(_lookup(table, one.inode, "link"), LinkInode)
    assert _lookup(table, one.inode, "absent") is None
    assert _lookup(table, ROOT_INODE, "one").ino == one.inode


def test_removing_a_root_drops_its_directories_and_forget_drops_files():
    store = MemoryStore()
    table = InodeTable()
    root = _root(store, "r", {"d/f": b"f"})
    table.add_root(root)
    directory = _lookup(table, root.inode, "d")
    file = _lookup(table, directory.ino, "f")
    table.remove_root("r")
    assert table.get(directory.ino) is None and table.get(root.inode) is None
    assert _lookup(table, ROOT_INODE, "r") is None
    assert table.get(file.ino) is file  # the kernel still knows it
    table.forget(file.ino, 1)
    assert table.get(file.ino) is None
    with pytest.raises(KeyError):
        table.lookup(directory.ino, "f")  # a stale parent: the file system answers ESTALE
