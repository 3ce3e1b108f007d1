"""The output walk: every directory once, parents first, no symlink followed, and a
bounded number of descriptors even where closed ancestors must be reopened."""

import errno
import os

import pytest

from reapi_worker.worker import output_walk
from reapi_worker.worker.output_walk import walk


def _comb(top, depth):
    """``d/d/.../d`` with a sibling ``e/`` (holding a file) at every level: coming back up
    from the deep ``d``, the walk must reopen ancestors it closed to visit each ``e``."""
    expected = [()]
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    parts = ()
    for _ in range(depth):
        os.mkdir("e", dir_fd=fd)
        os.close(os.open("e/file", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
        expected += [parts + ("d",), parts + ("e",)]
        parts += ("d",)
    os.close(fd)
    return expected


def test_every_directory_is_visited_once_parents_first_with_a_bounded_number_of_descriptors(tmp_path, monkeypatch):
    monkeypatch.setattr(output_walk, "OPEN_DIRECTORIES", 4)
    expected = _comb(str(tmp_path), 40)
    visited, most_open = [], 0
    before = len(os.listdir("/proc/self/fd"))
    base = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)

    def visit(parts, fd):
        nonlocal most_open
        most_open = max(most_open, len(os.listdir("/proc/self/fd")) - before)
        assert os.path.samestat(os.fstat(fd), os.stat(os.path.join(tmp_path, *parts)))
        visited.append(parts)
        return sorted(entry.name for entry in os.scandir(fd) if entry.is_dir(follow_symlinks=False))

    try:
        walk(base, (), visit)
    finally:
        os.close(base)
    assert sorted(visited) == sorted(expected) and len(visited) == len(expected)
    assert all(visited.index(p[:-1]) < visited.index(p) for p in visited if p)
    assert most_open <= 1 + 1 + 4 + 1  # base, the walk's top, the window, the listing's own in visit
    assert len(os.listdir("/proc/self/fd")) == before  # everything closed


def test_a_symlink_to_a_directory_is_not_walked_into(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink("/etc", tmp_path / "real" / "etc")
    visited = []
    base = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # Even when the caller names the symlink as a subdirectory, the open refuses it.
        with pytest.raises(OSError) as raised:
            walk(base, ("real",), lambda parts, fd: visited.append(parts) or ["etc"])
        assert raised.value.errno in (errno.ELOOP, errno.ENOTDIR)  # O_NOFOLLOW
    finally:
        os.close(base)
    assert visited == [("real",)]
