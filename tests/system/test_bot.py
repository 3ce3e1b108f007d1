"""``reapi-worker bot`` against the real BuildGrid 0.4.4: workers as real processes, real
bubblewrap, actions submitted through the Execution service.

The only timed bound is the issue's: a cancelled action's process is gone within about a
second of the cancellation (heartbeat 1 s + the kill), measured with a margin.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import psutil
import pytest

from bot_fixtures import CLI, INSTANCE, Farm, stage_name, staged_builds, trash_entries, until
from conftest import require_tool

from reapi_worker.protos import code_pb2, error_details_pb2, re_pb2
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.worker.client import CommandSpec, build_action

pytestmark = pytest.mark.buildgrid


@pytest.fixture
def farm(buildgrid):
    require_tool("bwrap")
    farm = Farm(buildgrid)
    yield farm
    farm.close()


def test_execute_cli_runs_through_the_scheduler_and_downloads_outputs(farm, tmp_path):
    worker = farm.start_worker("solo")
    worker.wait_registered()
    inputs = tmp_path / "in"
    (inputs / "src").mkdir(parents=True)
    (inputs / "src" / "words.txt").write_text("remote execution\n")
    download = tmp_path / "out"
    run = subprocess.run(
        CLI + ["execute", "--remote", f"grpc://{farm.address}", "--instance-name", INSTANCE,
               "--platform", f"ISA={farm.token}", "--input-root", str(inputs),
               "--output-path", "gen/shout.txt", "--download", str(download), "--json",
               "--", "/bin/sh", "-c", "mkdir -p gen && tr a-z A-Z < src/words.txt > gen/shout.txt && echo ran"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert (download / "gen" / "shout.txt").read_text() == "REMOTE EXECUTION\n"
    assert f'"worker": "{worker.bot_id}"' in run.stdout  # it ran on our bot, not in-process
    assert "EXECUTING" in run.stderr and "COMPLETED" in run.stderr
    (entry,) = worker.leases("completed")
    assert entry["status"] == "OK" and {"fetch_s", "run_s", "upload_s"} <= set(entry)


def test_two_workers_of_concurrency_two_take_forty_actions_each_once(farm):
    workers = [farm.start_worker(name, 2) for name in ("a", "b")]
    for worker in workers:
        worker.wait_registered()
    digests = [farm.action(f"echo {i} > out.txt; sleep 0.1", outputs=("out.txt",)) for i in range(40)]
    executions = farm.execute_many(digests)
    for i, execution in enumerate(executions):
        assert execution.ok, execution.response.status
        assert farm.read_output(execution, "out.txt") == f"{i}\n".encode()
    runs = [entry["action"] for worker in workers for entry in worker.leases()]
    assert sorted(runs) == sorted(str(d) for d in digests)  # each action ran exactly once
    assert all(worker.leases() for worker in workers)  # and both workers took work
    names = {e.response.result.execution_metadata.worker for e in executions}
    assert names == {w.bot_id for w in workers}


def test_cancel_operation_kills_the_action_within_a_second(farm):
    worker = farm.start_worker("cancel")
    worker.wait_registered()
    marker = f"{int(time.time() * 1000) % 100000}.{os.getpid()}"  # a unique sleep argument
    digest = farm.action(f"exec sleep 300{marker}")
    names: list[str] = []
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("e", farm.execute(
        digest, on_operation=lambda op: names.append(op.name))))
    thread.start()

    def sleeper():
        for proc in psutil.process_iter(["cmdline"]):
            if proc.info["cmdline"] == ["sleep", f"300{marker}"]:
                return proc
        return None

    proc = until(sleeper, 30, "the action's process to start")
    farm.client.cancel(names[0])
    cancelled = time.monotonic()
    gone, _ = psutil.wait_procs([proc], timeout=10)
    elapsed = time.monotonic() - cancelled
    thread.join(30)
    assert gone, "the action survived its cancellation"
    # Heartbeat every 1 s + the sandbox's kill: ~1 s; 1.5 s leaves room for a loaded host.
    assert elapsed < 1.5, f"process gone {elapsed:.2f} s after CancelOperation"
    assert result["e"].response.status.code == code_pb2.CANCELLED
    until(lambda: worker.leases("cancelled"), 10, "the worker to log the cancellation")
    assert not worker.leases("completed")  # nothing reported for it
    # Its build directory is removed (in the background: not on the critical path).
    until(lambda: not staged_builds(worker) and not trash_entries(worker), 10, "the build directory to go")
    assert worker.process.poll() is None


def test_sigterm_lets_the_running_action_finish_reports_it_and_exits_zero(farm):
    worker = farm.start_worker("drain", 1, "--shutdown-grace-seconds", "60")
    worker.wait_registered()
    digest = farm.action("sleep 2; echo drained > out.txt", outputs=("out.txt",))
    executing = threading.Event()
    result: dict = {}

    def watch(operation):
        if stage_name(operation) == "EXECUTING":
            executing.set()

    thread = threading.Thread(target=lambda: result.setdefault("e", farm.execute(digest, on_operation=watch)))
    thread.start()
    assert executing.wait(30)
    until(lambda: staged_builds(worker), 10, "the action to be staged")
    worker.signal(signal.SIGTERM)
    assert worker.process.wait(60) == 0
    thread.join(30)
    execution = result["e"]
    assert execution.ok and farm.read_output(execution, "out.txt") == b"drained\n"
    assert execution.response.result.execution_metadata.worker == worker.bot_id
    assert [e["outcome"] for e in worker.leases()] == ["completed"]


def test_missing_input_blob_is_failed_precondition_naming_the_digest(farm):
    worker = farm.start_worker("missing")
    worker.wait_registered()
    absent = Digest.of_bytes(b"this input was never uploaded " + farm.token.encode())
    root = re_pb2.Directory(files=[re_pb2.FileNode(name="input.txt", digest=absent.to_proto())])
    command = re_pb2.Command(arguments=["/bin/cat", "input.txt"])
    command_digest = farm.store.write(serialize(command))
    root_digest = farm.store.write(serialize(root))
    action = re_pb2.Action(command_digest=command_digest.to_proto(), input_root_digest=root_digest.to_proto(),
                           do_not_cache=True, platform=re_pb2.Platform(properties=[
                               re_pb2.Platform.Property(name="ISA", value=farm.token)]))
    action_digest = farm.store.write(serialize(action))
    farm.store.upload_missing({action_digest, command_digest, root_digest})
    status = farm.execute(action_digest).response.status
    assert status.code == code_pb2.FAILED_PRECONDITION
    assert absent.hash in status.message
    failure = error_details_pb2.PreconditionFailure()
    assert status.details and status.details[0].Unpack(failure)
    assert [(v.type, v.subject) for v in failure.violations] == [("MISSING", f"blobs/{absent.hash}/{absent.size_bytes}")]


def test_kill_9_mid_action_requeues_on_the_other_worker_whose_session_outlives_keepalive(farm):
    first = farm.start_worker("first", 1)
    first.wait_registered()
    digest = farm.action("sleep 1.5; echo survived > out.txt", outputs=("out.txt",))
    stages: list[str] = []
    executing = threading.Event()
    result: dict = {}

    def watch(operation):
        stages.append(stage_name(operation))
        if stages[-1] == "EXECUTING":
            executing.set()

    thread = threading.Thread(target=lambda: result.setdefault("x", farm.execute(digest, on_operation=watch)))
    thread.start()
    assert executing.wait(30)
    until(lambda: staged_builds(first), 10, "the action to start on the first worker")

    # The second worker also runs an action longer than BuildGrid's keepalive (10 s): its
    # heartbeats must keep its session, so that action runs exactly once, never requeued.
    second = farm.start_worker("second", 2)
    second.wait_registered()
    long_digest = farm.action("sleep 12; echo long > out.txt", outputs=("out.txt",))
    long_stages: list[str] = []
    long_result: dict = {}
    long_thread = threading.Thread(target=lambda: long_result.setdefault("l", farm.execute(
        long_digest, on_operation=lambda op: long_stages.append(stage_name(op)))))
    long_thread.start()

    first.process.kill()  # SIGKILL: no goodbye; BuildGrid requeues after its session expires
    first.process.wait(10)
    thread.join(60)
    long_thread.join(60)

    execution = result["x"]
    assert execution.ok and farm.read_output(execution, "out.txt") == b"survived\n"
    assert execution.response.result.execution_metadata.worker == second.bot_id
    assert "QUEUED" in stages[stages.index("EXECUTING"):]  # it went back to the queue
    long_execution = long_result["l"]
    assert long_execution.ok and farm.read_output(long_execution, "out.txt") == b"long\n"
    assert "QUEUED" not in long_stages[long_stages.index("EXECUTING"):]
    assert second.sessions_created() == 1
    assert sorted(e["action"] for e in second.leases()) == sorted([str(digest), str(long_digest)])
