"""The fallback when no cgroup can be used: per-process rlimits.

Weaker than cgroups, and documented as such:

* memory: RLIMIT_DATA per process (heap and private writable mappings), not the sum over the
  action. Chosen over RLIMIT_AS because runtimes that reserve large address ranges without
  using them (Go, the JVM, sanitizers) would fail under RLIMIT_AS. Past the limit
  allocations fail (the command usually exits with an error); nothing is OOM-killed, so
  ``oom_killed`` is always ``False``.
* pids: RLIMIT_NPROC counts every process of the sandbox's *host uid*, including other
  actions running at the same time under that uid; the runner adds the sandbox's own two.
* cpu: not enforced (RLIMIT_CPU is a total, not a rate).
* open files: RLIMIT_NOFILE, as under cgroups.
* no ``pids_exhausted``: a refused fork is seen by the command only.
* no second line for killing: the pid namespace is the only one (it is sufficient: nothing
  leaves a pid namespace).
"""

from __future__ import annotations

import resource

from .limits import SANDBOX_OWN_TASKS, Confinement, ResourceController
from .request import ResourceLimits


class RlimitConfinement(Confinement):
    def __init__(self, rlimits: tuple[tuple[int, int], ...]) -> None:
        self._rlimits = rlimits

    @property
    def rlimits(self) -> tuple[tuple[int, int], ...]:
        return self._rlimits

    def close(self) -> None:
        pass


class RlimitController(ResourceController):
    """Limits as rlimits the spawned process sets on itself (see module docstring)."""

    kind = "rlimit"
    enforces = frozenset({"memory", "pids"})

    def confine(self, limits: ResourceLimits) -> Confinement:
        return RlimitConfinement(action_rlimits(limits))


def action_rlimits(limits: ResourceLimits) -> tuple[tuple[int, int], ...]:
    """The ``(RLIMIT_*, value)`` pairs for ``limits`` (see the module docstring)."""
    rlimits = []
    if limits.memory_bytes is not None:
        rlimits.append((resource.RLIMIT_DATA, limits.memory_bytes))
    if limits.max_pids is not None:
        rlimits.append((resource.RLIMIT_NPROC, limits.max_pids + SANDBOX_OWN_TASKS))
    if limits.open_files is not None:
        rlimits.append((resource.RLIMIT_NOFILE, limits.open_files))
    return tuple(rlimits)
