"""Shared pieces of the Directory tests: backend factories and local tree builders.

Kept out of conftest.py so that the storage folder's conftest stays free for others;
test modules import what they use (pytest picks fixtures up from the module namespace).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterator

import pytest

from reapi_worker.storage.content import MemoryStore
from reapi_worker.storage.directory import CasDirectory, Directory, FileStat, FileSystemDirectory
from reapi_worker.storage.paths import SymlinkPolicy

BACKENDS = ["filesystem", "cas"]

# A local tree described as data: path -> bytes (file), ("x", bytes) (executable file),
# ("->", target) (symlink), None (directory). Parents are created as needed.
TreeSpec = dict[str, "bytes | tuple[str, bytes] | tuple[str, str] | None"]

DirectoryFactory = Callable[..., Directory]


def make_factory(kind: str, base: pathlib.Path) -> DirectoryFactory:
    """A function making fresh empty Directories of ``kind`` (each in its own place)."""
    counter = iter(range(1_000_000))

    def make(policy: SymlinkPolicy = SymlinkPolicy.ANY) -> Directory:
        if kind == "filesystem":
            path = base / f"fs{next(counter)}"
            path.mkdir()
            return FileSystemDirectory(path, symlink_policy=policy)
        return CasDirectory.empty(MemoryStore(), symlink_policy=policy)

    return make


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def new_dir(kind: str, tmp_path: pathlib.Path) -> DirectoryFactory:
    base = tmp_path / "trees"
    base.mkdir()
    return make_factory(kind, base)


@pytest.fixture
def d(new_dir: DirectoryFactory) -> Directory:
    """A fresh empty Directory of each backend."""
    return new_dir()


def build_local(root: pathlib.Path, spec: TreeSpec) -> pathlib.Path:
    """Create the tree ``spec`` under ``root`` (created if needed); returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for path, what in spec.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if what is None:
            target.mkdir(exist_ok=True)
        elif isinstance(what, bytes):
            target.write_bytes(what)
            target.chmod(0o644)
        elif what[0] == "x":
            assert isinstance(what[1], bytes)
            target.write_bytes(what[1])
            target.chmod(0o755)
        else:
            assert what[0] == "->" and isinstance(what[1], str)
            os.symlink(what[1], target)
    return root


def build_in(directory: Directory, spec: TreeSpec) -> Directory:
    """Create the tree ``spec`` in ``directory`` through the Directory API."""
    for path, what in spec.items():
        parent = path.rpartition("/")[0]
        if parent:
            directory.mkdir(parent)
        if what is None:
            directory.mkdir(path)
        elif isinstance(what, bytes):
            directory.write_bytes(path, what)
        elif what[0] == "x":
            assert isinstance(what[1], bytes)
            directory.write_bytes(path, what[1], executable=True)
        else:
            assert isinstance(what[1], str)
            directory.symlink(path, what[1])
    return directory


def snapshot(directory: Directory) -> list[tuple[str, FileStat, bytes | None]]:
    """Everything observable about a tree: walk() plus every file's bytes."""
    return [
        (path, stat, directory.read_bytes(path) if stat.type.value == "file" else None)
        for path, stat in directory.walk()
    ]


def local_snapshot(root: pathlib.Path) -> Iterator[tuple[str, int, str | bytes | None]]:
    """(path, mode, link target or bytes) of every entry below ``root``, sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                yield rel, st.st_mode, os.readlink(path)
            elif os.path.isdir(path):
                yield rel, st.st_mode, None
            else:
                yield rel, st.st_mode, pathlib.Path(path).read_bytes()
