"""How each bound of :class:`~.request.ResourceLimits` is enforced, and how the runner
learns that an action ran into it (the names in :attr:`~.result.SandboxResult.exceeded`).

=============== ====================================== =====================================
bound           enforced by                            seen by the runner as
=============== ====================================== =====================================
memory_bytes    the action's memory cgroup             ``oom_killed`` (the cgroup's OOM count)
max_pids        the action's pids cgroup               ``"max_pids"``: ``pids.events`` counts
                                                       a refused fork
cpu_cores       CPU bandwidth (cgroup ``cpu``)         nothing: a throttled action is only
                                                       slower
tmp_bytes       ``--size`` of the ``/tmp`` tmpfs;       ``"tmp_bytes"``: ``/tmp`` full when a
                its pages also count as memory        *failing* command ended (see below)
stream_bytes    a pipe per stream (:mod:`.streams`)    ``"stream_bytes"``; the action killed
open_files      RLIMIT_NOFILE of every process         nothing: EMFILE is the command's to
                                                       handle, as on any host
=============== ====================================== =====================================

Why a full ``/tmp`` is looked for only when the command failed: a command that coped with
ENOSPC earned its result; one that failed may have failed *because* of the bound, and its
result must then say so rather than pass for the action's own failure. How it is looked at
after the sandbox is gone: before the command is released, :class:`TmpfsWatch` opens the
sandbox's mount namespace (``/proc/<init>/ns/mnt``); a namespace held open outlives its
processes, with its mounts. A tiny helper process enters it (``setns`` needs a process of
its own: a threaded one may not change its mount namespace) and reports ``statvfs("/tmp")``.
Needs root (``setns`` wants CAP_SYS_ADMIN over the sandbox's user namespace *and*
CAP_SYS_CHROOT); a non-root worker cannot tell, and the command's own ENOSPC is its result.
The helper trusts nothing it finds there: it only reads the file system's counters, and a
sandbox that fakes a full ``/tmp`` only fails itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys

log = logging.getLogger(__name__)

MAX_PIDS = "max_pids"
TMP_BYTES = "tmp_bytes"
STREAM_BYTES = "stream_bytes"

#: Enter the mount namespace given as a descriptor and print /tmp's size and free bytes.
#: ctypes is imported before setns: after it, paths resolve inside the sandbox.
_HELPER = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.setns(int(sys.argv[1]), 0x00020000) != 0:\n"  # CLONE_NEWNS
    "    sys.exit('setns: ' + os.strerror(ctypes.get_errno()))\n"
    "st = os.statvfs('/tmp')\n"
    "print(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)\n"
)
HELPER_TIMEOUT_SECONDS = 10.0


class TmpfsWatch:
    """The sandbox's mount namespace, held so that its ``/tmp`` can be measured after the
    command ended (module docstring). :meth:`close` releases it; idempotent."""

    def __init__(self, ns_fd: int) -> None:
        self._ns_fd: int | None = ns_fd

    @classmethod
    def hold(cls, init_pid: int) -> "TmpfsWatch | None":
        """Hold the mount namespace of the sandbox whose init is ``init_pid`` (alive and
        blocked before its mounts). ``None`` when this worker could not look into it."""
        if os.geteuid() != 0:
            return None
        try:
            return cls(os.open(f"/proc/{init_pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            log.debug("cannot hold the sandbox's mount namespace: %s", e)
            return None

    def full(self) -> bool:
        """Whether ``/tmp`` is (as good as) full: free space under 1% of its size or one
        page. ``False`` when it cannot be measured (logged)."""
        if self._ns_fd is None:
            return False
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-S", "-c", _HELPER, str(self._ns_fd)],
                pass_fds=(self._ns_fd,), capture_output=True, text=True, env={},
                stdin=subprocess.DEVNULL, timeout=HELPER_TIMEOUT_SECONDS,
            )
            size, free = (int(word) for word in done.stdout.split())
        except (OSError, ValueError, subprocess.TimeoutExpired) as e:
            log.warning("cannot measure the sandbox's /tmp: %s", e)
            return False
        return free < max(4096, size // 100)

    def close(self) -> None:
        if self._ns_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._ns_fd)
            self._ns_fd = None
