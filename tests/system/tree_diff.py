"""Compare two file trees as a build's output: every difference, not just the first.

What counts: which names exist, each entry's type, permission bits, a file's bytes, a
symlink's target (never followed), and empty directories (a directory is an entry like any
other). Not compared: timestamps, owners, inode numbers, hardlink counts.
"""

from __future__ import annotations

import os
import stat


def _entries(top: str) -> dict[str, os.stat_result]:
    """Every path under ``top`` (relative, ``/``-separated), lstat'ed; ``top`` itself is ``.``."""
    found = {".": os.lstat(top)}
    for parent, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(parent, name)
            found[os.path.relpath(path, top)] = os.lstat(path)
    return found


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink")):
        if test(mode):
            return name
    return f"special ({stat.S_IFMT(mode):o})"


def _same_bytes(a: str, b: str) -> bool:
    with open(a, "rb") as left, open(b, "rb") as right:
        while True:
            chunk_a, chunk_b = left.read(1 << 20), right.read(1 << 20)
            if chunk_a != chunk_b:
                return False
            if not chunk_a:
                return True


def tree_differences(left: str, right: str) -> list[str]:
    """Every difference between the trees at ``left`` and ``right``, one line each, sorted by
    path; an empty list means they are equal in everything this module compares."""
    a, b = _entries(left), _entries(right)
    differences = []
    for path in sorted(a.keys() | b.keys()):
        if path not in b:
            differences.append(f"{path}: only in {left}")
            continue
        if path not in a:
            differences.append(f"{path}: only in {right}")
            continue
        kind_a, kind_b = _kind(a[path].st_mode), _kind(b[path].st_mode)
        if kind_a != kind_b:
            differences.append(f"{path}: {kind_a} vs {kind_b}")
            continue
        mode_a, mode_b = stat.S_IMODE(a[path].st_mode), stat.S_IMODE(b[path].st_mode)
        if kind_a != "symlink" and mode_a != mode_b:
            differences.append(f"{path}: mode {mode_a:04o} vs {mode_b:04o}")
        full_a, full_b = os.path.join(left, path), os.path.join(right, path)
        if kind_a == "symlink":
            target_a, target_b = os.readlink(full_a), os.readlink(full_b)
            if target_a != target_b:
                differences.append(f"{path}: symlink to {target_a!r} vs {target_b!r}")
        elif kind_a == "file":
            if a[path].st_size != b[path].st_size:
                differences.append(f"{path}: {a[path].st_size} bytes vs {b[path].st_size} bytes")
            elif not _same_bytes(full_a, full_b):
                differences.append(f"{path}: same size, different bytes")
    return differences
