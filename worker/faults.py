"""Which failures are the worker's, not the action's: those are never a result.

A lease's status is what the client finally sees, unless BuildGrid requeues the job — which
it does only for UNAVAILABLE and INTERNAL (PROTOCOL.md section 6). So anything that went
wrong on the worker's side must end in one of those, or a client is told that its action
failed (or, worse, is given a result) for what is our housekeeping.

The rule, applied by the executor to every error that ends an execution
(:func:`lease_status`):

* the worker's own storage ran out of room — a :class:`ResourceExhausted` from the local
  CAS (after it evicted and retried, see storage/local_cas.py), from pinning, from the
  remote CAS — or any ``OSError`` with ``ENOSPC``/``EDQUOT`` (or ``ENOMEM``, ``EMFILE``,
  ``ENFILE``: the worker's resources) anywhere in the error's chain: **UNAVAILABLE** with
  the reason, so the scheduler runs the action elsewhere;
* :class:`BoundExceeded` — the action went past one of its *own* bounds (its build
  directory's bytes): RESOURCE_EXHAUSTED naming the bound, with the action's exit code,
  stdout and stderr. That is the action's result: it would do the same on any worker with
  that bound. It is never cached (BuildGrid stores only OK results);
* anything else keeps its code.

Why this is exact for disk space: an action never writes to a file system the worker
shares. Its writable layer and its stdout/stderr live on a size-limited file system of its
own (storage/bounded_staging.py), so (1) an ENOSPC the action sees can only come from its
own bound, which the worker detects after the run without sampling a shared disk, and
(2) an ENOSPC on the cache's or build root's file system can only hit the worker's own
writes (staging, capture, fetch), which raise here and are reported UNAVAILABLE. Neither
depends on when free space was sampled.
"""

from __future__ import annotations

import errno

from reapi_worker.protos import code_pb2, status_pb2
from reapi_worker.protos.errors import BoundExceeded, ReapiError, ResourceExhausted

#: errno values that mean the worker (not the action) ran out of something.
WORKER_RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE, errno.ENFILE})


def lease_status(error: BaseException) -> status_pb2.Status:
    """The status an execution that ended with ``error`` reports (module docstring)."""
    if isinstance(error, BoundExceeded):
        return error.to_status()
    cause = worker_resource_cause(error)
    if cause is not None:
        return status_pb2.Status(code=code_pb2.UNAVAILABLE, message=f"worker out of resources, retry elsewhere: {cause}")
    if isinstance(error, ReapiError):
        return error.to_status()
    return status_pb2.Status(code=code_pb2.INTERNAL, message=f"{error!r}")


def worker_resource_cause(error: BaseException) -> str | None:
    """Why ``error`` is the worker running out of a resource, or None if it is not: a
    ResourceExhausted (not a BoundExceeded), or an OSError of :data:`WORKER_RESOURCE_ERRNOS`
    anywhere in its ``__cause__``/``__context__`` chain (``raise ... from None`` hides the
    cause from tracebacks, not from here)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ResourceExhausted) and not isinstance(current, BoundExceeded):
            return str(error)
        if isinstance(current, OSError) and current.errno in WORKER_RESOURCE_ERRNOS:
            return str(error) if error is not current else f"{current.strerror}: {current.filename or ''}".rstrip(": ")
        current = current.__cause__ or current.__context__
    return None
