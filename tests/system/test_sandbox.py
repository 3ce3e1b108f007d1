"""BubblewrapRunner against the real bubblewrap, cgroups and kernel. No fakes at this level.

Security tests are named after the attack they stop. Every test runs as the worker does:
as root, with the sandbox as 65534:65534 and the input root's directories owned by it.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass

import psutil
import pytest
from conftest import require, require_tool

from reapi_worker.sandbox import (
    Bind,
    BubblewrapRunner,
    ResourceLimits,
    RootMode,
    SandboxRequest,
    SandboxResult,
    SandboxSetupError,
    prepare_build_dir,
    probe_host,
    sandbox_can_protect_hardlinks,
)
from reapi_worker.sandbox.cgroup_spares import held_in_this_process
from reapi_worker.sandbox.rlimits import RlimitController

pytestmark = pytest.mark.bwrap
HOST_PATH = "/usr/bin:/bin"


@pytest.fixture(scope="module")
def runner() -> BubblewrapRunner:
    require_tool("bwrap")
    require_tool("setpriv")
    require(os.geteuid() == 0, "the worker's sandbox tests run as root (uid switch, chown)")
    return BubblewrapRunner()


@dataclass
class Build:
    """A worker-like layout: a base directory holding the cache, build directories and the
    output files, each input root's directories owned by the sandbox uid."""

    base: pathlib.Path
    root: pathlib.Path
    runner: BubblewrapRunner

    def request(self, *arguments: str, **kw) -> SandboxRequest:
        kw.setdefault("environment", {"PATH": HOST_PATH})
        kw.setdefault("input_root", str(self.root))
        kw.setdefault("stdout_path", str(self.base / "stdout"))
        kw.setdefault("stderr_path", str(self.base / "stderr"))
        return SandboxRequest(arguments=arguments, **kw)

    def run(self, *arguments: str, **kw) -> SandboxResult:
        return self.runner.run(self.request(*arguments, **kw))

    @property
    def stdout(self) -> str:
        return (self.base / "stdout").read_text()

    @property
    def stderr(self) -> str:
        return (self.base / "stderr").read_text()


@pytest.fixture
def build(runner) -> Build:
    # Not pytest's tmp_path: its ancestors are 0700, and bubblewrap (as the sandbox uid) must
    # be able to reach the input root, as it must under a real worker's build directory.
    base = pathlib.Path(tempfile.mkdtemp(prefix="reapi-sandbox-test-", dir="/dev/shm"))
    base.chmod(0o711)
    root = base / "root"
    root.mkdir()
    prepare_build_dir(str(root), *runner.host_ids)
    yield Build(base, root, runner)
    shutil.rmtree(base)


