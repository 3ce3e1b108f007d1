"""SandboxRequest and its values refuse what a sandbox could not express safely."""

from __future__ import annotations

import pytest

from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.sandbox import Bind, FakeRunner, ResourceLimits, RootMode, SandboxRequest, SandboxSetupError


def request(**kw) -> SandboxRequest:
    fields = dict(
        arguments=("true",), environment={}, input_root="/b", stdout_path="/o", stderr_path="/e",
    )
    fields.update(kw)
    return SandboxRequest(**fields)


def test_a_valid_request_is_frozen_including_its_environment():
    env = {"A": "1"}
    req = request(environment=env, arguments=["echo", "x"])
    env["B"] = "2"
    assert dict(req.environment) == {"A": "1"}
    assert req.arguments == ("echo", "x")
    with pytest.raises(TypeError):
        req.environment["C"] = "3"  # type: ignore[index]


@pytest.mark.parametrize(
    "bad",
    [
        dict(arguments=()),
        dict(arguments=("",)),
        dict(arguments=("echo", "a\0b")),
        dict(environment={"A=B": "x"}),
        dict(environment={"": "x"}),
        dict(environment={"A": "x\0y"}),
        dict(timeout=0),
        dict(uid=-1),
        dict(gid=2**32),
    ],
)
def test_invalid_client_fields_are_invalid_argument(bad):
    with pytest.raises(InvalidArgument):
        request(**bad)


@pytest.mark.parametrize("path", ["/etc", "../x", "a/../../x", "a/..", "a\0b"])
def test_attack_working_directory_cannot_leave_the_input_root(path):
    with pytest.raises(InvalidArgument):
        request(working_directory=path)


def test_working_directory_is_normalised():
    assert request(working_directory="./a//b/.").working_directory == "a/b"
    assert request(working_directory=".").sandbox_working_directory == "/build"
    assert request(working_directory="a", root_mode=RootMode.CHROOT).sandbox_working_directory == "/a"


@pytest.mark.parametrize("target", ["/build", "/build/x"])
def test_attack_an_operator_bind_cannot_land_inside_the_host_tools_input_root(target):
    with pytest.raises(SandboxSetupError):
        request(extra_ro_binds=(Bind("/opt", target),))
    request(extra_ro_binds=(Bind("/opt", target),), root_mode=RootMode.CHROOT)  # all of / is the root


@pytest.mark.parametrize(("source", "target"), [("opt", "/opt"), ("/opt", "opt"), ("/opt", "/"), ("/opt", "/a/../b")])
def test_binds_must_be_absolute_and_normalised(source, target):
    with pytest.raises(SandboxSetupError):
        Bind(source, target)


@pytest.mark.parametrize("bad", [dict(memory_bytes=0), dict(max_pids=-1), dict(cpu_cores=0.0), dict(max_pids=1.5)])
def test_limits_must_be_positive(bad):
    with pytest.raises(InvalidArgument):
        ResourceLimits(**bad)


def test_input_root_must_be_absolute():
    with pytest.raises(SandboxSetupError):
        request(input_root="relative/root")


def test_fake_runner_records_requests_creates_outputs_and_answers(tmp_path):
    runner = FakeRunner(lambda req: 3 if req.arguments[0] == "false" else 0)
    out, err = tmp_path / "out", tmp_path / "err"
    result = runner.run(request(arguments=("false",), stdout_path=str(out), stderr_path=str(err)))
    assert result.exit_code == 3 and not result.timed_out
    assert out.read_bytes() == b"" and err.read_bytes() == b""
    assert [r.arguments for r in runner.requests] == [("false",)]


def test_a_runner_without_bubblewrap_cannot_be_built():
    from reapi_worker.sandbox import BubblewrapRunner

    with pytest.raises(SandboxSetupError, match="not installed"):
        BubblewrapRunner(bwrap_path="/nonexistent/bwrap")
