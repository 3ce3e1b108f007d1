"""Which uid the sandbox runs as, and the build directory's ownership."""

from __future__ import annotations

import os

import pytest

from reapi_worker.sandbox import NOBODY, RunAs, SandboxSetupError, prepare_build_dir, sandbox_can_protect_hardlinks
from reapi_worker.sandbox.identity import effective_run_as

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, uid switch)")


@as_root
def test_root_worker_runs_the_sandbox_as_nobody_by_default():
    assert effective_run_as(None) == NOBODY
    assert effective_run_as(RunAs(1234, 1234)) == RunAs(1234, 1234)
    assert effective_run_as(RunAs(0, 0)) is None  # the worker's own ids: no switch


@as_root
def test_hardlinks_are_protected_only_when_the_sandbox_uid_does_not_own_the_cache():
    assert sandbox_can_protect_hardlinks()
    assert not sandbox_can_protect_hardlinks(RunAs(0, 0))
    assert not sandbox_can_protect_hardlinks(NOBODY, cache_owner_uid=NOBODY.uid)


def test_a_non_root_worker_cannot_switch_uid(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getegid", lambda: 1000)
    assert effective_run_as(None) is None
    assert not sandbox_can_protect_hardlinks()  # it runs as the cache's owner: copy, don't link
    with pytest.raises(SandboxSetupError, match="not root"):
        effective_run_as(NOBODY)


@as_root
def test_prepare_build_dir_chowns_directories_only_and_follows_no_symlink(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "file").write_text("cached")
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    prepare_build_dir(str(root), 4242, 4343)
    for d in (root, root / "a", root / "a" / "b"):
        assert (d.stat().st_uid, d.stat().st_gid) == (4242, 4343)
    assert (root / "a" / "file").stat().st_uid == 0
    assert outside.stat().st_uid == 0
