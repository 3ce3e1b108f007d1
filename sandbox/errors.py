"""The sandbox's one error.

    ReapiError                     (reapi_worker.protos.errors)
    ├── InvalidArgument            a request that cannot be right (NUL in an argument, an
    │                              environment name with '=', a working directory that leaves
    │                              the input root); raised by :class:`SandboxRequest` itself
    └── Internal
        └── SandboxSetupError      the sandbox could not be set up: bwrap missing or failing
                                   before it ran the command, a bind source that does not
                                   exist, a cgroup that cannot be created or joined

A command that runs and fails, crashes, times out or cannot be found inside the sandbox is
*not* an error: it is a :class:`~reapi_worker.sandbox.result.SandboxResult`. A set-up
failure means a broken host or configuration *or* a request this host cannot build a
sandbox for (an input root bubblewrap cannot mount over); the runner cannot tell which, so
the executor asks a trivial probe sandbox before it reports anything (see
``reapi_worker.worker.executor``).
"""

from __future__ import annotations

from reapi_worker.protos.errors import Internal


class SandboxSetupError(Internal):
    """The sandbox could not be set up, so the command never ran (maps to INTERNAL).

    ``reason`` carries what failed and, when bubblewrap said why, its message.
    """


class BubblewrapRefused(SandboxSetupError):
    """bubblewrap itself refused to build this request's sandbox (its own message, read
    before the command could write anything). The one set-up failure a request can cause
    — a mount over its input root that cannot be made — so the caller may ask a probe
    whether the host or the request is at fault. Every other SandboxSetupError is the
    host's (a missing tool, a cgroup that cannot be made, a spawn that failed)."""
