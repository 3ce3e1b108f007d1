"""TreeCache: crash safety, verification before reuse, the size bound with holds, restarts.

Real directories in tmp_path; trees are written by small build functions (no mounts, no
CAS: what goes into a tree is the stager's business, tested in tests/system)."""

from __future__ import annotations

import os

import pytest

from reapi_worker.protos.errors import AlreadyExists
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.tree_cache import TreeCache, open_tree_cache


def digest_of(name: str) -> Digest:
    return Digest.of_bytes(name.encode())


def writer(files: dict[str, bytes]):
    def build(path: str) -> int:
        for name, data in files.items():
            os.makedirs(os.path.join(path, os.path.dirname(name)), exist_ok=True)
            with open(os.path.join(path, name), "wb") as out:
                out.write(data)
        return sum(len(data) for data in files.values())
    return build


def test_a_built_tree_is_found_held_and_survives_a_restart(tmp_path):
    root = str(tmp_path / "trees")
    digest = digest_of("a")
    with TreeCache(root, 1 << 20) as cache:
        held = cache.add(digest, writer({"d/f": b"12345"}))
        assert open(os.path.join(held.path, "d/f"), "rb").read() == b"12345"
        held.release()
        assert cache.size_bytes == 5
    with TreeCache(root, 1 << 20) as cache:
        again = cache.get(digest)
        assert again is not None and open(os.path.join(again.path, "d/f"), "rb").read() == b"12345"
        assert cache.size_bytes == 5
        again.release()


def test_a_half_built_tree_left_by_a_crash_is_never_used_and_is_removed(tmp_path):
    root = str(tmp_path / "trees")
    digest = digest_of("a")
    with TreeCache(root, 1 << 20):
        pass
    # What a kill leaves: a build directory, and (an older writer, a copy by hand) a
    # directory with the digest's name but no marker.
    os.makedirs(os.path.join(root, "building-0123456789abcdef", "tree", "d"))
    half = os.path.join(root, f"{digest.hash}-{digest.size_bytes}")
    os.makedirs(os.path.join(half, "tree", "d"))
    with TreeCache(root, 1 << 20) as cache:
        assert cache.get(digest) is None
        cache.drain()
        assert sorted(os.listdir(root)) == ["lock", "trash"]
        held = cache.add(digest, writer({"d/f": b"x"}))  # built afresh
        assert os.listdir(os.path.join(held.path, "d")) == ["f"]
        held.release()


def test_a_failed_build_keeps_nothing(tmp_path):
    def fail(path: str) -> int:
        with open(os.path.join(path, "partial"), "wb"):
            pass
        raise OSError(28, "No space left on device")

    with TreeCache(str(tmp_path / "trees"), 1 << 20) as cache:
        with pytest.raises(Exception, match="No space left"):
            cache.add(digest_of("a"), fail)
        cache.drain()
        assert cache.get(digest_of("a")) is None
        assert sorted(os.listdir(cache.root)) == ["lock", "trash"]


def test_a_tree_changed_at_its_top_after_it_was_built_is_dropped_not_reused(tmp_path):
    digest = digest_of("a")
    with TreeCache(str(tmp_path / "trees"), 1 << 20) as cache:
        held = cache.add(digest, writer({"f": b"x"}))
        held.release()
        with open(os.path.join(held.path, "intruder"), "wb"):
            pass
        assert cache.get(digest) is None
        assert not cache.contains(digest)


def test_a_marker_copied_onto_another_tree_does_not_make_it_valid(tmp_path):
    root = str(tmp_path / "trees")
    digest = digest_of("a")
    with TreeCache(root, 1 << 20) as cache:
        cache.add(digest, writer({"f": b"x"})).release()
    entry = os.path.join(root, f"{digest.hash}-{digest.size_bytes}")
    os.rename(os.path.join(entry, "tree"), os.path.join(tmp_path, "moved"))
    os.makedirs(os.path.join(entry, "tree"))  # same name, another directory (inode)
    with TreeCache(root, 1 << 20) as cache:
        assert cache.get(digest) is None


def test_eviction_takes_least_recently_used_trees_and_never_a_held_one(tmp_path):
    a, b, c = digest_of("a"), digest_of("b"), digest_of("c")
    with TreeCache(str(tmp_path / "trees"), 100) as cache:
        held_a = cache.add(a, writer({"f": b"x" * 60}))
        held_b = cache.add(b, writer({"f": b"y" * 60}))  # over the bound, but both are held
        assert cache.contains(a) and cache.contains(b) and cache.size_bytes == 120
        held_b.release()  # b is now the only tree that may go
        assert cache.contains(a) and not cache.contains(b)
        cache.drain()
        assert open(os.path.join(held_a.path, "f"), "rb").read() == b"x" * 60  # still readable
        held_a.release()
        assert cache.contains(a)  # within the bound again: nothing more to evict
        cache.add(c, writer({"f": b"z" * 60})).release()
        assert not cache.contains(a) and cache.contains(c)
        assert cache.evictions == 2
        cache.drain()
        assert set(os.listdir(cache.root)) == {"lock", "trash", f"{c.hash}-{c.size_bytes}"}


def test_recent_lists_the_most_recently_used_first(tmp_path):
    a, b = digest_of("a"), digest_of("b")
    with TreeCache(str(tmp_path / "trees"), 1 << 20) as cache:
        cache.add(a, writer({})).release()
        cache.add(b, writer({})).release()
        assert cache.recent(5) == [b, a]
        cache.get(a).release()  # type: ignore[union-attr]
        assert cache.recent(1) == [a]


def test_a_second_worker_gets_a_directory_of_its_own(tmp_path):
    base = str(tmp_path / "trees")
    with open_tree_cache(base, 1 << 20) as first:
        with pytest.raises(AlreadyExists):
            TreeCache(base, 1 << 20)
        with open_tree_cache(base, 1 << 20) as second:
            assert (first.root, second.root) == (base, base + ".1")


def test_two_threads_building_one_tree_at_once_both_get_it_and_it_is_kept_once(tmp_path):
    import threading

    digest = digest_of("a")
    both_building = threading.Barrier(2)

    def build(path: str) -> int:
        both_building.wait(timeout=10)  # neither finishes before the other has started
        return writer({"f": b"12345"})(path)

    with TreeCache(str(tmp_path / "trees"), 1 << 20) as cache:
        held: list = []
        threads = [threading.Thread(target=lambda: held.append(cache.add(digest, build))) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        assert len(held) == 2 and held[0].path == held[1].path
        assert cache.size_bytes == 5
        for tree in held:
            tree.release()
        cache.drain()
        assert set(os.listdir(cache.root)) == {"lock", "trash", f"{digest.hash}-{digest.size_bytes}"}


def test_a_tree_of_the_first_layout_is_removed_not_shown_with_its_old_owners(tmp_path):
    # The first layout (directories owned by a uid nothing ran as, marker "complete") would
    # show its directories unmapped through today's idmapped view: it must be built again.
    root = str(tmp_path / "trees")
    digest = digest_of("a")
    with TreeCache(root, 1 << 20) as cache:
        held = cache.add(digest, writer({"d/f": b"x"}))
        held.release()
    entry = os.path.join(root, f"{digest.hash}-{digest.size_bytes}")
    (marker,) = [name for name in os.listdir(entry) if name != "tree"]
    os.rename(os.path.join(entry, marker), os.path.join(entry, "complete"))
    with TreeCache(root, 1 << 20) as cache:
        assert cache.get(digest) is None
        cache.drain()
        assert sorted(os.listdir(root)) == ["lock", "trash"]
