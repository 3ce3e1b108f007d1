"""The executor reports the worker's own faults UNAVAILABLE (never a result) and an action
past its own bound RESOURCE_EXHAUSTED (worker/faults.py); on the fakes of
test_executor.py."""

from __future__ import annotations

import errno

from test_executor import Rig, assert_failed, rig, write_stdout  # noqa: F401  (rig: fixture)

from reapi_worker.protos import code_pb2
from reapi_worker.protos.errors import BoundExceeded, Internal, ResourceExhausted


def test_a_full_cache_while_storing_stdout_is_unavailable_not_a_result(rig: Rig):
    rig.respond = lambda request: write_stdout(request, b"half an output") or 1
    rig.store.failures["write_file:stdout"] = ResourceExhausted("storing blob: No space left on device (local CAS at /c)")
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.UNAVAILABLE, "upload")
    assert "No space left on device" in outcome.status.message


def test_a_full_remote_cas_at_upload_is_unavailable(rig: Rig):
    rig.store.failures["upload_missing"] = ResourceExhausted("CAS quota exceeded")
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.UNAVAILABLE, "upload")


def test_staging_that_met_enospc_is_unavailable(rig: Rig):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise Internal("staging input root into /b/1: [Errno 28] No space left on device") from None
    except Internal as error:
        rig.stager.stage_error = error
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.UNAVAILABLE, "stage")


def test_an_enospc_escaping_as_a_bare_oserror_is_unavailable(rig: Rig):
    rig.stager.stage_error = OSError(errno.ENOSPC, "No space left on device", "/b/1")
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.UNAVAILABLE, "stage")


def test_an_action_past_its_bound_is_resource_exhausted_with_its_run_kept(rig: Rig):
    rig.respond = lambda request: write_stdout(request, b"wrote a lot") or 2
    rig.stager.check_error = BoundExceeded("the action went past its build directory bound of 1 GiB")
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.RESOURCE_EXHAUSTED, "run")
    assert "build directory bound" in outcome.status.message
    assert outcome.result.exit_code == 2 and outcome.result.HasField("stdout_digest")
