"""The project's one error hierarchy.

Every error a worker can report maps to a ``google.rpc.Code``: that is what a lease's
status carries back to the scheduler and what a client finally sees. Lower-level errors
(``grpc.RpcError``, ``OSError``) are translated into these once, at the boundary where
they are caught; as an error rises, callers add context with :meth:`ReapiError.within`.

    ReapiError                      code            meaning
    ├── InvalidArgument             INVALID_ARGUMENT the request itself is wrong (a bad
    │                                                name, path, proto or digest)
    ├── FailedPrecondition          FAILED_PRECONDITION
    │   └── MissingBlobs                             blobs absent from the CAS (every
    │                                                missing digest listed)
    ├── NotFound                    NOT_FOUND        a path inside a Directory is absent
    ├── AlreadyExists               ALREADY_EXISTS   a path inside a Directory is taken
    ├── DataLoss                    DATA_LOSS        bytes that do not match their digest
    ├── ResourceExhausted           RESOURCE_EXHAUSTED  disk full, cache full of pins
    ├── Unavailable                 UNAVAILABLE      a server that does not answer
    ├── DeadlineExceeded            DEADLINE_EXCEEDED
    └── Internal                    INTERNAL         a bug or a broken host (sandbox set-up)

Lower-level errors are translated by the two tables at the end of this module, and nowhere
else: :func:`from_grpc` (a gRPC status a server answered) and :func:`from_os_error` (an
``OSError`` of a local file). A code or errno without a class of its own becomes Internal,
with what it was kept in the reason.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import TYPE_CHECKING

import grpc

from . import code_pb2, error_details_pb2, status_pb2

if TYPE_CHECKING:
    from reapi_worker.storage.digests import Digest


class ReapiError(Exception):
    """An error with the google.rpc code it maps to and a human reason."""

    code: int = code_pb2.UNKNOWN

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def within(self, context: str) -> "ReapiError":
        """Prefix the reason with what was being done ("staging input root: ...")."""
        self.reason = f"{context}: {self.reason}"
        self.args = (self.reason,)
        return self

    def to_status(self) -> status_pb2.Status:
        """The google.rpc.Status a lease or an ExecuteResponse carries for this error."""
        return status_pb2.Status(code=self.code, message=self.reason)

    def __str__(self) -> str:
        return self.reason


class InvalidArgument(ReapiError):
    code = code_pb2.INVALID_ARGUMENT


class FailedPrecondition(ReapiError):
    code = code_pb2.FAILED_PRECONDITION


class MissingBlobs(FailedPrecondition):
    """Blobs the CAS does not have. Clients re-upload exactly the digests listed in the
    PreconditionFailure's ``MISSING`` violations, so every missing one must be named."""

    def __init__(self, digests: Iterable["Digest"], context: str = "") -> None:
        self.digests = sorted(set(digests))
        listed = ", ".join(str(d) for d in self.digests[:5])
        more = f" and {len(self.digests) - 5} more" if len(self.digests) > 5 else ""
        prefix = f"{context}: " if context else ""
        super().__init__(f"{prefix}{len(self.digests)} blob(s) missing from CAS: {listed}{more}")

    def to_status(self) -> status_pb2.Status:
        failure = error_details_pb2.PreconditionFailure()
        for digest in self.digests:
            failure.violations.add(type="MISSING", subject=f"blobs/{digest.hash}/{digest.size_bytes}")
        status = super().to_status()
        status.details.add().Pack(failure)
        return status


class NotFound(ReapiError):
    code = code_pb2.NOT_FOUND


class AlreadyExists(ReapiError):
    code = code_pb2.ALREADY_EXISTS


class DataLoss(ReapiError):
    code = code_pb2.DATA_LOSS


class ResourceExhausted(ReapiError):
    code = code_pb2.RESOURCE_EXHAUSTED


class Unavailable(ReapiError):
    code = code_pb2.UNAVAILABLE


class DeadlineExceeded(ReapiError):
    code = code_pb2.DEADLINE_EXCEEDED


class Internal(ReapiError):
    code = code_pb2.INTERNAL


# ---------------------------------------------------------------- translation, once

#: A gRPC status code -> our class: every class of the hierarchy that stands for a code of
#: its own, keyed by that code. OK, CANCELLED, UNKNOWN, PERMISSION_DENIED, UNAUTHENTICATED,
#: UNIMPLEMENTED, ABORTED, OUT_OF_RANGE and INTERNAL become Internal.
_BY_GRPC_CODE: dict[int, type[ReapiError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument, FailedPrecondition, NotFound, AlreadyExists, DataLoss,
        ResourceExhausted, Unavailable, DeadlineExceeded,
    )
}


def from_grpc(status: grpc.StatusCode, reason: str) -> ReapiError:
    """Our error for a gRPC status a server answered (``reason``: what was being done and
    what the server said). A code without a class keeps its name in the reason."""
    cls = _BY_GRPC_CODE.get(status.value[0])
    if cls is None:
        return Internal(f"{reason} ({status.name})")
    return cls(reason)


#: An errno of a local file operation -> our class.
#:
#: ELOOP, decided once: everything in this project opens paths without following symlinks
#: (O_NOFOLLOW, or relative to a directory descriptor), so ELOOP always means "the request
#: names a symlink where it needs a file or a directory", which is the request's error:
#: InvalidArgument. (A lookup that walks a tree one component at a time,
#: storage/directory/_local.py, answers NotFound for any non-directory in its way — a
#: symlink included — before this table is consulted: there the question is "is there such
#: a directory", and the answer is no.)
_BY_ERRNO: dict[int, type[ReapiError]] = {
    errno.ENOENT: NotFound,
    errno.ENOTDIR: NotFound,
    errno.ELOOP: InvalidArgument,
    errno.EEXIST: AlreadyExists,
    errno.EISDIR: AlreadyExists,
    errno.ENOTEMPTY: FailedPrecondition,
    errno.ENOSPC: ResourceExhausted,
    errno.EDQUOT: ResourceExhausted,
    errno.EMFILE: ResourceExhausted,
    errno.ENFILE: ResourceExhausted,
    errno.ENAMETOOLONG: InvalidArgument,
}


def from_os_error(error: OSError, what: str, *, own_file: bool = False) -> ReapiError:
    """Our error for ``error``, raised while doing ``what`` (a path, or what was being done
    to it). Any errno the table does not know is Internal: a broken disk is the host's
    fault, never the action's.

    ``own_file``: the file is the worker's own (its cache's), not one a request named. Then
    only a full disk keeps its meaning (ResourceExhausted); anything else — a cache file
    that vanished, say — is Internal, so the scheduler runs the action again rather than
    report NOT_FOUND for a path the client never named."""
    cls = _BY_ERRNO.get(error.errno or 0, Internal)
    if own_file and cls is not ResourceExhausted:
        cls = Internal
    if error.errno == errno.ELOOP:
        return cls(f"{what}: is a symlink (never followed)")
    return cls(f"{what}: {error.strerror or error}")