def sleepers(marker: str, since: float) -> list[psutil.Process]:
    """Processes running ``sleep <marker>`` started after ``since``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        if proc.info["cmdline"] == ["sleep", marker] and proc.info["create_time"] >= since - 1:
            found.append(proc)
    return found


# --- the command's view -------------------------------------------------------------------


def test_exit_codes_pass_through(build):
    assert build.run("sh", "-c", "exit 42").exit_code == 42
    result = build.run("true")
    assert (result.exit_code, result.signal, result.timed_out, result.oom_killed) == (0, None, False, False)


def test_a_signal_is_reported_like_a_shell_would(build):
    result = build.run("sh", "-c", "kill -TERM $$")
    assert (result.exit_code, result.signal) == (143, 15)


def test_environment_is_exactly_the_requests(build, monkeypatch):
    monkeypatch.setenv("REAPI_WORKER_SECRET", "must-not-leak")
    env = {"PATH": HOST_PATH, "FOO": "bar baz", "EMPTY": "", "LANG": "C.UTF-8"}
    assert build.run("env", environment=env).exit_code == 0
    assert sorted(build.stdout.splitlines()) == sorted(f"{k}={v}" for k, v in env.items())


@pytest.mark.parametrize("pwd", [None, "/build/src", "/build/src/", "/elsewhere"])
def test_pwd_is_exactly_the_clients_sent_or_not_with_or_without_the_env_shim(build, pwd):
    (build.root / "src").mkdir()
    prepare_build_dir(str(build.root), *build.runner.host_ids)
    env = {"PATH": HOST_PATH, **({} if pwd is None else {"PWD": pwd})}
    assert build.run("env", environment=env, working_directory="src").exit_code == 0, build.stderr
    assert sorted(build.stdout.splitlines()) == sorted(f"{k}={v}" for k, v in env.items())


def test_environment_is_exact_in_a_shell_too_except_what_the_shell_adds(build):
    build.run("sh", "-c", "env", environment={"PATH": HOST_PATH})
    assert "PATH=" + HOST_PATH in build.stdout.splitlines()
    assert not [line for line in build.stdout.splitlines() if line.startswith(("HOME=", "USER=", "TERM="))]


def test_working_directory_and_fixed_identity(build):
    (build.root / "src" / "lib").mkdir(parents=True)
    prepare_build_dir(str(build.root), *build.runner.host_ids)
    build.run("sh", "-c", "pwd; id -u; id -g; hostname", working_directory="src/lib")
    assert build.stdout.split() == ["/build/src/lib", "0", "0", "localhost"]


def test_bare_name_is_looked_up_on_the_requests_path_not_the_workers(build):
    tools = build.root / "tools"
    tools.mkdir()
    (tools / "mytool").write_text("#!/bin/sh\necho from-request-path\n")
    (tools / "mytool").chmod(0o755)
    assert build.run("mytool", environment={"PATH": "/build/tools:/usr/bin"}).exit_code == 0
    assert build.stdout == "from-request-path\n"
    # `ls` is on the worker's PATH (and in /usr/bin inside), but not on the request's.
    assert shutil.which("ls")
    assert build.run("ls", environment={"PATH": "/build/tools"}).exit_code == 127


def test_relative_command_is_relative_to_the_working_directory(build):
    (build.root / "sub").mkdir()
    (build.root / "sub" / "run.sh").write_text("#!/bin/sh\necho relative\n")
    (build.root / "sub" / "run.sh").chmod(0o755)
    assert build.run("./run.sh", working_directory="sub").exit_code == 0
    assert build.stdout == "relative\n"


@pytest.mark.parametrize("mode", [RootMode.HOST_TOOLS, RootMode.CHROOT])
def test_command_not_found_is_127_and_not_executable_is_126(build, mode, chroot_root):
    root = chroot_root if mode is RootMode.CHROOT else build.root
    (root / "data.txt").write_text("not a program\n")
    workdir_path = "/data.txt" if mode is RootMode.CHROOT else "/build/data.txt"
    binds = (Bind("/usr", "/usr"),) if mode is RootMode.CHROOT else ()
    common = dict(root_mode=mode, input_root=str(root), extra_ro_binds=binds)
    assert build.run("no-such-command", **common).exit_code == 127
    assert build.run("/no/such/path", **common).exit_code == 127
    assert build.run(workdir_path, **common).exit_code == 126  # exists, no x bit
    assert build.run("/usr", **common).exit_code == 126  # a directory


def test_stdout_and_stderr_go_to_their_files_or_interleave_in_one(build):
    build.run("sh", "-c", "echo out; echo err >&2")
    assert (build.stdout, build.stderr) == ("out\n", "err\n")
    both = str(build.base / "both")
    build.run("sh", "-c", "echo 1; echo 2 >&2; echo 3", stdout_path=both, stderr_path=both)
    assert pathlib.Path(both).read_text() == "1\n2\n3\n"


@pytest.fixture
def chroot_root(build) -> pathlib.Path:
    """A minimal root as BuildStream sends one: just links into /usr, bound from the host."""
    root = build.base / "chroot"
    root.mkdir()
    for name in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{name}"):
            (root / name).symlink_to(os.readlink(f"/{name}"))
    prepare_build_dir(str(root), *build.runner.host_ids)
    return root


def test_chroot_mode_runs_in_the_input_root_as_slash(build, chroot_root):
    require(all(os.path.islink(f"/{n}") for n in ("bin", "lib")), "needs a merged-/usr host")
    (chroot_root / "src").mkdir()
    prepare_build_dir(str(chroot_root), *build.runner.host_ids)
    result = build.run(
        "sh", "-c", "pwd; echo built > /src/out.txt; ls /",
        input_root=str(chroot_root), root_mode=RootMode.CHROOT, working_directory="src",
        extra_ro_binds=(Bind("/usr", "/usr"),),
    )
    assert result.exit_code == 0, build.stderr
    lines = build.stdout.split()
    assert lines[0] == "/src"
    assert {"bin", "lib", "src", "usr", "proc", "dev", "tmp"} <= set(lines[1:])
    assert "etc" not in lines and "build" not in lines  # nothing of the host but the bind
    assert (chroot_root / "src" / "out.txt").read_text() == "built\n"


def test_concurrent_runs_keep_their_own_outputs_and_descriptors(build):
    """Runs from several threads at once: no output, pipe or cgroup crosses between them."""
    results: dict[int, SandboxResult] = {}

    def one(i: int) -> None:
        out = str(build.base / f"out-{i}")
        results[i] = build.runner.run(build.request("sh", "-c", f"ls /proc/self/fd; echo run-{i}; exit {i}",
                                                    stdout_path=out, stderr_path=out))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i in range(6):
        assert results[i].exit_code == i
        lines = (build.base / f"out-{i}").read_text().split()
        assert lines[-1] == f"run-{i}"
        assert sorted(lines[:-1]) == ["0", "1", "2", "3"]  # stdio and ls's own directory fd


# --- attacks ------------------------------------------------------------------------------


def test_attack_network_off_cannot_connect_to_the_hosts_loopback(build):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(0)
        port = server.getsockname()[1]
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')"
        result = build.run("python3", "-c", probe)
        assert result.exit_code != 0 and "connected" not in build.stdout
        assert "Connection refused" in build.stderr  # its own loopback, where nobody listens
        with pytest.raises(BlockingIOError):
            server.accept()
        # The control: from the worker's namespace the server is there (network=on is no
        # way to it either: see test_tenant_isolation.py).
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_attack_cannot_see_the_workers_cache_home_or_another_build(build):
    cache = build.base / "cache"
    other = build.base / "other-build"
    for d in (cache, other):
        d.mkdir()
        (d / "secret").write_text("secret\n")
    visible = [str(p) for p in (cache, other, "/root", "/home", "/work", "/var", "/dev/shm/" + build.base.name)]
    script = "for p; do if [ -e \"$p\" ]; then echo \"VISIBLE $p\"; fi; done; ls -a /"
    assert build.run("sh", "-c", script, "sh", *visible).exit_code == 0
    assert "VISIBLE" not in build.stdout
    top = set(build.stdout.split()) - {".", ".."}
    allowed = {"build", "usr", "etc", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "proc", "dev", "tmp"}
    assert top <= allowed


def test_attack_cannot_modify_a_hardlinked_input(build):
    require(sandbox_can_protect_hardlinks(), "the sandbox runs as the cache's owner")
    cache = build.base / "cache"
    cache.mkdir(mode=0o755)
    blob = cache / "blob"
    blob.write_bytes(b"cached contents\n")
    blob.chmod(0o444)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    os.link(blob, build.root / "input")
    attack = (
        "chmod u+w input && echo x >> input; "
        "chmod 0666 input; echo y > input; truncate -s 0 input; "
        "ln input stolen; "
        "cat input"
    )
    result = build.run("sh", "-c", attack)
    assert result.exit_code == 0  # the last command, cat, still reads it
    assert build.stdout == "cached contents\n"
    assert "Operation not permitted" in build.stderr and "Permission denied" in build.stderr
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest
    st = blob.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_nlink) == (0o444, 0, 2)


def test_attack_replacing_a_hardlinked_input_does_not_touch_the_cache(build):
    """Writing a new file over the input's name is allowed (the directory is the action's);
    the cached inode is merely unlinked from the build directory."""
    blob = build.base / "blob"
    blob.write_bytes(b"cached\n")
    blob.chmod(0o444)
    os.link(blob, build.root / "input")
    assert build.run("sh", "-c", "echo new > input.tmp && mv -f input.tmp input && cat input").exit_code == 0
    assert build.stdout == "new\n" and blob.read_bytes() == b"cached\n"


def test_attack_double_forked_daemon_does_not_survive_success(build):
    started = time.time()
    result = build.run("sh", "-c", "(sleep 300 &) ; exit 0")
    assert result.exit_code == 0
    assert sleepers("300", started) == []


def test_attack_daemon_does_not_survive_a_timeout_and_partial_output_is_kept(build):
    started = time.time()
    result = build.run("sh", "-c", "(sleep 300 &); echo partial; sleep 300", timeout=0.5)
    assert result.timed_out and not result.cancelled
    assert (result.exit_code, result.signal) == (137, 9)
    assert build.stdout == "partial\n"
    assert 0.5 <= result.usage.wall_seconds < 5
    assert sleepers("300", started) == []


def test_cancel_kills_the_whole_tree_promptly(build):
    cancel = threading.Event()
    started = time.time()
    outcome: list[SandboxResult] = []
    thread = threading.Thread(
        target=lambda: outcome.append(build.runner.run(build.request("sh", "-c", "(sleep 300 &); sleep 300"), cancel))
    )
    thread.start()
    time.sleep(0.3)
    cancelled_at = time.monotonic()
    cancel.set()
    thread.join(5)
    latency = time.monotonic() - cancelled_at
    assert outcome and outcome[0].cancelled and not outcome[0].timed_out
    assert latency < 0.5, f"cancel took {latency:.3f} s"
    assert sleepers("300", started) == []


# --- limits and usage ---------------------------------------------------------------------


def cgroups(runner: BubblewrapRunner) -> None:
    require(runner.controller.kind.startswith("cgroup"), "no cgroup controller on this host")


def test_memory_limit_exceeded_is_reported_as_oom_killed(build):
    cgroups(build.runner)
    result = build.run("python3", "-c", "x = 'a' * (256 << 20)", limits=ResourceLimits(memory_bytes=64 << 20))
    assert result.oom_killed
    assert (result.exit_code, result.signal) == (137, 9)
    assert result.usage.cgroup is not None and result.usage.cgroup.memory_peak_bytes <= 64 << 20


def test_within_the_memory_limit_is_not_oom_killed(build):
    cgroups(build.runner)
    result = build.run("python3", "-c", "x = 'a' * (16 << 20)", limits=ResourceLimits(memory_bytes=128 << 20))
    assert result.exit_code == 0 and not result.oom_killed
    assert result.usage.cgroup.memory_peak_bytes >= 16 << 20


FORK_BOMB = """
import os, time
n = 0
for _ in range(40):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(3)
        os._exit(0)
    n += 1
