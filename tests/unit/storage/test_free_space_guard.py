"""storage/free_space_guard.py: without a per-action bound, a build root's file system
found below its reserve after the run makes the lease UNAVAILABLE (retried elsewhere).
statvfs comes in through the constructor: a fake one, no full disk needed."""

from __future__ import annotations

import os

import pytest

from reapi_worker.protos.errors import Unavailable
from reapi_worker.storage.free_space_guard import FreeSpaceGuard
from reapi_worker.storage.staging import StagedInput, Stager


class Staged(StagedInput):
    def __init__(self, path: str) -> None:
        self.path = path
        self.closed = False

    def close(self) -> None:
        self.closed = True


class PlainStager(Stager):
    def stage(self, root, build_dir, directories=(), owner=None):  # type: ignore[no-untyped-def]
        return Staged(build_dir)


def statvfs_with(free_blocks: int):  # type: ignore[no-untyped-def]
    def statvfs(path: str) -> os.statvfs_result:
        return os.statvfs_result((4096, 4096, 1000, free_blocks, free_blocks, 100, 50, 50, 0, 255))
    return statvfs


def test_enough_room_after_the_run_is_no_error(tmp_path):
    guard = FreeSpaceGuard(PlainStager(), reserve_bytes=100 * 4096, statvfs=statvfs_with(101))
    staged = guard.stage(None, str(tmp_path / "b1"))  # type: ignore[arg-type]
    staged.check()
    assert staged.path == str(tmp_path / "b1")
    staged.close()


def test_below_the_reserve_after_the_run_is_unavailable_naming_why(tmp_path):
    guard = FreeSpaceGuard(PlainStager(), reserve_bytes=100 * 4096, statvfs=statvfs_with(99))
    staged = guard.stage(None, str(tmp_path / "b1"))  # type: ignore[arg-type]
    with pytest.raises(Unavailable, match="below the 409600 reserved"):
        staged.check()
    staged.close()
