"""Resource limits and process-tree control behind one interface.

A :class:`ResourceController` is chosen once when the worker starts
(:func:`~.probe.choose_resource_controller`): cgroup v2, cgroup v1, or rlimits as the
fallback. For each action it hands out a :class:`Confinement`, which the runner uses in a
fixed order::

    with controller.confine(limits) as confinement:     # create (e.g. mkdir the cgroup)
        proc = spawn(rlimits=confinement.rlimits,       # the child applies these to itself
                     join_tasks=confinement.join_tasks) # (v1: joins) before it execs
        confinement.join(proc.pid)                      # v2: before the process can fork
        ... release the command, wait ...
        confinement.kill_all()                          # second line after the pid namespace
        confinement.oom_killed(); confinement.usage()
                                                        # __exit__: kill leftovers, remove

When the process joins: it must be inside its cgroup before it can fork, or a child could
escape; and bubblewrap creates the sandbox's cgroup namespace when it clones, so joining
before that clone makes the sandbox see its own cgroup as ``/`` (no worker paths, the same on
every run). Two ways, each chosen by what the kernel charges for it:

* by the child itself — cgroup v1: the spawned process (:mod:`.spawner`) moves its own,
  only, thread into each hierarchy by writing ``0`` ("the calling thread") into ``tasks``,
  then execs. That skips the global lock a move through ``cgroup.procs`` takes, whose wait
  for an RCU grace period (5–10 ms here, once per action) was most of the cgroup cost
  (:attr:`Confinement.join_tasks` has the figures);
* in :meth:`Confinement.join`, from the worker — cgroup v2, where only whole processes move.
  The runner spawns bubblewrap with its options still to come through a pipe
  (``--args FD``); until it has them, bubblewrap cannot fork, and the worker writes the
  pid meanwhile, so the lock's wait overlaps bubblewrap's start.

Rlimits are set by the child too (:attr:`Confinement.rlimits`): the worker may lack
CAP_SYS_RESOURCE — this one does — so it cannot set them on another process.

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
    def rlimits(self) -> tuple[tuple[int, int], ...]:
        """``(resource.RLIMIT_*, value)`` pairs the spawned process sets on itself, soft and
        hard, with the worker's privileges, before the switch to the sandbox's uid."""
        return ()

    @property
    def join_tasks(self) -> tuple[str, ...]:
        """cgroup v1 ``tasks`` files the spawned process writes ``0`` into — "the calling
        thread" — before it execs, so it is inside before it can fork.

        Why not its pid into ``cgroup.procs``: moving a whole process takes the kernel's
        global cgroup threadgroup lock for writing, and that waits an RCU grace period
        whenever the lock was idle — between two actions it always is. Moving only the
        calling thread skips that lock (the kernel's own reasoning: ``current`` cannot exit
        or exec under it), and for a single-threaded process the thread is the process.
        Measured here (v1, Linux 6.18, 3 hierarchies, a 50 ms pause before each run as
        between actions): a shell joining through ``cgroup.procs`` 11.9 ms, through
        ``tasks`` 3.1 ms, a shell joining nothing 1.5 ms; the first ``cgroup.procs`` write
        pays the whole wait (5–10 ms), the others 0.03 ms each."""
        return ()

    @property
    def home_tasks(self) -> tuple[str, ...]:
        """With :attr:`join_tasks`: the ``tasks`` files of the worker's own cgroups in the
        same hierarchies, where the spawner (which lives there and joins for a moment, so
        that the child is born inside: :mod:`.spawner_process`) returns to."""
        return ()

    def join(self, pid: int) -> None:
        """Place the process ``pid`` — spawned with :attr:`rlimits` and :attr:`join_tasks`,
        not yet able to fork (see the module docstring) — in the confinement. Raises
        SandboxSetupError if it cannot; the caller must then kill the process before it can
        run anything. Default: nothing to join (the child did all)."""

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

    def close(self) -> None:
        """Release what the controller holds ahead of actions (spare cgroups). Idempotent;
        confinements already handed out are not affected."""

    @abc.abstractmethod
    def confine(self, limits: ResourceLimits) -> Confinement:
        """Create the confinement for one action; raises SandboxSetupError if it cannot."""
