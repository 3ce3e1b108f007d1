"""Pinned digests of fixture trees: both backends, built through the API or imported from
disk, must produce exactly these (computed once, then hard-coded: a change here means
the canonical form changed, which would break every cache in the field)."""

from __future__ import annotations

import hashlib
import pathlib

import pytest

from directory_helpers import (  # noqa: F401  (fixtures are used by name)
    TreeSpec,
    build_in,
    build_local,
    kind,
    new_dir,
)
from directory_helpers import DirectoryFactory
from reapi_worker.protos import re_pb2

FIXTURES: dict[str, tuple[TreeSpec, str]] = {
    "empty": ({}, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/0"),
    "one_empty_dir": (
        {"e": None},
        "198bccb2233f39c8819d8cad9fefe70c8ae87c6eee35d3df41aea562757693d9/73",
    ),
    "mixed": (
        {
            "README": b"hello\n",
            "bin/tool": ("x", b"#!/bin/sh\necho hi\n"),
            "bin/link": ("->", "tool"),
            "empty": None,
            "src/a/b/deep.c": b"int main(void) { return 0; }\n",
            "src/up": ("->", "../README"),
        },
        "c23027ec9c7ac1bbd8c4660f433b7ac103eb6725ab5f49ab7cc6b300df80a8bd/311",
    ),
}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_pinned_digest_built_through_the_api(new_dir: DirectoryFactory, name: str) -> None:
    spec, expected = FIXTURES[name]
    assert str(build_in(new_dir(), spec).digest()) == expected


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_pinned_digest_imported_from_disk(new_dir: DirectoryFactory, name: str, tmp_path: pathlib.Path) -> None:
    spec, expected = FIXTURES[name]
    directory = new_dir()
    directory.import_files(str(build_local(tmp_path / "src", spec)))
    assert str(directory.digest()) == expected


def test_one_empty_dir_pin_matches_a_hand_built_proto() -> None:
    """An independent derivation (raw protobuf + hashlib), so the pins are not merely
    whatever our code happened to say."""
    empty = hashlib.sha256(b"").hexdigest()
    proto = re_pb2.Directory(
        directories=[re_pb2.DirectoryNode(name="e", digest=re_pb2.Digest(hash=empty, size_bytes=0))]
    )
    data = proto.SerializeToString(deterministic=True)
    assert f"{hashlib.sha256(data).hexdigest()}/{len(data)}" == FIXTURES["one_empty_dir"][1]
