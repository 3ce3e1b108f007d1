"""Exporting a CasDirectory from the real LocalCAS: hardlinks share the cache's inode,
executables link the 0755 variant, and a copy takes over where a link is impossible."""

from __future__ import annotations

import errno
import os
import pathlib
import stat as stat_mod
import tempfile
from collections.abc import Iterator

import pytest

from directory_helpers import build_in, build_local, snapshot
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.directory import CasDirectory, FileSystemDirectory
from reapi_worker.storage.local_cas import LocalCAS

SPEC = {
    "plain": b"plain bytes",
    "dup/plain": b"plain bytes",
    "bin/tool": ("x", b"#!/bin/sh\n"),
    "bin/also-plain": b"#!/bin/sh\n",  # same blob as the tool, not executable
    "link": ("->", "plain"),
    "empty": None,
}


@pytest.fixture
def cas(tmp_path: pathlib.Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas", max_bytes=1 << 30) as local:
        yield local


@pytest.fixture
def tree(cas: LocalCAS) -> CasDirectory:
    return build_in(CasDirectory.empty(cas), SPEC)  # type: ignore[return-value]


def _ino(path: str | pathlib.Path) -> int:
    return os.lstat(path).st_ino


def _mode(path: str | pathlib.Path) -> int:
    return stat_mod.S_IMODE(os.lstat(path).st_mode)


def test_exported_files_are_the_cache_inodes(cas: LocalCAS, tree: CasDirectory, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    tree.export_files(str(out))
    plain = Digest.of_bytes(b"plain bytes")
    script = Digest.of_bytes(b"#!/bin/sh\n")
    assert _ino(out / "plain") == _ino(out / "dup/plain") == _ino(cas.path(plain))
    assert _ino(out / "bin/tool") == _ino(cas.path(script, executable=True))
    assert _ino(out / "bin/also-plain") == _ino(cas.path(script))
    assert _ino(out / "bin/tool") != _ino(out / "bin/also-plain")
    assert _mode(out / "bin/tool") == 0o755
    assert _mode(out / "plain") == 0o644
    assert os.readlink(out / "link") == "plain"
    assert snapshot(FileSystemDirectory(out)) == snapshot(tree)


def test_import_from_a_local_path_stores_every_file(cas: LocalCAS, tmp_path: pathlib.Path) -> None:
    source = build_local(tmp_path / "src", SPEC)
    tree = CasDirectory.empty(cas)
    tree.import_files(str(source))
    assert not cas.find_missing(d for d, _ in tree.file_digests())
    reloaded = CasDirectory.from_digest(cas, tree.digest())
    assert snapshot(reloaded) == snapshot(FileSystemDirectory(source))


def test_can_link_false_copies_with_the_same_modes(cas: LocalCAS, tree: CasDirectory, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    tree.export_files(str(out), can_link=False)
    assert _ino(out / "plain") != _ino(cas.path(Digest.of_bytes(b"plain bytes")))
    assert _mode(out / "plain") == 0o644 and _mode(out / "bin/tool") == 0o755
    assert snapshot(FileSystemDirectory(out)) == snapshot(tree)


def test_export_to_another_file_system_falls_back_to_copies(cas: LocalCAS, tree: CasDirectory) -> None:
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(cas.root).st_dev:
        pytest.skip("needs /dev/shm on another file system than the cache")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        out = pathlib.Path(shm) / "out"
        tree.export_files(str(out))  # every link is EXDEV
        assert os.stat(out / "plain").st_dev != os.stat(cas.root).st_dev
        assert _mode(out / "plain") == 0o644 and _mode(out / "bin/tool") == 0o755
        assert snapshot(FileSystemDirectory(out)) == snapshot(tree)


@pytest.mark.parametrize("code", [errno.EMLINK, errno.EPERM])
def test_a_refused_link_is_replaced_by_a_copy(
    cas: LocalCAS, tree: CasDirectory, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    real_link = os.link
    plain_path = cas.path(Digest.of_bytes(b"plain bytes"))

    def link(src: str, dst: str, **kwargs: object) -> None:
        if src == plain_path:  # this blob has hit the link limit
            raise OSError(code, os.strerror(code))
        real_link(src, dst, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", link)
    out = tmp_path / "out"
    tree.export_files(str(out))
    assert _ino(out / "plain") != _ino(plain_path) and _mode(out / "plain") == 0o644
    assert _ino(out / "bin/also-plain") == _ino(cas.path(Digest.of_bytes(b"#!/bin/sh\n")))
    assert snapshot(FileSystemDirectory(out)) == snapshot(tree)


def test_export_of_a_tree_with_missing_blobs_writes_nothing(cas: LocalCAS, tmp_path: pathlib.Path) -> None:
    from reapi_worker.protos.errors import MissingBlobs
    from reapi_worker.storage.content import MemoryStore

    elsewhere = MemoryStore()
    digest = build_in(CasDirectory.empty(elsewhere), {"f": b"only elsewhere"}).digest()
    cas.write(elsewhere.read(digest))  # the Directory proto, not the file blob
    with pytest.raises(MissingBlobs) as caught:
        CasDirectory.from_digest(cas, digest).export_files(str(tmp_path / "out"))
    assert caught.value.digests == [Digest.of_bytes(b"only elsewhere")]
    assert not (tmp_path / "out").exists()
