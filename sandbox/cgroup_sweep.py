"""Removing the action cgroups of workers that died without removing them.

Each worker names its action cgroups ``<worker pid>-<n>`` under a ``reapi-worker``
directory (sandbox/cgroups.py), one per hierarchy. A worker killed with SIGKILL leaves
them behind for ever: the kernel never removes a cgroup by itself. At start, before it
creates any, a worker sweeps the ones whose worker is gone.

Who is gone: the name's pid has no ``/proc/<pid>``, or it is our own pid while this process
has named none yet (a restarted worker in a container gets the same pid). Once it has
(:func:`note_own_cgroup`: an action's, or a spare made ahead), a later sweep in the same
process — a second controller, a probe — leaves them alone. Any live process
with that pid counts as the owner — whatever runs a sandbox makes these cgroups (the
daemon, ``run-action``, a test or benchmark process), so a command line proves nothing.

What is left in a dead worker's cgroup is killed: its sandbox should have died with it
(bubblewrap ``--die-with-parent``), but a bubblewrap monitor was seen here surviving a
SIGKILL of its worker, reparented to init and stuck for good, holding its cgroup, its
tmpfs and its stream files. This assumes that workers sharing a cgroup parent share a pid
namespace (a systemd service, one container): a worker in another pid namespace would have
names this process cannot check. A cgroup still busy after ``settle_seconds`` is left and
logged.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

_NAME = re.compile(r"(\d+)-\d+")
#: Whether this process has named a cgroup of its own (see the module docstring).
_named_own = False


def note_own_cgroup() -> None:
    """Record that this process now has cgroups of its own, which no sweep may take."""
    global _named_own
    _named_own = True


def _remove_settled(path: Path, remove_dir: Callable[[Path], None], settle_seconds: float, pid: int) -> bool:
    deadline = time.monotonic() + settle_seconds
    delay = 0.01
    while True:
        try:
            remove_dir(path)
            return True
        except FileNotFoundError:
            return False
        except OSError as error:
            procs = _procs(path)
            if error.errno != errno.EBUSY or time.monotonic() >= deadline:
                log.warning("leaving cgroup %s of dead worker %d (processes %s): %s", path, pid, procs, error)
                return False
            for leftover in procs:
                with contextlib.suppress(ProcessLookupError):
                    log.warning("killing process %d left in cgroup %s by dead worker %d", leftover, path, pid)
                    os.kill(leftover, signal.SIGKILL)
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _procs(path: Path) -> list[int]:
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def worker_is_alive(pid: int) -> bool:
    """Whether ``pid`` may still own action cgroups: any live process other than this one.
    Not only the ``reapi-worker`` daemon makes them — ``run-action``, tests and benchmarks
    run a sandbox in whatever process they are — so a command line proves nothing: a pid
    in use is alive (a reused pid only delays the sweep until it exits)."""
    if pid == os.getpid():
        return _named_own
    return os.path.exists(f"/proc/{pid}")


def sweep_dead_action_cgroups(
    parents: Iterable[Path],
    is_alive: Callable[[int], bool] = worker_is_alive,
    remove_dir: Callable[[Path], None] = os.rmdir,
    settle_seconds: float = 3.0,
) -> list[Path]:
    """Remove the empty ``<pid>-<n>`` cgroups under ``parents`` whose worker is not alive
    (module docstring), killing what is left in them; return those removed. A cgroup
    still busy is retried for up to ``settle_seconds``; then it is left, logged. Never
    raises."""
    removed = []
    alive: dict[int, bool] = {}
    for parent in dict.fromkeys(parents):  # cpu and cpuacct may share one hierarchy
        try:
            names = sorted(entry.name for entry in os.scandir(parent) if entry.is_dir(follow_symlinks=False))
        except OSError as error:
            log.warning("listing cgroups in %s: %s", parent, error)
            continue
        for name in names:
            match = _NAME.fullmatch(name)
            if match is None:
                continue
            pid = int(match.group(1))
            if pid not in alive:
                alive[pid] = is_alive(pid)
            if alive[pid]:
                continue
            path = parent / name
            if _remove_settled(path, remove_dir, settle_seconds, pid):
                removed.append(path)
    if removed:
        log.info("removed %d cgroup(s) of dead workers", len(removed))
    return removed