print(n)
"""


def test_pids_limit_stops_a_fork_bomb(build):
    cgroups(build.runner)
    result = build.run("python3", "-c", FORK_BOMB, limits=ResourceLimits(max_pids=4))
    assert result.exit_code == 0, build.stderr
    assert int(build.stdout) == 3  # python itself is the fourth
    if result.usage.cgroup.pids_peak is not None:
        assert result.usage.cgroup.pids_peak <= 4 + 2


def test_usage_counts_the_whole_tree_daemons_included(build):
    cgroups(build.runner)
    burn = "python3 -c 'import time; t = time.process_time()\nwhile time.process_time() - t < 0.2: pass'"
    result = build.run("sh", "-c", f"({burn} &); {burn}; sleep 0.3")  # one burner double-forked
    usage = result.usage
    assert usage.user_cpu_seconds + usage.system_cpu_seconds >= 0.35
    assert usage.cgroup.cpu_seconds >= 0.35
    assert usage.peak_rss_bytes == usage.cgroup.memory_peak_bytes > 0
    assert usage.cgroup.pids_peak is None or usage.cgroup.pids_peak >= 4
    assert usage.wall_seconds >= 0.3


def test_the_sandbox_sees_its_own_cgroup_as_root_and_is_inside_it(build):
    """Joined before bubblewrap clones: the cgroup namespace is rooted at the action's cgroup
    (no worker path, the same on every run), and the command's processes count against it."""
    cgroups(build.runner)
    result = build.run("sh", "-c", "cat /proc/self/cgroup; x=$(head -c 20000000 /dev/zero | tr '\\0' a); sleep 0.1",
                       limits=ResourceLimits(memory_bytes=256 << 20))
    assert result.exit_code == 0, build.stderr
    lines = [line for line in build.stdout.splitlines() if line]
    assert lines and all(line.endswith(":/") for line in lines), lines
    assert result.usage.cgroup.memory_peak_bytes >= 20_000_000


