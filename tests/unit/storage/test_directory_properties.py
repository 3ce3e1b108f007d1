"""Property tests: random trees survive every round trip between the backends, and random
edit sequences leave both backends in the same state.

Examples stay small (a few entries, depth <= 3) and few, so this file runs in seconds.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Iterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from directory_helpers import local_snapshot, snapshot
from reapi_worker.protos.errors import ReapiError
from reapi_worker.storage.content import MemoryStore
from reapi_worker.storage.directory import CasDirectory, Directory, FileSystemDirectory, FileType
from reapi_worker.storage.paths import SymlinkPolicy

SETTINGS = settings(max_examples=int(os.environ.get("DIR_PROP_EXAMPLES", "100")), deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = st.sampled_from(["a", "b", "B", "c.txt", "a-b", "ü", "sp ace", "z"])
CONTENT = st.binary(max_size=64)
TARGETS = st.sampled_from(["a", "../a", "b/c", "./x", "..", "c.txt", "../../up"])

# A node: ("file", bytes, executable) | ("link", target) | ("dir", {name: node})
FILES = st.tuples(st.just("file"), CONTENT, st.booleans())
LINKS = st.tuples(st.just("link"), TARGETS)
TREES = st.recursive(
    st.dictionaries(NAMES, st.one_of(FILES, LINKS), max_size=3),
    lambda children: st.dictionaries(
        NAMES, st.one_of(FILES, LINKS, st.tuples(st.just("dir"), children)), max_size=4
    ),
    max_leaves=10,
)


def _materialize(root: pathlib.Path, tree: dict) -> None:
    root.mkdir(exist_ok=True)
    for name, node in tree.items():
        path = root / name
        if node[0] == "file":
            path.write_bytes(node[1])
            path.chmod(0o755 if node[2] else 0o644)
        elif node[0] == "link":
            os.symlink(node[1], path)
        else:
            _materialize(path, node[1])


def _expected(tree: dict, prefix: str = "") -> Iterator[tuple[str, FileType, object]]:
    """What walk() must report for ``tree``: path, type, and (bytes, bit) / target / None."""
    for name in sorted(tree):
        node = tree[name]
        path = prefix + name
        if node[0] == "file":
            yield path, FileType.FILE, (node[1], node[2])
        elif node[0] == "link":
            yield path, FileType.SYMLINK, node[1]
        else:
            yield path, FileType.DIRECTORY, None
            yield from _expected(node[1], path + "/")


def _observed(directory: Directory) -> list[tuple[str, FileType, object]]:
    seen: list[tuple[str, FileType, object]] = []
    for path, stat in directory.walk():
        if stat.type is FileType.FILE:
            seen.append((path, stat.type, (directory.read_bytes(path), stat.executable)))
        elif stat.type is FileType.SYMLINK:
            seen.append((path, stat.type, stat.target))
        else:
            seen.append((path, stat.type, None))
    return seen


@SETTINGS
@given(tree=TREES)
def test_round_trip_cas_export_reimport_keeps_digest_and_walk(tree: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = pathlib.Path(tmp)
        _materialize(base / "src", tree)
        expected = list(_expected(tree))

        cas = CasDirectory.empty(MemoryStore())
        cas.import_files(str(base / "src"))
        digest = cas.digest()
        assert _observed(cas) == expected

        cas.export_files(str(base / "out"))
        fresh_cas = CasDirectory.empty(MemoryStore())
        fresh_cas.import_files(str(base / "out"))
        (base / "fs").mkdir()
        fs = FileSystemDirectory(base / "fs")
        fs.import_files(str(base / "out"))
        exported = FileSystemDirectory(base / "out")

        assert fresh_cas.digest() == fs.digest() == exported.digest() == digest
        assert list(cas.walk()) == list(fresh_cas.walk()) == list(fs.walk()) == list(exported.walk())
        assert _observed(fs) == expected
        assert CasDirectory.from_digest(cas.store, digest).digest() == digest
        # exported with read-only modes, bits kept
        for rel, mode, _ in local_snapshot(base / "out"):
            if (base / "out" / rel).is_file() and not (base / "out" / rel).is_symlink():
                assert mode & 0o777 in (0o644, 0o755)


# -- differential: the same edits on both backends ------------------------------------------

PATHS = st.sampled_from(["a", "b", "a/b", "a/c", "b/a", "a/b/c", "c"])
OPS = st.one_of(
    st.tuples(st.just("write"), PATHS, CONTENT, st.booleans()),
    st.tuples(st.just("mkdir"), PATHS),
    st.tuples(st.just("symlink"), PATHS, TARGETS),
    st.tuples(st.just("remove"), PATHS, st.booleans()),
    st.tuples(st.just("rename"), PATHS, PATHS),
    st.tuples(st.just("copy"), PATHS, PATHS),
    st.tuples(st.just("digest"),),
)


def _apply(directory: Directory, op: tuple) -> str:
    """Run one edit; return the name of the error class it raised (or "ok")."""
    try:
        kind, *args = op
        if kind == "write":
            directory.write_bytes(args[0], args[1], executable=args[2])
        elif kind == "mkdir":
            directory.mkdir(args[0])
        elif kind == "symlink":
            directory.symlink(args[0], args[1])
        elif kind == "remove":
            directory.remove(args[0], recursive=args[1])
        elif kind == "rename":
            directory.rename(args[0], args[1])
        elif kind == "copy":
            directory.copy(args[0], args[1])
        else:
            directory.digest()
    except ReapiError as err:
        return type(err).__name__
    return "ok"


@SETTINGS
@given(ops=st.lists(OPS, max_size=12), policy=st.sampled_from(SymlinkPolicy))
def test_the_same_edits_give_the_same_tree_on_both_backends(ops: list[tuple], policy: SymlinkPolicy) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fs = FileSystemDirectory(tmp, symlink_policy=policy)
        cas = CasDirectory.empty(MemoryStore(), symlink_policy=policy)
        for op in ops:
            assert _apply(fs, op) == _apply(cas, op), op
        assert snapshot(fs) == snapshot(cas)
        assert fs.digest() == cas.digest()
        # the cached digests of the edited CAS tree equal a cold reload's
        assert snapshot(CasDirectory.from_digest(cas.store, cas.digest())) == snapshot(cas)
