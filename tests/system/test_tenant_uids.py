"""One host uid per concurrent action, attacked: real executor, real bubblewrap, real
separate host uids from a real :class:`UidPool` (claimed host-wide like a worker's), both
stagers, with and without the per-action tmpfs bound, both root modes.

A runner wrapper of our own holds every action after its command ran — its build directory
full of inputs, outputs and what it left, nothing captured yet — until all of them are
there, then plays each action's host uid (``setpriv``, as a process of that uid left on the
host, or a setuid-to-it binary run, would be) against the others' build directories, and a
host user outside the pool against all of them. The same probe as each directory's own uid
must succeed: the control that shows the probe can see what it looks for.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import threading
from collections.abc import Iterator

import pytest

from conftest import require, require_tool
from executor_fixtures import STAGINGS, Farm, make_farm

from reapi_worker.protos import code_pb2, re_pb2
from reapi_worker.sandbox.request import Bind, SandboxRequest
from reapi_worker.sandbox.result import SandboxResult
from reapi_worker.sandbox.runner import Runner
from reapi_worker.sandbox.uid_pool import UidPool
from reapi_worker.storage.digests import Digest
from reapi_worker.worker.platform_properties import PlatformPolicy

pytestmark = pytest.mark.bwrap

#: Far from the worker's "auto" ids (1879048192...) and from any host user.
TEST_UID_BASE = 1879900000
#: A host user outside every pool.
OUTSIDER = 4243
SECRET = b"tenant secret\n"
BOUND = 64 << 20
#: (staging, build_dir bound): both stagers, with and without the per-action tmpfs.
LAYOUTS = [(s, b) for s in STAGINGS for b in (None, BOUND)]
LAYOUT_IDS = [f"{s}-{'bounded' if b else 'unbounded'}" for s, b in LAYOUTS]

#: Run as some uid against a build directory: what it could list, read, write and run.
#: $1: the staged input root; $2: the file it tries to write there.
PROBE = r"""
r=$1
ls "$r" >/dev/null 2>&1 && echo LISTED
cat "$r/src/secret.txt" 2>/dev/null | sed 's/^/READ /'
(echo forged >> "$r/$2") 2>/dev/null && echo WROTE
"$r/tool" -u 2>/dev/null | sed 's/^/RAN euid=/'
"""

#: Each action: read its secret into its output, leave a setuid-to-itself copy of id(1)
#: behind, and say how its input root is mounted inside the sandbox.
ACTION = r"""
cat src/secret.txt > out.txt
cp "$(command -v id)" tool && chmod 4755 tool
while read -r _id _parent _dev _root point options _rest; do
    if [ "$point" = "$ROOT" ]; then echo "MOUNT $options"; fi
done < /proc/self/mountinfo
"""


def _require_layout(staging: str, bound: int | None) -> None:
    require_tool("bwrap")
    require_tool("setpriv")
    require(os.geteuid() == 0, "a uid pool needs a root worker")
    if staging == "fuse":
        require_tool("fusermount3")
        require(os.path.exists("/dev/fuse"), "FUSE staging needs /dev/fuse")


@pytest.fixture
def pool_of() -> Iterator:
    pools: list[UidPool] = []

    def claim(size: int) -> UidPool:
        # Claimed host-wide, as a worker's: no live worker on this host shares these ids.
        pool = UidPool.claim(range(base, base + size) for base in range(TEST_UID_BASE, TEST_UID_BASE + 64 * size, size))
        pools.append(pool)
        return pool

    yield claim
    for pool in pools:
        pool.close()


def _as(uid: int, *argv: str) -> list[str]:
    done = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv],
        capture_output=True, text=True,
    )
    return done.stdout.splitlines()


def _top(build_root: str, input_root: str) -> str:
    """The action's build directory: the entry of the build root its input root is below."""
    return os.path.join(build_root, os.path.relpath(input_root, build_root).split("/")[0])


class Rendezvous(Runner):
    """Runs each request with ``inner``, then waits until ``parties`` actions have run, then
    probes every build directory as every other action's uid, the outsider and its own."""

    def __init__(self, inner: Runner, parties: int) -> None:
        self.inner = inner
        self.build_root = ""  # set once the farm exists
        self._all_ran = threading.Barrier(parties, timeout=120)
        self._all_probed = threading.Barrier(parties, timeout=120)
        self._lock = threading.Lock()
        self.roots: dict[int, str] = {}  # uid -> input root
        self.found: dict[tuple[int, int], list[str]] = {}  # (prober uid, owner uid) -> findings
        self.tops: dict[int, os.stat_result] = {}  # uid -> its build directory's stat
        self.tools: dict[int, os.stat_result] = {}  # uid -> the stat of what it left
        self.host_mounts: dict[int, str] = {}  # uid -> its input root's host mount options

    def run(self, request: SandboxRequest, cancel: threading.Event | None = None) -> SandboxResult:
        result = self.inner.run(request, cancel)
        assert request.run_as is not None
        uid = request.run_as.uid
        with self._lock:
            self.roots[uid] = request.input_root
            self.tops[uid] = os.stat(_top(self.build_root, request.input_root))
            self.tools[uid] = os.lstat(os.path.join(request.input_root, "tool"))
            self.host_mounts[uid] = _mount_options(request.input_root)
        self._all_ran.wait()
        for owner, root in self.roots.items():
            for prober in {uid, OUTSIDER} if owner != uid else {uid}:
                target = "control.txt" if prober == owner else "out.txt"
                self.found[(prober, owner)] = _as(prober, "sh", "-c", PROBE, "sh", root, target)
        self._all_probed.wait()
        return result


