"""Input trees for tests of ``SubtreeReadOnly``, written as nested dicts.

A spec is ``{name: bytes | "->target" | {sub spec}}``: a file, a symlink, a directory;
``MARK: value`` in a spec puts ``SubtreeReadOnly=value`` on the directory it is in.
"""

from __future__ import annotations

from typing import Protocol

from reapi_worker.protos import re_pb2
from reapi_worker.storage.digests import Digest, serialize

MARK = "#mark"


class Writable(Protocol):
    def write(self, data: bytes) -> Digest: ...


def store_marked_tree(store: Writable, spec: dict) -> Digest:
    """Store the tree ``spec`` describes into ``store``; returns its root digest."""
    directory = re_pb2.Directory()
    if MARK in spec:
        directory.node_properties.properties.add(name="SubtreeReadOnly", value=spec[MARK])
    for name in sorted(n for n in spec if n != MARK):
        value = spec[name]
        if isinstance(value, dict):
            directory.directories.add(name=name, digest=store_marked_tree(store, value).to_proto())
        elif isinstance(value, str):
            directory.symlinks.add(name=name, target=value.removeprefix("->"))
        else:
            directory.files.add(name=name, digest=store.write(value).to_proto())
    return store.write(serialize(directory))
