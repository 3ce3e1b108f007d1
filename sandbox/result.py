"""What came of a run: :class:`SandboxResult`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .usage import ResourceUsage


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of a command that was set up and started (set-up failures raise instead).

    * ``exit_code`` — as a shell's ``$?``: the command's exit status, or ``128 + n`` when it
      was killed by signal ``n`` (bubblewrap's init reports it so). A command that cannot be
      found inside the sandbox gives 127, one that is found but cannot be executed 126.
    * ``signal`` — the signal that ended the command: exact when the runner sent it
      (timeout, cancel: SIGKILL) or the kernel OOM-killed it; otherwise *inferred* from an
      exit code of ``128 + n`` — a command that calls ``exit(137)`` itself is indistinguishable
      from one killed by SIGKILL, exactly as for a shell.
    * ``timed_out`` / ``cancelled`` — the runner killed the whole action for that reason. The
      output files keep whatever was written before.
    * ``oom_killed`` — the kernel's OOM killer killed a process of the action because of its
      memory limit (cgroups only; under the rlimit fallback allocations fail instead).
    * ``exceeded`` — the other bounds of :class:`~.request.ResourceLimits` the action ran
      into, by name: ``"max_pids"`` (a fork or clone was refused at the bound),
      ``"tmp_bytes"`` (``/tmp`` was full when a failing command ended), ``"stream_bytes"``
      (stdout or stderr went past it; the runner killed the action). See :mod:`.bounds`.
    """

    exit_code: int
    signal: int | None
    timed_out: bool
    cancelled: bool
    oom_killed: bool
    usage: ResourceUsage
    exceeded: frozenset[str] = field(default_factory=frozenset)