def _mount_options(path: str) -> str:
    """The per-mount options of the mount at ``path`` in the worker's namespace, or ""."""
    with open("/proc/self/mountinfo") as f:
        lines = [line.split() for line in f]
    return next((fields[5] for fields in reversed(lines) if fields[4] == path), "")


def _farm(staging: str, bound: int | None, pool: UidPool, root_mode: str, **kwargs) -> Farm:
    binds = (Bind("/usr", "/usr"),) if root_mode == "chroot" else ()
    return make_farm(
        max_action_timeout=60, staging=staging, bound_bytes=bound, identities=pool, extra_ro_binds=binds, **kwargs,
    )


def _inputs(root_mode: str) -> dict:
    inputs: dict = {"src/secret.txt": SECRET}
    if root_mode == "chroot":
        # A sysroot as BuildStream sends one: merged-/usr links, /usr bound from the host.
        inputs.update({n: "->" + os.readlink(f"/{n}") for n in ("bin", "lib", "lib64", "sbin") if os.path.islink(f"/{n}")})
    return inputs


@pytest.mark.parametrize("root_mode", ["host-tools", "chroot"])
@pytest.mark.parametrize("staging, bound", LAYOUTS, ids=LAYOUT_IDS)
def test_attack_concurrent_tenants_cannot_reach_each_others_build_directories_nor_run_their_setuid_leftovers(
    staging, bound, root_mode, pool_of,
):
    _require_layout(staging, bound)
    if root_mode == "chroot":
        require(all(os.path.islink(f"/{n}") for n in ("bin", "lib")), "chroot roots here link into a merged /usr")
    pool = pool_of(2)
    require(OUTSIDER not in pool.ids, "the outsider is outside the pool")
    rendezvous: list[Rendezvous] = []
    farm = _farm(staging, bound, pool, root_mode,
                 wrap_runner=lambda inner: rendezvous.append(Rendezvous(inner, 2)) or rendezvous[-1])
    [seen] = rendezvous
    seen.build_root = farm.build_root
    sandbox_root = "/build" if root_mode == "host-tools" else "/"
    try:
        outcomes: list = [None, None]

        def act(i: int) -> None:
            outcomes[i] = farm.run(
                ["sh", "-c", ACTION], _inputs(root_mode), output_paths=["out.txt"], platform={"rootMode": root_mode},
                environment_variables=[_env("PATH", "/usr/bin:/bin"), _env("ROOT", sandbox_root)],
            )

        threads = [threading.Thread(target=act, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for outcome in outcomes:
            assert outcome.ok, outcome.status.message
            assert outcome.result.exit_code == 0, farm.text(outcome.result.stderr_digest)
            # Nothing forged: each output is what its own action wrote.
            [out] = outcome.result.output_files
            assert farm.cache.read(Digest.from_proto(out.digest)) == SECRET
            # Inside, the input root is mounted nosuid,nodev.
            mounts = [line.split()[1] for line in farm.text(outcome.result.stdout_digest).splitlines()]
            assert mounts and all({"nosuid", "nodev"} <= set(m.split(",")) for m in mounts), mounts
    finally:
        farm.close()

    a, b = sorted(seen.roots)
    assert a != b and {a, b} <= set(pool.ids)  # two actions, two host uids of the pool
    for uid in (a, b):
        top = seen.tops[uid]
        assert (top.st_uid, top.st_gid, stat.S_IMODE(top.st_mode)) == (uid, uid, 0o700)
        tool = seen.tools[uid]  # the leftover is really setuid to its action's uid
        assert tool.st_uid == uid and tool.st_mode & stat.S_ISUID
        if seen.host_mounts[uid]:  # an overlay of the worker's: nosuid,nodev on the host too
            assert {"nosuid", "nodev"} <= set(seen.host_mounts[uid].split(",")), seen.host_mounts[uid]
        # The control: as its own uid the probe lists, reads, writes and runs the leftover.
        assert seen.found[(uid, uid)] == ["LISTED", f"READ {SECRET.decode().strip()}", "WROTE", f"RAN euid={uid}"]
    # The attacks: the other tenant's uid and a host user outside the pool get nothing.
    assert seen.found[(a, b)] == [] and seen.found[(b, a)] == []
    assert seen.found[(OUTSIDER, a)] == [] and seen.found[(OUTSIDER, b)] == []
    assert pool.free == 2


def _env(name: str, value: str) -> re_pb2.Command.EnvironmentVariable:
    return re_pb2.Command.EnvironmentVariable(name=name, value=value)


class HoldFirst(Runner):
    """Holds the first run, after its command ran, until ``release`` is set."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner
        self.holding = threading.Event()
        self.release = threading.Event()

    def run(self, request: SandboxRequest, cancel: threading.Event | None = None) -> SandboxResult:
        result = self.inner.run(request, cancel)
        if not self.holding.is_set():
            self.holding.set()
            assert self.release.wait(120), "never released"
        return result


@pytest.mark.parametrize("staging, bound", LAYOUTS, ids=LAYOUT_IDS)
def test_an_exhausted_pool_is_the_workers_fault_unavailable_never_a_result(staging, bound, pool_of):
    _require_layout(staging, bound)
    pool = pool_of(1)  # a pool smaller than the actions in flight: the config refuses this
    holds: list[HoldFirst] = []
    farm = _farm(staging, bound, pool, "host-tools", wrap_runner=lambda inner: holds.append(HoldFirst(inner)) or holds[-1])
    [hold] = holds
    try:
        first: list = []
        thread = threading.Thread(target=lambda: first.append(farm.run(["sh", "-c", "echo first > out.txt"], output_paths=["out.txt"])))
        thread.start()
        try:
            assert hold.holding.wait(120), "the first action never ran"
            second = farm.run(["sh", "-c", "echo second > out.txt"], output_paths=["out.txt"])
        finally:
            hold.release.set()
            thread.join()
        assert second.status.code == code_pb2.UNAVAILABLE, second.status
        assert "no sandbox uid free" in second.status.message and "sandbox_uid_range" in second.status.message
        assert second.failed_phase == "stage"
        assert not second.result.output_files and not second.result.HasField("stdout_digest")  # never a result
        [done] = first
        assert done.ok and done.result.exit_code == 0, done.status.message
    finally:
        farm.close()
    assert pool.free == 1


@pytest.mark.parametrize("staging, bound", LAYOUTS, ids=LAYOUT_IDS)
def test_after_50_actions_every_uid_is_back_in_the_pool_and_no_build_directory_is_left(staging, bound, pool_of):
    _require_layout(staging, bound)
    pool = pool_of(2)
    used: list[int] = []

    class Record(Runner):
        def __init__(self, inner: Runner) -> None:
            self.inner = inner

        def run(self, request: SandboxRequest, cancel: threading.Event | None = None) -> SandboxResult:
            assert request.run_as is not None
            used.append(request.run_as.uid)
            return self.inner.run(request, cancel)

    farm = _farm(staging, bound, pool, "host-tools", wrap_runner=Record)
    try:
        failures: list[str] = []

        def actions(n: int) -> None:
            for i in range(n):
                outcome = farm.run(["sh", "-c", f"echo {i} > out.txt; chmod 4755 out.txt"], output_paths=["out.txt"])
                if not (outcome.ok and outcome.result.exit_code == 0):
                    failures.append(outcome.status.message)

        threads = [threading.Thread(target=actions, args=(25,)) for _ in range(2)]  # 2 at once, 2 uids
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        farm.remover.drain()
        assert len(used) == 50 and set(used) == set(pool.ids)
        assert pool.free == 2 and pool.retired == frozenset()
        left = [name for name in os.listdir(farm.build_root) if not name.startswith(".")]
        assert left == [] and os.listdir(os.path.join(farm.build_root, ".trash")) == []
    finally:
        farm.close()


#: Every way an action might try to write through a hardlinked input to the cache.
TAMPER = r"""
for f in src/blob src/tool; do
    chmod u+w,g+w,o+w "$f"; echo tampered >> "$f"; truncate -s 0 "$f"; chmod u+s "$f"
done
exit 0
"""


@pytest.mark.parametrize("staging, bound", LAYOUTS, ids=LAYOUT_IDS)
def test_attack_no_pool_uid_can_chmod_or_write_the_cache_through_its_inputs(staging, bound, pool_of):
    _require_layout(staging, bound)
    pool = pool_of(3)
    used: set[int] = set()

    class Record(Runner):
        def __init__(self, inner: Runner) -> None:
            self.inner = inner

        def run(self, request: SandboxRequest, cancel: threading.Event | None = None) -> SandboxResult:
            assert request.run_as is not None
            used.add(request.run_as.uid)
            return self.inner.run(request, cancel)

    farm = _farm(staging, bound, pool, "host-tools", wrap_runner=Record)
    blob, tool = b"cached input\n", b"#!/bin/sh\necho tool\n"
    try:
        inputs = {"src/blob": blob, "src/tool": (tool, True)}
        for _ in range(2 * len(pool.ids)):  # one after another: the pool cycles through every uid
            outcome = farm.run(["sh", "-c", TAMPER], inputs)
            assert outcome.ok, outcome.status.message
        assert used == set(pool.ids)
        for content, executable in ((blob, False), (tool, True)):
            digest = Digest.of_bytes(content)
            path = farm.cache.path(digest, executable=executable)
            st = os.stat(path)
            with open(path, "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == digest.hash
            # The worker's, with the mode it was stored with (0644/0755: any chmod would show).
            assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == (0o755 if executable else 0o644)
    finally:
        farm.close()
