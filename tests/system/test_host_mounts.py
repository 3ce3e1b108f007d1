"""host/mounts.py against the real kernel: tmpfs mounts made, listed, detached."""

from __future__ import annotations

import errno
import os

import pytest
from conftest import require

from reapi_worker.host import mounts
from reapi_worker.storage.fuse import kernel_mounts


@pytest.fixture
def top(tmp_path):
    require(os.geteuid() == 0, "mounting needs root")
    yield tmp_path
    mounts.detach_all_under(str(tmp_path))


def test_mounts_are_listed_deepest_first_and_detached_together(top):
    outer, inner = top / "outer", top / "outer" / "inner"
    outer.mkdir()
    mounts.mount("tmpfs", str(outer), "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "size=1m")
    inner.mkdir()
    mounts.mount("tmpfs", str(inner), "tmpfs", mounts.MS_NOSUID, "size=1m")
    assert mounts.mounts_under(str(top)) == [str(inner), str(outer)]
    assert mounts.detach_all_under(str(top)) == [str(inner), str(outer)]
    assert mounts.mounts_under(str(top)) == []


def test_unmounting_what_is_no_mount_says_so_and_a_failure_names_the_target(top):
    assert mounts.unmount(str(top)) is False
    with pytest.raises(OSError) as failed:
        mounts.mount("tmpfs", str(top / "missing"), "tmpfs", 0)
    assert failed.value.errno == errno.ENOENT and failed.value.filename == str(top / "missing")


def test_a_busy_mount_is_refused_by_unmount_and_detached_by_the_storage_wrapper(top):
    busy = top / "busy"
    busy.mkdir()
    mounts.mount("tmpfs", str(busy), "tmpfs", 0, "size=1m")
    held = os.open(busy, os.O_RDONLY | os.O_DIRECTORY)  # a user of the mount
    try:
        with pytest.raises(OSError) as refused:
            mounts.unmount(str(busy))
        assert refused.value.errno == errno.EBUSY
        assert kernel_mounts.unmount(str(busy)) is True  # busy: detached instead
        assert mounts.mounts_under(str(busy)) == []
    finally:
        os.close(held)