def test_without_a_cgroup_only_wall_time_is_known(build):
    runner = BubblewrapRunner(controller=RlimitController(), layout=build.runner.layout)
    usage = runner.run(build.request("true")).usage
    assert usage.wall_seconds > 0
    assert (usage.user_cpu_seconds, usage.peak_rss_bytes, usage.cgroup) == (None, None, None)


def test_attack_daemon_does_not_survive_success_without_a_cgroup_either(build):
    started = time.time()
    runner = BubblewrapRunner(controller=RlimitController(), layout=build.runner.layout)
    assert runner.run(build.request("sh", "-c", "(sleep 300 &); exit 0")).exit_code == 0
    assert sleepers("300", started) == []


def test_no_cgroup_is_left_behind(build):
    cgroups(build.runner)
    build.run("true", limits=ResourceLimits(memory_bytes=64 << 20, max_pids=10, cpu_cores=1))
    build.run("sh", "-c", "sleep 30", timeout=0.2)
    parents = getattr(build.runner.controller, "parents", None) or {"": build.runner.controller.parent}
    spares = held_in_this_process()  # made ahead by this process's runners: no action's
    mine = [p for parent in parents.values() for p in parent.iterdir()
            if p.name.startswith(f"{os.getpid()}-") and p.name not in spares]
    assert mine == []


