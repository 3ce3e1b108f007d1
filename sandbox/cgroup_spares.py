"""Action cgroups made ahead of their actions, off the actions' path.

Making an action's cgroups — one ``mkdir`` per hierarchy, which the kernel answers by
setting up every controller's state — cost 0.3–0.4 ms of each sandbox start here (v1,
three hierarchies). :class:`SpareCgroups` keeps a few made by a thread of its own; an action
takes one, writes its limits and goes. When none is ready (a burst of actions, or making
them fails) the controller makes its own as before, so a spare is only ever a saving.

Spares are named like any action's cgroup (``<worker pid>-<n>``), so those a dead worker
left are removed by the next start's sweep (:mod:`.cgroup_sweep`), used or not.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)


class SpareCgroups:
    """``count`` cgroups of one name under each of ``parents``, made ahead by a daemon
    thread. ``name`` makes a fresh cgroup name (the controllers' own). Thread-safe."""

    def __init__(self, parents: Iterable[Path], name: Callable[[], str], count: int = 2) -> None:
        #: One directory per hierarchy (co-mounted controllers share a parent).
        self.parents = tuple(dict.fromkeys(parents))
        self._name = name
        self._count = count
        self._ready: collections.deque[str] = collections.deque()
        self._making: str | None = None
        self._wanted = threading.Condition()
        threading.Thread(target=self._keep_ready, name="cgroup-spares", daemon=True).start()

    def take(self) -> str | None:
        """The name of a cgroup that exists under every parent, now the caller's; ``None``
        if none is ready."""
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
            return {*self._ready, *([self._making] if self._making else [])}

    def _keep_ready(self) -> None:
        while True:
            with self._wanted:
                while len(self._ready) >= self._count:
                    self._wanted.wait()
                name = self._making = self._name()
            made: list[Path] = []
            try:
                for parent in self.parents:
                    (parent / name).mkdir()
                    made.append(parent / name)
            except OSError as e:
                # The actions make their own, and say why if they cannot either.
                log.warning("no spare cgroups will be made ahead: %s", e)
                for path in made:
                    path.rmdir()
                with self._wanted:
                    self._making = None
                return
            with self._wanted:
                self._ready.append(name)
                self._making = None
