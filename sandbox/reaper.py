"""No zombie outlives an action: the worker adopts sandbox inits and reaps them by pidfd.

bubblewrap's monitor (the worker's child) exits as soon as the command has; the sandbox's
init, its child, is then orphaned. The kernel reparents an orphan to the nearest *child
subreaper* among its ancestors, else to PID 1 of its pid namespace. On a host, PID 1 is an
init that reaps; in a plain container the worker itself is PID 1 and, not expecting the
child, never reaped it: every action left a zombie behind.

So the worker makes itself a child subreaper (:func:`become_child_subreaper`; harmless when
it is PID 1, which adopts orphans anyway) and the runner reaps each init it
knows of through the pidfd it already holds (:func:`reap_if_child`). A pidfd names exactly
that process, so this can never take the exit status of another child — unlike
``waitpid(-1)``, which would race every ``subprocess.Popen`` in the worker for its child's
status. Sandboxed processes themselves never reach the worker: they live in the
sandbox's pid namespace, whose init reaps them, and die with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os

from .errors import SandboxSetupError

#: ``<linux/prctl.h>``
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


def _prctl(option: int, arg: object) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise SandboxSetupError(f"prctl({option}) failed: {os.strerror(errno)}")


def become_child_subreaper() -> None:
    """Make this process a child subreaper: orphans among its descendants become its
    children. Idempotent; inherited by no child (the kernel clears it on fork)."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def is_child_subreaper() -> bool:
    """Whether this process is a child subreaper."""
    value = ctypes.c_int(0)
    _prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(value))
    return bool(value.value)


def reap_if_child(pidfd: int) -> None:
    """Reap the exited process ``pidfd`` refers to if it is this process's child; otherwise
    (another process's child, already reaped, still running) do nothing."""
    with contextlib.suppress(ChildProcessError):
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
