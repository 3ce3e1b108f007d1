"""The tree comparison the BuildStream system test relies on: it must report every kind of
difference it claims to compare, and nothing for equal trees."""

from __future__ import annotations

import os

from tree_diff import tree_differences


def _tree(top: str) -> str:
    os.makedirs(os.path.join(top, "a", "b"))
    os.makedirs(os.path.join(top, "empty"))
    for name, data, mode in (("a/b/f", b"bytes", 0o644), ("a/x", b"#!/bin/sh\n", 0o755), ("same-size", b"abc", 0o644)):
        with open(os.path.join(top, name), "wb") as stream:
            stream.write(data)
        os.chmod(os.path.join(top, name), mode)
    os.symlink("a/b/f", os.path.join(top, "link"))
    os.symlink("/nowhere", os.path.join(top, "dangling"))
    return top


def test_equal_trees_have_no_differences(tmp_path):
    assert tree_differences(_tree(str(tmp_path / "l")), _tree(str(tmp_path / "r"))) == []


def test_every_kind_of_difference_is_reported(tmp_path):
    left, right = _tree(str(tmp_path / "l")), _tree(str(tmp_path / "r"))
    os.rmdir(os.path.join(right, "empty"))                      # an empty directory missing
    os.makedirs(os.path.join(right, "extra"))                   # one more
    os.chmod(os.path.join(right, "a", "x"), 0o644)              # an executable bit lost
    with open(os.path.join(right, "a", "b", "f"), "ab") as stream:
        stream.write(b"!")                                      # a size
    with open(os.path.join(right, "same-size"), "wb") as stream:
        stream.write(b"abd")                                    # bytes at the same size
    os.remove(os.path.join(right, "link"))
    os.symlink("a/x", os.path.join(right, "link"))              # a symlink target
    os.remove(os.path.join(right, "dangling"))
    with open(os.path.join(right, "dangling"), "wb"):
        pass                                                    # a symlink became a file
    assert tree_differences(left, right) == [
        "a/b/f: 5 bytes vs 6 bytes",
        "a/x: mode 0755 vs 0644",
        "dangling: symlink vs file",
        f"empty: only in {left}",
        f"extra: only in {right}",
        "link: symlink to 'a/b/f' vs 'a/x'",
        "same-size: same size, different bytes",
    ]
