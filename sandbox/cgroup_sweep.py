"""Removing the action cgroups of workers that died without removing them.

Each worker names its action cgroups ``<worker pid>-<n>`` under a ``reapi-worker``
directory (sandbox/cgroups.py), one per hierarchy. A worker killed with SIGKILL leaves
them behind for ever: the kernel never removes a cgroup by itself. At start, before it
creates any, a worker sweeps the ones whose worker is gone.

Who is gone: the name's pid has no ``/proc/<pid>``, or its command line is not a
reapi-worker's (the pid was reused), or it is our own pid (a restarted worker in a
container gets the same pid; we have created nothing yet). A cgroup that still holds
processes is left alone and logged, never killed: it may belong to a live worker whose
pid this process cannot see (another pid namespace sharing the parent), and a dead
worker's actions die with it (bubblewrap ``--die-with-parent``), so a dead worker's cgroup
is empty. ``rmdir`` of a cgroup that is not empty fails (EBUSY) anyway.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

_NAME = re.compile(r"(\d+)-\d+")


def worker_is_alive(pid: int) -> bool:
    """Whether ``pid`` is a live reapi-worker other than this process."""
    if pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            cmdline = stream.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True  # cannot tell: keep it
    return b"reapi" in cmdline  # reapi-worker, or python -m reapi_worker.worker.cli


def sweep_dead_action_cgroups(
    parents: Iterable[Path],
    is_alive: Callable[[int], bool] = worker_is_alive,
    remove_dir: Callable[[Path], None] = os.rmdir,
) -> list[Path]:
    """Remove the empty ``<pid>-<n>`` cgroups under ``parents`` whose worker is not alive
    (module docstring); return those removed. Never raises for one cgroup: logs it."""
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
            try:
                remove_dir(path)
            except FileNotFoundError:
                continue
            except OSError as error:
                log.warning("leaving cgroup %s of dead worker %d: %s", path, pid, error)
                continue
            removed.append(path)
    if removed:
        log.info("removed %d cgroup(s) of dead workers", len(removed))
    return removed
