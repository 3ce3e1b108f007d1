"""Action cgroups made ahead of their actions, off the actions' path.

Making an action's cgroups — one ``mkdir`` per hierarchy, which the kernel answers by
setting up every controller's state — and writing its limits cost ~0.4 ms of each sandbox
start here (v1, three hierarchies; 0.24 ms of it the memory limit alone). :class:`SpareCgroups`
keeps a few made by a thread of its own, each *prepared* by the controller with the limits
the last action had (a farm's actions mostly share one set of bounds); an action whose
limits match takes one and goes. When none is ready or its limits differ, the controller
makes its own as before, so a spare is only ever a saving.

Spares are named like any action's cgroup (``<worker pid>-<n>``), so those a dead worker
left are removed by the next start's sweep (:mod:`.cgroup_sweep`), used or not.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)


class SpareCgroups:
    """``count`` cgroups of one name under each of ``parents``, made ahead by a daemon
    thread. ``name`` makes a fresh cgroup name (the controllers' own); ``prepare(name)``,
    called once each is made, readies it and returns what it did (the limits it wrote),
    handed out with it; ``remove_dir`` removes one (tests on fake trees pass their own).
    Thread-safe.

    :meth:`close` removes those still spare; every instance is closed when the interpreter
    exits, so only a killed process leaves spares (for the next start's sweep)."""

    def __init__(
        self, parents: Iterable[Path], name: Callable[[], str], count: int = 2,
        prepare: Callable[[str], object] = lambda _: None, remove_dir: Callable[[Path], None] = os.rmdir,
    ) -> None:
        #: One directory per hierarchy (co-mounted controllers share a parent).
        self.parents = tuple(dict.fromkeys(parents))
        self._name = name
        self._count = count
        self._prepare = prepare
        self._remove_dir = remove_dir
        self._ready: collections.deque[tuple[str, object]] = collections.deque()
        self._making: str | None = None
        self._closed = False
        self._wanted = threading.Condition()
        with _ALL_LOCK:
            _ALL.append(self)
        threading.Thread(target=self._keep_ready, name="cgroup-spares", daemon=True).start()

    def take(self) -> tuple[str, object] | None:
        """The name of a cgroup that exists under every parent, now the caller's, and what
        ``prepare`` returned for it; ``None`` if none is ready."""
        with self._wanted:
            name = self._ready.popleft() if self._ready else None
            self._wanted.notify()
        return name

    def ready(self) -> int:
        """How many are ready to be taken now."""
        with self._wanted:
            return len(self._ready)

    def held(self) -> set[str]:
        """The names of the cgroups it holds now: ready, or being made."""
        with self._wanted:
            return {*(name for name, _ in self._ready), *([self._making] if self._making else [])}

    def close(self) -> None:
        """Make no more, and remove those not taken. Idempotent."""
        with self._wanted:
            self._closed = True
            spare = [name for name, _ in self._ready]
            self._ready.clear()
            self._wanted.notify()
        for name in spare:
            self.remove(name)

    def _keep_ready(self) -> None:
        while True:
            with self._wanted:
                while len(self._ready) >= self._count and not self._closed:
                    self._wanted.wait()
                if self._closed:
                    return
                name = self._making = self._name()
            try:
                for parent in self.parents:
                    (parent / name).mkdir()
                prepared = self._prepare(name)
            except OSError as e:
                # The actions make their own, and say why if they cannot either.
                log.warning("no spare cgroups will be made ahead: %s", e)
                self.remove(name)
                with self._wanted:
                    self._making = None
                return
            with self._wanted:
                self._making = None
                if not self._closed:
                    self._ready.append((name, prepared))
                    continue
            self.remove(name)  # closed while it was being made

    def remove(self, name: str) -> None:
        """Remove the spare ``name`` (taken, and not wanted after all) under every parent."""
        for parent in self.parents:
            try:
                self._remove_dir(parent / name)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("leaving spare cgroup %s: %s", parent / name, e)


_ALL: list[SpareCgroups] = []
_ALL_LOCK = threading.Lock()


def held_in_this_process() -> set[str]:
    """The names of every spare cgroup this process holds now (for checks of leftovers)."""
    with _ALL_LOCK:
        instances = list(_ALL)
    return {name for spares in instances for name in spares.held()}


@atexit.register
def _close_all() -> None:
    with _ALL_LOCK:
        instances = list(_ALL)
    for spares in instances:
        spares.close()
