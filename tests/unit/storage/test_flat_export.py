"""Parsed trees and the flat writer of hardlink staging: a root is parsed once, and what is
written from its flat form is exactly what the CasDirectory exporter writes."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest

from directory_helpers import build_in, local_snapshot
from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.protos import re_pb2
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.directory import CasDirectory
from reapi_worker.storage.flat_export import write_flat
from reapi_worker.storage.local_cas import LocalCAS
from reapi_worker.storage.parsed_trees import ParsedTrees

SPEC = {
    "plain": b"plain bytes",
    "dup/plain": b"plain bytes",
    "bin/tool": ("x", b"#!/bin/sh\n"),
    "bin/also-plain": b"#!/bin/sh\n",
    "link": ("->", "plain"),
    "deep/a/b/c/file": b"deep",
    "empty": None,
}


@pytest.fixture
def cas(tmp_path: pathlib.Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas", max_bytes=1 << 30) as local:
        yield local


@pytest.fixture
def root(cas: LocalCAS) -> Digest:
    return build_in(CasDirectory.empty(cas), SPEC).digest()  # type: ignore[union-attr]


@pytest.mark.parametrize("link", [True, False])
def test_the_flat_writer_writes_what_the_directory_exporter_writes(cas, root, tmp_path, link):
    flat = ParsedTrees().flat(cas, root)
    write_flat(flat, cas, str(tmp_path / "flat"), link=link)
    CasDirectory.from_digest(cas, root).export_files(str(tmp_path / "export"), can_link=link)
    assert list(local_snapshot(tmp_path / "flat")) == list(local_snapshot(tmp_path / "export"))
    plain_inode = os.stat(cas.path(Digest.of_bytes(b"plain bytes"))).st_ino
    assert (os.stat(tmp_path / "flat/dup/plain").st_ino == plain_inode) is link
    assert (os.stat(tmp_path / "flat/bin/tool").st_ino ==
            os.stat(cas.path(Digest.of_bytes(b"#!/bin/sh\n"), executable=True)).st_ino) is link


def test_directories_are_given_to_the_owner_files_stay_the_caches(cas, root, tmp_path):
    owner = (os.getuid() + 1, os.getgid() + 1) if os.geteuid() == 0 else None
    if owner is None:
        pytest.skip("chown needs root")
    write_flat(ParsedTrees().flat(cas, root), cas, str(tmp_path / "out"), dir_owner=owner)
    for path in ("", "dup", "deep/a/b/c", "empty"):
        st = os.stat(tmp_path / "out" / path)
        assert (st.st_uid, st.st_gid) == owner
    assert os.stat(tmp_path / "out/plain").st_uid == os.geteuid()


def test_a_root_is_parsed_once_and_shared_nodes_of_another_root_are_not_parsed_again(cas, root):
    parsed = ParsedTrees()
    first = parsed.flat(cas, root)
    count = parsed.parsed
    assert parsed.flat(cas, root) is first and parsed.parsed == count
    bigger = build_in(CasDirectory.from_digest(cas, root), {"new/file": b"new"}).digest()  # type: ignore[union-attr]
    flat = parsed.flat(cas, bigger)
    assert parsed.parsed == count + 2  # the new root and new/: every other node was known
    assert {d for d in flat.digests} == first.digests | {Digest.of_bytes(b"new")}
    assert ("new",) in flat.dirs and first.size + 2 == flat.size


def test_a_hostile_directory_is_refused_when_parsed(cas):
    bad = re_pb2.Directory(files=[re_pb2.FileNode(name="..", digest=cas.write(b"x").to_proto())])
    digest = cas.write(serialize(bad))
    with pytest.raises(InvalidArgument):
        ParsedTrees().flat(cas, digest)


def test_the_flat_tree_cache_is_bounded(cas, root):
    parsed = ParsedTrees(max_flat_entries=1)
    first = parsed.flat(cas, root)
    other = build_in(CasDirectory.empty(cas), {"x": b"x"}).digest()  # type: ignore[union-attr]
    parsed.flat(cas, other)
    assert parsed.flat(cas, root) is not first  # evicted, flattened again (from known nodes)
