"""storage/tree_removal.py and the TreeRemover on it: trees an action shapes are removed.

Named after the attacks: a tree deeper than Python's recursion limit and longer than
PATH_MAX, directories left unwritable, a bug in the middle of the remover's queue.
"""

from __future__ import annotations

import logging
import os
import sys

import pytest

from reapi_worker.storage import staging
from reapi_worker.storage.staging import TreeRemover
from reapi_worker.storage.tree_removal import remove_tree


def make_deep(top: str, depth: int) -> None:
    """``top/d/d/.../d/leaf`` ``depth`` levels deep, built through descriptors (the path is
    longer than PATH_MAX)."""
    os.mkdir(top)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as leaf:
        leaf.write("x")
    os.close(fd)


def test_a_tree_5000_levels_deep_is_removed(tmp_path):
    top = str(tmp_path / "deep")
    make_deep(top, 5000)
    assert 5000 * 2 > os.pathconf(str(tmp_path), "PC_PATH_MAX")  # no path reaches the leaf
    assert 5000 > sys.getrecursionlimit()
    remove_tree(top)
    assert not os.path.lexists(top)


def test_a_wide_tree_with_files_links_and_fifos_is_removed(tmp_path):
    top = tmp_path / "wide"
    for i in range(30):
        sub = top / f"dir{i}" / "inner"
        sub.mkdir(parents=True)
        (sub / "file").write_bytes(b"x" * i)
        os.symlink("/etc/passwd", sub / "link-out")
        os.mkfifo(sub / "fifo")
    outside = tmp_path / "outside"
    outside.write_text("kept")
    os.symlink(outside, top / "dir0" / "to-outside")
    remove_tree(str(top))
    assert not top.exists()
    assert outside.read_text() == "kept"  # a symlink is removed, never followed


def test_a_file_at_the_top_is_unlinked_and_an_absent_one_is_no_error(tmp_path):
    single = tmp_path / "single"
    single.write_text("x")
    remove_tree(str(single))
    assert not single.exists()
    remove_tree(str(tmp_path / "absent"))


def test_directories_left_mode_0000_are_removed(tmp_path):
    top = tmp_path / "locked"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "f").write_text("x")
    os.chmod(top / "a" / "b", 0)
    os.chmod(top / "a", 0o500)
    remove_tree(str(top))
    assert not top.exists()


def test_the_remover_survives_a_failing_tree_and_removes_the_next(tmp_path, monkeypatch, caplog):
    calls = []
    real = staging.remove_tree

    def flaky(path: str) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise RuntimeError("a bug in the remover")
        real(path)

    monkeypatch.setattr(staging, "remove_tree", flaky)
    remover = TreeRemover(str(tmp_path / ".trash"))
    for name in ("first", "second"):
        make_deep(str(tmp_path / name), 3)
    with caplog.at_level(logging.ERROR):
        remover.remove(str(tmp_path / "first"))
        remover.remove(str(tmp_path / "second"))
        remover.drain()
    assert len(calls) == 2
    assert "a bug in the remover" in caplog.text
    assert os.listdir(tmp_path / ".trash") == [os.path.basename(calls[0])]  # only the failed one left


def test_the_remover_removes_a_deep_tree_and_keeps_working(tmp_path):
    remover = TreeRemover(str(tmp_path / ".trash"))
    make_deep(str(tmp_path / "deep"), 5000)
    remover.remove(str(tmp_path / "deep"))
    (tmp_path / "after").mkdir()
    remover.remove(str(tmp_path / "after"))
    remover.drain()
    assert os.listdir(tmp_path / ".trash") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_a_mount_inside_a_tree_is_not_entered(tmp_path):
    top = tmp_path / "with-mount"
    point = top / "m"
    point.mkdir(parents=True)
    import subprocess

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)], check=True)
    try:
        (point / "precious").write_text("x")
        with pytest.raises(OSError) as raised:
            remove_tree(str(top))
        assert raised.value.errno == 16  # EBUSY, naming the mount point
        assert (point / "precious").read_text() == "x"
    finally:
        subprocess.run(["umount", str(point)], check=True)
    remove_tree(str(top))
    assert not top.exists()
