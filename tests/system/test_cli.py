"""The ``reapi-worker`` command as an operator runs it, against the real BuildGrid CAS."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import grpc
import pytest

from conftest import require_tool

from reapi_worker.protos import re_pb2
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.remote_cas import RemoteCAS, RemoteOptions

CLI = [sys.executable, "-m", "reapi_worker.worker.cli"]


@pytest.fixture
def dirs():
    top = tempfile.mkdtemp(prefix="reapi-cli-test-", dir="/tmp")
    os.chmod(top, 0o755)
    yield {"cache": os.path.join(top, "cache"), "builds": os.path.join(top, "builds"), "top": top}
    shutil.rmtree(top, ignore_errors=True)


def _worker_args(dirs):
    return ["--cache-dir", dirs["cache"], "--build-root", dirs["builds"], "--cache-size", "200M"]


def test_capabilities_reports_this_hosts_sandbox(dirs):
    require_tool("bwrap")
    out = subprocess.run(CLI + ["capabilities", "--json"], capture_output=True, text=True, check=True)
    facts = json.loads(out.stdout)
    assert facts["bwrap_version"] and facts["user_namespaces"] is True
    assert set(facts["root_modes"]) == {"host-tools", "chroot"}


def test_run_action_executes_an_action_from_a_remote_cas(buildgrid, dirs):
    require_tool("bwrap")
    channel = grpc.insecure_channel(buildgrid)
    remote = RemoteCAS(channel, RemoteOptions(instance_name="main"))
    try:
        root = CasDirectory.empty(remote)
        root.write_bytes("greeting.txt", b"hello from CAS\n")
        command = re_pb2.Command(arguments=["/bin/sh", "-c", "tr a-z A-Z < greeting.txt > shout.txt"],
                                 output_paths=["shout.txt"])
        root_digest = root.digest()  # CasDirectory writes its protos into the store: here the remote
        action = re_pb2.Action(command_digest=remote.write(serialize(command)).to_proto(),
                               input_root_digest=root_digest.to_proto(), do_not_cache=True)
        action_digest = remote.write(serialize(action))
        out = subprocess.run(
            CLI + ["run-action", "--remote", f"grpc://{buildgrid}", "--instance-name", "main",
                   "--action", str(action_digest), "--json"] + _worker_args(dirs),
            capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        response = json.loads(out.stdout)
        output = response["result"]["output_files"][0]
        assert output["path"] == "shout.txt"
        digest = Digest(output["digest"]["hash"], int(output["digest"]["size_bytes"]))
        assert remote.read(digest) == b"HELLO FROM CAS\n"  # uploaded to the remote, not only cached
    finally:
        channel.close()


def test_run_action_with_a_missing_action_says_failed_precondition(buildgrid, dirs):
    require_tool("bwrap")
    absent = Digest.of_bytes(b"no such action anywhere")
    out = subprocess.run(
        CLI + ["run-action", "--remote", f"grpc://{buildgrid}", "--action", str(absent), "--json"] + _worker_args(dirs),
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 1
    assert json.loads(out.stdout)["status"]["code"] == 9  # FAILED_PRECONDITION
    assert absent.hash in out.stdout


def test_bad_digest_argument_is_a_clear_error(dirs):
    out = subprocess.run(CLI + ["run-action", "--remote", "grpc://127.0.0.1:1", "--action", "nope"] + _worker_args(dirs),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "HASH/SIZE" in out.stderr
