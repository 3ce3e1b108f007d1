"""Inputs below a SubtreeReadOnly=false marking become the command's own files; the cache's
inodes are never written, symlinks are never followed, read-only subtrees stay as staged."""

from __future__ import annotations

import os
import stat

import pytest

from reapi_worker.protos.errors import Internal
from reapi_worker.storage.staging import Owner
from reapi_worker.storage.writable_inputs import copy_writable_inputs

OWNER = Owner(65534, 65534) if os.geteuid() == 0 else None


def _cache_file(cache: str, name: str, data: bytes, executable: bool = False) -> str:
    path = os.path.join(cache, name)
    with open(path, "wb") as stream:
        stream.write(data)
    os.chmod(path, 0o555 if executable else 0o444)
    os.utime(path, (1321009871, 1321009871))
    return path


@pytest.fixture
def staged(tmp_path):
    """A root staged as the hardlink stager does: build/ (writable), build/ro/ (read-only),
    usr/ (read-only), every file a hardlink of a 0444/0555 file (read-only to anyone but root)."""
    cache, root = tmp_path / "cache", tmp_path / "root"
    cache.mkdir()
    for d in ("build/sub", "build/ro", "usr"):
        (root / d).mkdir(parents=True)
    blobs = {
        "build/input.txt": _cache_file(str(cache), "a", b"source\n"),
        "build/sub/configure": _cache_file(str(cache), "b", b"echo hi\n", executable=True),
        "build/ro/kept": _cache_file(str(cache), "c", b"kept\n"),
        "usr/tool": _cache_file(str(cache), "d", b"tool\n", executable=True),
    }
    for path, blob in blobs.items():
        os.link(blob, root / path)
    os.symlink("/usr/tool", root / "build" / "abs-link")
    os.symlink("../usr/tool", root / "build" / "rel-link")
    return str(root), blobs


def test_files_of_a_writable_subtree_become_private_writable_copies(staged):
    root, blobs = staged
    copied = copy_writable_inputs(root, [("build",)], [("build", "ro")], OWNER)
    assert copied == 2
    for path, mode in (("build/input.txt", 0o644), ("build/sub/configure", 0o755)):
        st = os.lstat(os.path.join(root, path))
        assert stat.S_IMODE(st.st_mode) == mode
        assert st.st_nlink == 1 and st.st_ino != os.stat(blobs[path]).st_ino
        assert st.st_mtime == 1321009871
        if OWNER is not None:
            assert (st.st_uid, st.st_gid) == (OWNER.uid, OWNER.gid)
    with open(os.path.join(root, "build/input.txt"), "rb") as stream:
        assert stream.read() == b"source\n"
    assert not [n for n in os.listdir(os.path.join(root, "build")) if n.startswith(".reapi-writable-")]


def test_writing_the_copy_never_reaches_the_cache(staged):
    root, blobs = staged
    copy_writable_inputs(root, [("build",)], (), OWNER)
    with open(os.path.join(root, "build/input.txt"), "ab") as stream:
        stream.write(b"appended\n")
    with open(blobs["build/input.txt"], "rb") as stream:
        assert stream.read() == b"source\n"
    assert stat.S_IMODE(os.stat(blobs["build/input.txt"]).st_mode) == 0o444


def test_a_read_only_subtree_inside_a_writable_one_stays_as_staged(staged):
    root, blobs = staged
    copy_writable_inputs(root, [("build",)], [("build", "ro")], OWNER)
    assert os.stat(os.path.join(root, "build/ro/kept")).st_ino == os.stat(blobs["build/ro/kept"]).st_ino


def test_symlinks_are_not_followed_out_of_the_writable_subtree(staged):
    root, blobs = staged
    copy_writable_inputs(root, [("build",)], (), OWNER)
    assert os.readlink(os.path.join(root, "build/abs-link")) == "/usr/tool"
    assert os.readlink(os.path.join(root, "build/rel-link")) == "../usr/tool"
    # The file both links point at (inside the root, outside the subtree) is still the cache's.
    assert os.stat(os.path.join(root, "usr/tool")).st_ino == os.stat(blobs["usr/tool"]).st_ino


def test_a_writable_subtree_that_is_a_symlink_is_not_followed(staged, tmp_path):
    root, blobs = staged
    os.symlink("usr", os.path.join(root, "linked"))
    assert copy_writable_inputs(root, [("linked",)], (), OWNER) == 0
    assert os.stat(os.path.join(root, "usr/tool")).st_ino == os.stat(blobs["usr/tool"]).st_ino


def test_an_absent_writable_subtree_is_skipped(staged):
    root, _ = staged
    assert copy_writable_inputs(root, [("buildstream-install",)], (), OWNER) == 0


def test_an_input_that_cannot_be_copied_is_internal_naming_it(staged, monkeypatch):
    root, _ = staged

    def failing_mkstemp(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("reapi_worker.storage.writable_inputs.tempfile.mkstemp", failing_mkstemp)
    with pytest.raises(Internal, match="build.*No space left"):
        copy_writable_inputs(root, [("build",)], (), OWNER)
