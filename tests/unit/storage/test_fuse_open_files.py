"""The FUSE mount's open files: one descriptor per blob shared by its handles, a quota of
handles per action (opener), on real descriptors."""

from __future__ import annotations

import os

import pytest

from reapi_worker.storage.fuse.open_files import OpenFiles, QuotaExceeded, opener_of


@pytest.fixture
def blob_file(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"contents")
    return str(path)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_opens_of_one_blob_share_its_descriptor_until_the_last_release(blob_file):
    files = OpenFiles()
    fd = os.open(blob_file, os.O_RDONLY)
    first = files.add("blob", fd, opener=1)
    second = files.share("blob", opener=2)
    assert second is not None and files.descriptor(second) == files.descriptor(first) == fd
    assert (files.handles, files.descriptors) == (2, 1)
    files.release(first)
    assert _is_open(fd) and os.pread(files.descriptor(second), 8, 0) == b"contents"
    files.release(second)
    assert not _is_open(fd) and (files.handles, files.descriptors) == (0, 0)


def test_a_descriptor_opened_while_another_open_of_the_blob_won_is_closed(blob_file):
    files = OpenFiles()
    winner = os.open(blob_file, os.O_RDONLY)
    loser = os.open(blob_file, os.O_RDONLY)
    assert files.share("blob", opener=1) is None  # nothing open yet: both go and open it
    files.add("blob", winner, opener=1)
    handle = files.add("blob", loser, opener=1)
    assert not _is_open(loser) and files.descriptor(handle) == winner and files.descriptors == 1


def test_an_action_past_its_quota_is_refused_and_no_other_action_notices(blob_file):
    files = OpenFiles(per_action=2)
    handles = [files.add("blob", os.open(blob_file, os.O_RDONLY), opener=7), files.share("blob", opener=7)]
    with pytest.raises(QuotaExceeded):
        files.share("blob", opener=7)
    extra = os.open(blob_file, os.O_RDONLY)
    with pytest.raises(QuotaExceeded):
        files.add("other", extra, opener=7)
    assert not _is_open(extra)  # owned, so closed when refused
    assert files.share("blob", opener=8) is not None  # another action
    assert files.share("blob", opener=None) is not None  # unidentified openers have no quota
    files.release(handles[0])
    assert files.share("blob", opener=7) is not None  # room again


def test_close_all_closes_every_descriptor(blob_file):
    files = OpenFiles()
    fds = [os.open(blob_file, os.O_RDONLY) for _ in range(3)]
    for i, fd in enumerate(fds):
        files.add(f"blob{i}", fd, opener=None)
    files.close_all()
    assert not any(_is_open(fd) for fd in fds) and files.handles == 0


def test_the_opener_is_named_by_its_pid_namespace():
    assert opener_of(os.getpid()) == os.stat("/proc/self/ns/pid").st_ino
    assert opener_of(0) is None
