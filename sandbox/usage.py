"""What a run cost: :class:`ResourceUsage`, measured by the action's cgroup.

Why not ``wait4`` (measured here, bubblewrap 0.8): rusage of a reaped child covers the
descendants *it* reaped, but bubblewrap's monitor exits as soon as its init reports the
command's exit status — without reaping the init — so the init's (and the command's) CPU
time never reaches the monitor's rusage: a command burning 0.4 s of CPU showed 0.003 s.
Its ``maxrss`` is worse than useless: at its first ``exec`` the kernel records the high-water
mark of the address space it was (v)forked from — the *worker's* — as the process's own.

The cgroup has neither problem: it counts every task of the sandbox (bubblewrap's own few
milliseconds included), double-forked daemons too. So the figures come from the cgroup, and
without one (the rlimit fallback) only the wall time is known.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CgroupUsage:
    """Figures read from an action's cgroup before it is removed; ``None`` when the kernel
    does not provide one (e.g. ``pids.peak`` before Linux 6.1 for v1, 6.8 for v2)."""

    memory_peak_bytes: int | None = None
    pids_peak: int | None = None
    cpu_seconds: float | None = None
    user_cpu_seconds: float | None = None
    system_cpu_seconds: float | None = None


@dataclass(frozen=True)
class ResourceUsage:
    """Resources used by one run.

    * ``wall_seconds`` — from spawning the sandbox to reaping it (sandbox set-up included);
    * ``user_cpu_seconds`` / ``system_cpu_seconds`` — every process of the sandbox together;
    * ``peak_rss_bytes`` — the high-water mark of the sandbox's memory, all processes
      together (the cgroup's view: resident memory plus page cache charged to the action);
    * ``cgroup`` — all cgroup figures (``pids_peak`` and the total CPU time besides).

    Every figure but the wall time is ``None`` without a cgroup (see the module docstring).
    """

    wall_seconds: float
    user_cpu_seconds: float | None = None
    system_cpu_seconds: float | None = None
    peak_rss_bytes: int | None = None
    cgroup: CgroupUsage | None = None

    @classmethod
    def measured(cls, wall_seconds: float, cgroup: CgroupUsage | None) -> "ResourceUsage":
        if cgroup is None:
            return cls(wall_seconds=wall_seconds)
        return cls(
            wall_seconds=wall_seconds,
            user_cpu_seconds=cgroup.user_cpu_seconds,
            system_cpu_seconds=cgroup.system_cpu_seconds,
            peak_rss_bytes=cgroup.memory_peak_bytes,
            cgroup=cgroup,
        )
