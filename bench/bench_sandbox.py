"""The sandbox start alone: ``BubblewrapRunner.run`` of ``/bin/true`` beside ``bwrap true``.

Rows (medians of ``--runs``, interleaved in random order, a pause between runs so that each
run meets the kernel as an action of a real worker would — see :mod:`reapi_worker.sandbox.limits`:
the cgroup lock waits an RCU grace period only when it was idle):

* ``bwrap true (root)`` — the floor: ``bwrap --unshare-all ... /bin/true`` as root;
* ``setpriv+bwrap true`` — the same dropped to uid 65534, as the runner does it;
* ``setpriv+bwrap, the runner's options`` — bubblewrap with exactly the options the runner
  gives it for this request (HOST_TOOLS: ``/etc`` as one bind of the runner's prepared view,
  :mod:`reapi_worker.sandbox.etc_view`; a sized /tmp; the ``env -u PWD`` shim) but none of
  its control descriptors: what the runner adds beyond this row is its own Python and its
  confinement;
* ``..., no env shim`` — the same without the shim (what a client that sends
  ``PWD`` = its working directory gets): the shim's exec;
* ``..., /etc entry by entry (before)`` — the same options with ``/etc``'s ~30 allowed
  entries bound one by one, as before the view: the same-run baseline of the view;
* ``exec chain (before): sh + setpriv + bwrap, the runner's options`` — how the runner
  started bubblewrap before the spawner (:mod:`reapi_worker.sandbox.spawner`): a ``/bin/sh``
  that sets RLIMIT_NOFILE and writes ``0`` into its cgroups' ``tasks``, then ``setpriv``,
  then bubblewrap with the runner's options — the cgroups made and removed by this host's
  controller, as for the runner: the same-run baseline of the spawner;
* ``runner, cgroup`` — the runner with this host's cgroup controller and the default bounds
  (memory, pids, /tmp size, open files), started through its spawner;
* ``runner, cgroup, /etc entry by entry (before)`` — the same runner without the view;
* ``runner, rlimit`` / ``runner, no limits`` — the rlimit fallback, and no confinement at all;
* ``runner, cgroup, the client's PWD (no env shim)`` — the first runner row for a request
  whose client sent ``PWD`` = its working directory (or a CHROOT one): no ``env`` exec in the
  sandbox (:mod:`reapi_worker.sandbox.bwrap_args` says why there is one otherwise).

Usage: python bench/bench_sandbox.py [--runs 31] [--pause 0.05]. Needs root. Never asserts.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from reapi_worker.sandbox.bubblewrap import SPARE_CGROUPS, BubblewrapRunner
from reapi_worker.sandbox.bwrap_args import ControlFds, bwrap_arguments
from reapi_worker.sandbox.identity import prepare_build_dir
from reapi_worker.sandbox.limits import ResourceController
from reapi_worker.sandbox.probe import choose_resource_controller
from reapi_worker.sandbox.request import ResourceLimits, SandboxRequest
from reapi_worker.sandbox.rlimits import RlimitController

BWRAP = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
         "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev", "/bin/true"]
SETPRIV = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
BOUNDS = ResourceLimits(memory_bytes=1 << 30, max_pids=1024, tmp_bytes=256 << 20, open_files=4096)


def exec_chain(controller: ResourceController, options: list[str], command: tuple[str, ...]) -> None:
    """The spawn as it was before the spawner: one program per step (see the module docstring)."""
    with controller.confine(BOUNDS) as confinement:
        script = (f"ulimit -n {BOUNDS.open_files} || exit 125; "
                  'for t in "$@"; do [ "$t" = -- ] && break; echo 0 > "$t" || exit 125; shift; done; shift; exec "$@"')
        subprocess.run(["/bin/sh", "-c", script, "sh", *confinement.join_tasks, "--", *SETPRIV, "bwrap", *options,
                        "--", *command], check=True, env={}, cwd="/", start_new_session=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=31)
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between runs, not timed")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-sandbox-", dir="/dev/shm"))
    base.chmod(0o711)
    root = base / "root"
    root.mkdir()
    controller = choose_resource_controller(spares=SPARE_CGROUPS)  # as the runner chooses it
    runners = {
        f"runner, {controller.kind}": (BubblewrapRunner(controller=controller), BOUNDS),
        f"runner, {controller.kind}, /etc entry by entry (before)":
            (BubblewrapRunner(controller=controller, etc_view=False), BOUNDS),
        "runner, rlimit": (BubblewrapRunner(controller=RlimitController()), BOUNDS),
        "runner, no limits": (BubblewrapRunner(controller=RlimitController()), ResourceLimits()),
    }
    prepare_build_dir(str(root), *next(iter(runners.values()))[0].host_ids)

    def run(runner: BubblewrapRunner, limits: ResourceLimits) -> Callable[[], object]:
        request = SandboxRequest(arguments=("/bin/true",), environment={}, input_root=str(root),
                                 stdout_path=str(base / "out"), stderr_path=str(base / "err"), limits=limits)
        return lambda: runner.run(request)

    def run_with_pwd(runner: BubblewrapRunner, limits: ResourceLimits) -> Callable[[], object]:
        probe = SandboxRequest(arguments=("/bin/true",), environment={}, input_root=str(root),
                               stdout_path=str(base / "out"), stderr_path=str(base / "err"), limits=limits)
        request = SandboxRequest(arguments=("/bin/true",), environment={"PWD": probe.sandbox_working_directory},
                                 input_root=str(root), stdout_path=str(base / "out"), stderr_path=str(base / "err"),
                                 limits=limits)
        return lambda: runner.run(request)

    plain = next(iter(runners.values()))[0]
    assert plain.etc_view is not None, "the bench runs as root: the runner has its /etc view"
    request = SandboxRequest(arguments=("/bin/true",), environment={}, input_root=str(root),
                             stdout_path=str(base / "out"), stderr_path=str(base / "err"), limits=BOUNDS)

    def without_fds(options: tuple[str, ...]) -> list[str]:
        return [o for i, o in enumerate(options) if not (o.endswith("-fd") or options[i - 1].endswith("-fd"))]

    with plain.etc_view.acquire() as etc_view:  # unchanged /etc: the same view every run
        same = bwrap_arguments(request, plain.layout, ControlFds(-1, -1, -1), etc_view)
    per_entry = bwrap_arguments(request, plain.layout, ControlFds(-1, -1, -1))
    options, per_entry_options = without_fds(same.options), without_fds(per_entry.options)
    cases: dict[str, Callable[[], object]] = {
        "bwrap true (root)": lambda: subprocess.run(BWRAP, check=True),
        "setpriv+bwrap true": lambda: subprocess.run(SETPRIV + BWRAP, check=True),
        "setpriv+bwrap, the runner's options": lambda: subprocess.run(
            [*SETPRIV, "bwrap", *options, "--", *same.command], check=True),
        "setpriv+bwrap, the runner's options, no env shim": lambda: subprocess.run(
            [*SETPRIV, "bwrap", *options, "--", *request.arguments], check=True),
        "setpriv+bwrap, /etc entry by entry (before)": lambda: subprocess.run(
            [*SETPRIV, "bwrap", *per_entry_options, "--", *per_entry.command], check=True),
        "exec chain (before): sh + setpriv + bwrap, the runner's options":
            lambda: exec_chain(controller, options, same.command),
        **{name: run(runner, limits) for name, (runner, limits) in runners.items()},
        f"runner, {controller.kind}, the client's PWD (no env shim)": run_with_pwd(plain, BOUNDS),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for case in cases.values():  # warm up: page cache, imports
            case()
        for _ in range(args.runs):
            order = list(cases.items())
            random.shuffle(order)
            for name, case in order:
                time.sleep(args.pause)
                start = time.perf_counter()
                case()
                times[name].append((time.perf_counter() - start) * 1000)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    floor = statistics.median(times["bwrap true (root)"])
    print(f"Sandbox start, /bin/true, median of {args.runs} interleaved runs, ms (pause {args.pause}s; "
          f"load {os.getloadavg()[0]:.2f})")
    print(f"{'what':<64} {'median':>8} {'min':>8} {'max':>8} {'/bwrap':>7}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<64} {median:8.2f} {min(values):8.2f} {max(values):8.2f} {median / floor:6.2f}x")


if __name__ == "__main__":
    main()
