"""The start-time probe of overlays over idmapped mounts, and what the composition root does
with its answer: ``cached`` refused with the kernel's reason, ``auto`` without the cache."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from conftest import require, require_tool
from executor_fixtures import Farm, make_farm

from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.storage.auto_staging import AutoStager
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.fuse import kernel_mounts
from reapi_worker.storage.idmapped_overlay_probe import idmapped_overlay_refusal
from reapi_worker.storage.staging import HardlinkStager
from reapi_worker.worker import compose


@pytest.fixture
def farm() -> Iterator[Farm]:
    require_tool("unshare")
    require(os.geteuid() == 0, "the probe mounts overlays and needs root")
    farm = make_farm(max_action_timeout=30, staging="hardlink")
    yield farm
    farm.close()


def test_this_kernel_passes_the_probe_and_the_probe_leaves_nothing(farm):
    before = sorted(os.listdir(farm.build_root))
    assert idmapped_overlay_refusal(farm.build_root) is None
    assert sorted(os.listdir(farm.build_root)) == before
    assert kernel_mounts.mounts_under(farm.build_root) == []


def test_a_refusal_is_reported_not_raised(farm, tmp_path):
    # A lower layer that cannot be cloned: the probe says why instead of failing the start.
    def refusing_attach(source: str, target: str, userns_fd: int) -> None:
        raise InvalidArgument("idmapped mounts refused here")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("reapi_worker.storage.idmapped_overlay_probe.attach_idmapped", refusing_attach)
        assert idmapped_overlay_refusal(farm.build_root) == "idmapped mounts refused here"
    assert [n for n in os.listdir(farm.build_root) if n.startswith(".idmap-probe-")] == []


def test_a_refusing_kernel_refuses_cached_staging_by_name_and_auto_does_without_the_cache(farm, monkeypatch):
    monkeypatch.setattr(compose, "idmapped_overlay_refusal", lambda build_root: "overlayfs: idmapped layers not supported")
    trees = os.path.join(farm.cache_dir, "trees")
    with pytest.raises(InvalidArgument, match="staging 'cached'.*idmapped layers not supported"):
        with compose.make_stager("cached", farm.cache, farm.remover, farm.build_root, tree_cache_dir=trees):
            pass
    assert not os.path.exists(trees)

    # auto's lazy half needs the process's one FUSE mount, which the FUSE suites own: stand in
    # a context that yields an object the FUSE stager accepts.
    class NoMount:
        mount_dir = os.path.join(farm.build_root, ".fuse")

    @contextlib.contextmanager
    def no_mount(*args: object, **kwargs: object) -> Iterator[NoMount]:
        yield NoMount()

    monkeypatch.setattr(compose, "FuseMount", no_mount)
    with compose.make_stager("auto", farm.cache, farm.remover, farm.build_root, tree_cache_dir=trees) as made:
        assert isinstance(made, AutoStager)
        small = CasDirectory.from_digest(farm.cache, farm.upload_tree({"a.txt": b"a\n"}))
        assert isinstance(made.choose(small), HardlinkStager)
    assert not os.path.exists(trees)