def test_rlimit_fallback_limits_memory(build):
    require_tool("prlimit")
    runner = BubblewrapRunner(controller=RlimitController(), layout=build.runner.layout)
    request = build.request("python3", "-c", "x = 'a' * (256 << 20)", limits=ResourceLimits(memory_bytes=64 << 20))
    result = runner.run(request)
    assert result.exit_code == 1 and not result.oom_killed
    assert "MemoryError" in build.stderr


# --- set-up failures and the host -----------------------------------------------------------


def test_a_missing_bind_source_is_a_setup_error_and_leaves_nothing(build):
    with pytest.raises(SandboxSetupError, match="/nonexistent"):
        build.run("true", extra_ro_binds=(Bind("/nonexistent/toolchain", "/opt/toolchain"),))
    with pytest.raises(SandboxSetupError):
        build.run("true", input_root=str(build.base / "missing-root"))


def test_probe_host_sees_this_machine(runner):
    caps = probe_host(controller=runner.controller)
    assert caps.bwrap_path and caps.bwrap_version and caps.user_namespaces, caps.problems
    assert RootMode.CHROOT in caps.root_modes and RootMode.HOST_TOOLS in caps.root_modes
    assert caps.resource_controller == runner.controller.kind
    assert caps.hardlinks_protected
    if caps.cgroup_version == 1:
        assert {"memory", "pids"} <= caps.cgroup_controllers


def test_a_sandbox_dies_with_the_spawner_and_its_run_is_a_setup_failure_not_a_result(build):
    """The spawner (sandbox/spawner.py) is bubblewrap's parent: if it is killed, every sandbox
    it started dies with it, and their runs end as set-up failures (retried), never as a
    result the command did not earn."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(build.run("sleep", "67"))
        except SandboxSetupError as e:
            outcome.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 10
    while not _sleepers("67") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _sleepers("67"), "the action never started"
    spawner = build.runner._spawner._process
    assert spawner is not None
    os.kill(spawner.pid, 9)
    thread.join(10)
    assert not thread.is_alive(), "run did not return after its sandbox died"
    assert len(outcome) == 1 and isinstance(outcome[0], SandboxSetupError), outcome
    assert not _sleepers("67")
    build.run("true")  # the next run starts a new spawner


def _sleepers(seconds: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", seconds]]
