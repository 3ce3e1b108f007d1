"""The prepared /etc view (sandbox/etc_view.py): real mounts, a real bubblewrap.

A fake host /etc (a directory of our own) stands for the host's, so that it can be changed
the way DHCP, an administrator or a container runtime changes the real one.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from conftest import require, require_tool

from reapi_worker.host.mountinfo import read_mountinfo
from reapi_worker.sandbox import BubblewrapRunner, SandboxRequest, prepare_build_dir
from reapi_worker.sandbox.bwrap_args import HostLayout
from reapi_worker.sandbox.etc_view import TMPFS_SOURCE, EtcView, sweep_dead_views

pytestmark = pytest.mark.bwrap
ALLOW = ("passwd", "resolv.conf", "localtime", "ssl", "new-*")


@pytest.fixture
def base() -> Iterator[pathlib.Path]:
    """A scratch directory the sandbox uid can traverse (not pytest's 0700 tmp_path)."""
    require(os.geteuid() == 0, "the /etc view mounts: the worker runs as root")
    path = pathlib.Path(tempfile.mkdtemp(prefix="reapi-etc-view-test-", dir="/dev/shm"))
    path.chmod(0o711)
    yield path
    assert not [e for e in read_mountinfo() if e.mount_point.startswith(str(path))], "a test left a mount"
    shutil.rmtree(path)


@pytest.fixture
def etc(base) -> pathlib.Path:
    etc = base / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (etc / "resolv.conf").write_text("nameserver 192.0.2.1\n")
    (etc / "shadow").write_text("root:secret\n")  # not allowed: never shown
    (etc / "ssl").mkdir()
    (etc / "ssl" / "openssl.cnf").write_text("# cnf\n")
    (etc / "localtime").symlink_to("/usr/share/zoneinfo/Etc/UTC")
    return etc


@pytest.fixture
def view(base, etc) -> Iterator[EtcView]:
    view = EtcView(ALLOW, str(etc), str(base / "views"))
    yield view
    view.close()
    assert os.listdir(base / "views") == [".owners"] and os.listdir(base / "views" / ".owners") == []


def rename_over(path: pathlib.Path, text: str) -> None:
    """Replace a file as DHCP clients and editors do: a new inode renamed over the old."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(text)
    fresh.rename(path)


def test_the_view_holds_the_allowed_entries_and_links_resolve_as_on_the_host(view, etc):
    with view.acquire() as path:
        shown = pathlib.Path(path)
        assert sorted(os.listdir(shown)) == ["localtime", "passwd", "resolv.conf", "ssl"]
        assert (shown / "passwd").read_text() == (etc / "passwd").read_text()
        assert (shown / "ssl" / "openssl.cnf").read_text() == "# cnf\n"
        assert os.readlink(shown / "localtime") == "/usr/share/zoneinfo/Etc/UTC"


def test_the_view_follows_the_host_a_replaced_added_or_removed_entry(view, etc):
    with view.acquire() as first:
        assert pathlib.Path(first, "resolv.conf").read_text() == "nameserver 192.0.2.1\n"
    # Rewritten in place (same inode): seen through the bind, no new view needed.
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/bash\n")
    with view.acquire() as same:
        assert same == first
        assert pathlib.Path(same, "passwd").read_text() == "root:x:0:0::/root:/bin/bash\n"
    # Replaced by a rename (a new inode): a stale bind would still show the old one.
    rename_over(etc / "resolv.conf", "nameserver 198.51.100.7\n")
    (etc / "new-tool.conf").write_text("x\n")
    (etc / "passwd").unlink()
    with view.acquire() as second:
        assert second != first
        assert pathlib.Path(second, "resolv.conf").read_text() == "nameserver 198.51.100.7\n"
        assert sorted(os.listdir(second)) == ["localtime", "new-tool.conf", "resolv.conf", "ssl"]
    # The first generation was unmounted once nobody held it.
    assert not os.path.exists(first)
    assert not [e for e in read_mountinfo() if e.mount_point.startswith(first)]


def test_a_generation_in_use_stays_mounted_until_released(view, etc):
    with view.acquire() as held:
        rename_over(etc / "resolv.conf", "nameserver 203.0.113.9\n")
        with view.acquire() as fresh:
            assert fresh != held
            assert pathlib.Path(held, "resolv.conf").read_text() == "nameserver 192.0.2.1\n"
        assert os.path.exists(os.path.join(held, "passwd"))
    assert not os.path.exists(held)


def test_attack_the_view_is_read_only_even_for_root_on_the_host(view, etc):
    with view.acquire() as path:
        for target in ("passwd", "ssl/openssl.cnf", "added"):
            with pytest.raises(OSError) as raised:
                with open(os.path.join(path, target), "a") as f:
                    f.write("x")
            assert raised.value.errno == 30  # EROFS
    assert (etc / "passwd").read_text() == "root:x:0:0::/root:/bin/sh\n"


def test_a_live_view_is_never_swept_even_by_a_process_that_cannot_see_its_pid(view, base):
    """A worker that is PID 1 of its own pid namespace sees none of the host's pids."""
    require_tool("unshare")
    with view.acquire() as path:
        script = (
            "import sys\n"
            "from reapi_worker.sandbox.etc_view import sweep_dead_views\n"
            f"print(sweep_dead_views({str(base / 'views')!r}))\n"
        )
        done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", script],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "[]"
        assert os.path.exists(os.path.join(path, "passwd"))


def test_a_dead_workers_view_is_swept_by_the_next(base, etc):
    views = base / "views"
    script = (
        "import os, sys, signal\n"
        "from reapi_worker.sandbox.etc_view import EtcView\n"
        f"v = EtcView({ALLOW!r}, {str(etc)!r}, {str(views)!r})\n"
        "with v.acquire() as p: print(p, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = done.stdout.strip()
    assert [e for e in read_mountinfo() if e.mount_point.startswith(left)]  # what a crash leaves
    swept = sweep_dead_views(str(views))
    assert swept == [os.path.dirname(left)]
    assert os.listdir(views) == [".owners"] and os.listdir(views / ".owners") == []
    assert not [e for e in read_mountinfo() if e.mount_point.startswith(str(views))]


# --- inside a sandbox -----------------------------------------------------------------------


@pytest.fixture
def runner(etc) -> Iterator[BubblewrapRunner]:
    require_tool("bwrap")
    require_tool("setpriv")
    layout = dataclasses.replace(HostLayout.probe(), etc_allow=ALLOW, etc_dir=str(etc))
    runner = BubblewrapRunner(layout=layout)
    assert runner.etc_view is not None
    yield runner
    runner.etc_view.close()


def run(runner: BubblewrapRunner, base: pathlib.Path, script: str) -> tuple[int, str]:
    root = pathlib.Path(tempfile.mkdtemp(dir=base))
    prepare_build_dir(str(root), *runner.host_ids)
    out = str(root) + ".out"
    request = SandboxRequest(
        arguments=("sh", "-c", script), environment={"PATH": "/usr/bin:/bin"}, input_root=str(root),
        stdout_path=out, stderr_path=out,
    )
    return runner.run(request).exit_code, pathlib.Path(out).read_text()


def test_a_sandbox_sees_the_host_change_at_its_start(runner, base, etc):
    assert run(runner, base, "cat /etc/resolv.conf") == (0, "nameserver 192.0.2.1\n")
    rename_over(etc / "resolv.conf", "nameserver 198.51.100.7\n")
    assert run(runner, base, "cat /etc/resolv.conf") == (0, "nameserver 198.51.100.7\n")


def test_attack_the_sandbox_cannot_write_its_etc(runner, base, etc):
    code, output = run(runner, base, (
        "for f in /etc/passwd /etc/new /etc/ssl/openssl.cnf /etc/ssl/new; do "
        "  (echo x >> $f) 2>/dev/null && echo wrote $f; done; "
        "mount -o remount,rw /etc 2>/dev/null && echo remounted; "
        "readlink /etc/localtime; ls /etc"
    ))
    assert code == 0
    assert output == "/usr/share/zoneinfo/Etc/UTC\nlocaltime\npasswd\nresolv.conf\nssl\n"
    assert (etc / "passwd").read_text() == "root:x:0:0::/root:/bin/sh\n"


def test_attack_the_sandboxs_mountinfo_names_no_worker_path_for_etc(runner, base, etc):
    code, mountinfo = run(runner, base, "cat /proc/self/mountinfo")
    assert code == 0
    view_root = runner.etc_view.path  # type: ignore[union-attr]
    assert view_root not in mountinfo and "etc-views" not in mountinfo
    etc_lines = [line.split() for line in mountinfo.splitlines() if line.split()[4] == "/etc"]
    assert len(etc_lines) == 1
    fields = etc_lines[0]
    assert fields[3] == "/"  # the view's own tmpfs, shown from its root
    assert fields[fields.index("-") + 2] == TMPFS_SOURCE
    assert "ro" in fields[5].split(",")


def test_a_runner_that_cannot_make_the_view_binds_the_entries_one_by_one(etc, base, monkeypatch):
    require_tool("bwrap")
    (base / "not-a-dir").write_text("")
    monkeypatch.setattr("reapi_worker.sandbox.etc_view.DEFAULT_BASE", str(base / "not-a-dir" / "views"))
    layout = dataclasses.replace(HostLayout.probe(), etc_allow=ALLOW, etc_dir=str(etc))
    runner = BubblewrapRunner(layout=layout)
    assert runner.etc_view is None
    # The layout's entries (the host's, as probed), each bound on its own.
    code, output = run(runner, base, "ls -A /etc")
    assert code == 0, output
    assert output.split() == sorted(e.path.removeprefix("/etc/") for e in layout.entries if e.path.startswith("/etc/"))
