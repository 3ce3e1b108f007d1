"""worker/faults.py: the worker's own faults are UNAVAILABLE (retried elsewhere), never a
result; an action past its own bound is its result."""

from __future__ import annotations

import errno

import pytest

from reapi_worker.protos import code_pb2
from reapi_worker.protos.errors import BoundExceeded, Internal, InvalidArgument, MissingBlobs, ResourceExhausted
from reapi_worker.storage.digests import Digest
from reapi_worker.worker.faults import lease_status


def raised_from(error: BaseException, cause: BaseException, suppress: bool = False) -> BaseException:
    """``error`` raised while handling ``cause`` (as ``raise error from None`` when ``suppress``)."""
    try:
        try:
            raise cause
        except BaseException:
            if suppress:
                raise error from None
            raise error
    except BaseException as caught:
        return caught


def test_a_full_local_cache_is_unavailable_with_its_reason():
    status = lease_status(ResourceExhausted("storing blob abc/3: No space left on device (local CAS at /c)"))
    assert status.code == code_pb2.UNAVAILABLE
    assert "No space left on device" in status.message and "/c" in status.message


def test_an_action_past_its_own_bound_keeps_resource_exhausted_naming_it():
    status = lease_status(BoundExceeded("the action went past its build directory bound of 1 GiB"))
    assert status.code == code_pb2.RESOURCE_EXHAUSTED
    assert "build directory bound" in status.message


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE, errno.ENFILE])
def test_an_internal_error_caused_by_a_worker_resource_is_unavailable(number):
    error = raised_from(Internal("staging input root into /b/1: ..."), OSError(number, "no room"), suppress=True)
    status = lease_status(error)
    assert status.code == code_pb2.UNAVAILABLE
    assert "staging input root" in status.message


def test_a_bare_enospc_from_a_bug_path_is_unavailable():
    status = lease_status(OSError(errno.ENOSPC, "No space left on device", "/b/streams-1"))
    assert status.code == code_pb2.UNAVAILABLE and "/b/streams-1" in status.message


@pytest.mark.parametrize(
    "error, code",
    [
        (InvalidArgument("bad path"), code_pb2.INVALID_ARGUMENT),
        (MissingBlobs([Digest("0" * 64, 1)]), code_pb2.FAILED_PRECONDITION),
        (Internal("sandbox could not be set up"), code_pb2.INTERNAL),
        (raised_from(Internal("x"), OSError(errno.EACCES, "denied")), code_pb2.INTERNAL),
        (ValueError("a bug"), code_pb2.INTERNAL),
    ],
)
def test_other_errors_keep_their_code(error, code):
    assert lease_status(error).code == code


def test_a_bound_exceeded_raised_while_handling_enospc_is_still_the_actions():
    error = raised_from(BoundExceeded("past its bound"), OSError(errno.ENOSPC, "full"))
    assert lease_status(error).code == code_pb2.RESOURCE_EXHAUSTED
