"""Resource limits and process-tree control behind one interface.

A :class:`ResourceController` is chosen once when the worker starts
(:func:`~.probe.choose_resource_controller`): cgroup v2, cgroup v1, or rlimits as the
fallback. For each action it hands out a :class:`Confinement`, which the runner uses in a
fixed order::

    with controller.confine(limits) as confinement:     # create (e.g. mkdir the cgroup)
        proc = spawn(confinement.spawn_prefix + ...)    # rlimits (v1: joins too) before exec
        confinement.join(proc.pid)                      # v2: before the process can fork
        ... release the command, wait ...
        confinement.kill_all()                          # second line after the pid namespace
        confinement.oom_killed(); confinement.usage()
                                                        # __exit__: kill leftovers, remove

When the process joins: it must be inside its cgroup before it can fork, or a child could
escape; and bubblewrap creates the sandbox's cgroup namespace when it clones, so joining
before that clone makes the sandbox see its own cgroup as ``/`` (no worker paths, the same on
every run). Two ways, each chosen by what the kernel charges for it:

* in the spawn prefix — cgroup v1: a tiny ``/bin/sh`` moves its own (only) thread into each
  hierarchy through ``tasks`` and execs the rest. That skips the global lock a move through
  ``cgroup.procs`` takes, whose wait for an RCU grace period (5–10 ms here, once per action)
  was most of the cgroup cost (:func:`~.cgroups.self_join_prefix` has the figures);
* in :meth:`Confinement.join`, from the worker — cgroup v2, where only whole processes move.
  The runner spawns bubblewrap with its options still to come through a pipe
  (``--args FD``); until it has them, bubblewrap — and the execs before it — cannot fork,
  and the worker writes the pid meanwhile, so the lock's wait overlaps those execs.

Rlimits need a prefix too: the worker may lack CAP_SYS_RESOURCE — this one does — so it
cannot set them on another process. The cgroup prefixes' shell sets ``ulimit -n``; the
rlimit fallback uses util-linux ``prlimit``, which sets its own limits and execs the rest.

Implementations: :class:`~.cgroups.CgroupV2Controller`, :class:`~.cgroups.CgroupV1Controller`,
:class:`~.rlimits.RlimitController`.
"""

from __future__ import annotations

import abc
from types import TracebackType

from .request import ResourceLimits
from .usage import CgroupUsage

#: Tasks the sandbox itself needs besides the command: bubblewrap's monitor and its init.
SANDBOX_OWN_TASKS = 2


class Confinement(abc.ABC):
    """One action's limits and process group. Not thread-safe; used by one run only.

    ``__exit__`` always kills whatever is left and releases everything (removes the cgroup),
    even when the run failed.
    """

    @property
    @abc.abstractmethod
    def spawn_prefix(self) -> tuple[str, ...]:
        """argv prefix that sets the confinement's per-process limits (and may join it), then
        execs the rest; may be empty.

        Runs with the worker's privileges, before the switch to the sandbox's uid."""

    def join(self, pid: int) -> None:
        """Place the process ``pid`` — spawned with :attr:`spawn_prefix`, not yet able to
        fork (see the module docstring) — in the confinement. Raises SandboxSetupError if it
        cannot; the caller must then kill the process before it can run anything. Default:
        nothing to join (the prefix did all)."""

    def kill_all(self) -> None:
        """SIGKILL every process still in the confinement and wait until they are gone."""

    def oom_killed(self) -> bool:
        """Whether the kernel OOM-killed a process of the action because of its limit."""
        return False

    def pids_exhausted(self) -> bool:
        """Whether a fork or clone of the action was refused because of its pids limit."""
        return False

    def usage(self) -> CgroupUsage | None:
        """The confinement's own figures, or ``None`` if it has none."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Kill leftovers and release everything. Idempotent."""

    def __enter__(self) -> "Confinement":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class ResourceController(abc.ABC):
    """Hands out per-action :class:`Confinement` s. Thread-safe.

    ``kind`` names the implementation (``"cgroup-v2"``, ``"cgroup-v1"``, ``"rlimit"``);
    ``enforces`` says which of ``"memory"``, ``"pids"``, ``"cpu"`` it can limit — a limit it
    cannot enforce is ignored, so the worker should advertise only these.
    """

    kind: str
    enforces: frozenset[str]

    @abc.abstractmethod
    def confine(self, limits: ResourceLimits) -> Confinement:
        """Create the confinement for one action; raises SandboxSetupError if it cannot."""
