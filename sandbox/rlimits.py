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

import shutil

from .errors import SandboxSetupError
from .limits import SANDBOX_OWN_TASKS, Confinement, ResourceController
from .request import ResourceLimits


class RlimitConfinement(Confinement):
    def __init__(self, prefix: tuple[str, ...]) -> None:
        self._prefix = prefix

    @property
    def spawn_prefix(self) -> tuple[str, ...]:
        return self._prefix

    def close(self) -> None:
        pass


class RlimitController(ResourceController):
    """Limits through util-linux ``prlimit COMMAND`` in the spawn prefix (see module docstring)."""

    kind = "rlimit"

    def __init__(self, prlimit: str | None = None) -> None:
        self._prlimit = prlimit or shutil.which("prlimit")
        self.enforces = frozenset({"memory", "pids"}) if self._prlimit else frozenset()

    def confine(self, limits: ResourceLimits) -> Confinement:
        return RlimitConfinement(rlimit_prefix(self._prlimit, limits))


def rlimit_prefix(prlimit: str | None, limits: ResourceLimits) -> tuple[str, ...]:
    """The ``prlimit`` argv prefix for ``limits`` (empty when nothing is to be limited)."""
    options = []
    if limits.memory_bytes is not None:
        options.append(f"--data={limits.memory_bytes}:{limits.memory_bytes}")
    if limits.max_pids is not None:
        nproc = limits.max_pids + SANDBOX_OWN_TASKS
        options.append(f"--nproc={nproc}:{nproc}")
    if limits.open_files is not None:
        options.append(f"--nofile={limits.open_files}:{limits.open_files}")
    if not options:
        return ()
    if prlimit is None:
        raise SandboxSetupError("memory/pids/open-files limits requested but util-linux prlimit is not installed")
    return (prlimit, *options, "--")
