"""BuildStream-shaped actions through the real executor and bubblewrap: the farm-wide
default root mode, outputs climbing out of the working directory with ``..``, ``"."``,
DIRECTORY_ONLY results, strict platform properties and the output bound.

A BuildStream action carries its whole sysroot as the input root, runs in a build
directory three levels down, sends only OSFamily/ISA, and asks for
``[".", "../../../buildstream-install"]`` as DIRECTORY_ONLY output paths.
"""

from __future__ import annotations

import os

import pytest

from conftest import require, require_tool
from executor_fixtures import STAGINGS, make_farm

from reapi_worker.protos import code_pb2, re_pb2
from reapi_worker.protos.unbound_fields import OutputDirectoryFormat, root_directory_digest, set_output_directory_format
from reapi_worker.sandbox.request import Bind, RootMode
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.worker.config import WorkerConfig
from reapi_worker.worker.platform_properties import PlatformPolicy

WORKDIR = "buildstream/project/element.bst"
BST_PLATFORM = {"ISA": "x86-64", "OSFamily": "linux"}


@pytest.fixture(params=STAGINGS)
def staging(request) -> str:
    require_tool("bwrap")
    require(all(os.path.islink(f"/{n}") for n in ("bin", "lib")), "needs a merged-/usr host (the sysroot links to /usr)")
    if request.param == "fuse":
        require_tool("fusermount3")
        require(os.geteuid() == 0 and os.path.exists("/dev/fuse"), "FUSE staging needs root and /dev/fuse")
    return request.param


def _farm(staging: str, policy: PlatformPolicy = PlatformPolicy(), **kwargs):
    # The "sysroot": the host's /usr bound read-only, with the merged-/usr links of a real one.
    return make_farm(max_action_timeout=30, staging=staging, extra_ro_binds=(Bind("/usr", "/usr"),),
                     platform=policy, **kwargs)


def _sysroot() -> dict:
    inputs: dict = {n: "->" + os.readlink(f"/{n}") for n in ("bin", "lib", "lib64", "sbin") if os.path.islink(f"/{n}")}
    inputs[f"{WORKDIR}/source.c"] = b"int main;\n"
    inputs["buildstream-install/.keep"] = b""
    return inputs


def _execute(farm, script: str, platform: dict, output_paths: list[str], working_directory: str = WORKDIR):
    command = re_pb2.Command(
        arguments=["sh", "-c", "-e", script], working_directory=working_directory, output_paths=output_paths,
        environment_variables=[re_pb2.Command.EnvironmentVariable(name="PATH", value="/usr/bin:/bin")],
    )
    set_output_directory_format(command, OutputDirectoryFormat.DIRECTORY_ONLY)
    properties = [re_pb2.Platform.Property(name=k, value=v) for k, v in sorted(platform.items())]
    action = re_pb2.Action(
        command_digest=farm.cache.write(serialize(command)).to_proto(),
        input_root_digest=farm.upload_tree(_sysroot()).to_proto(),
        platform=re_pb2.Platform(properties=properties), do_not_cache=True,
    )
    return farm.executor.execute(farm.cache.write(serialize(action)))


def _listing(farm, digest_proto, prefix="") -> dict[str, bytes | str]:
    """{path: bytes | "dir" | "->target"} of a Directory hierarchy read back from the cache."""
    found: dict[str, bytes | str] = {}
    directory = re_pb2.Directory.FromString(farm.cache.read(Digest.from_proto(digest_proto)))
    for f in directory.files:
        found[prefix + f.name] = farm.cache.read(Digest.from_proto(f.digest))
    for s in directory.symlinks:
        found[prefix + s.name] = "->" + s.target
    for d in directory.directories:
        found[prefix + d.name] = "dir"
        found.update(_listing(farm, d.digest, prefix + d.name + "/"))
    return found


SCRIPT = "pwd; echo object > built.o; mkdir -p ../../../buildstream-install/usr/bin; " \
         "echo tool > /buildstream-install/usr/bin/tool"


def test_a_chroot_farm_runs_buildstreams_outputs_climbing_out_of_the_build_directory(staging):
    # The operator's root_mode, as the composition root reads it from the config.
    farm = _farm(staging, WorkerConfig(root_mode="chroot").platform_policy)
    try:
        outcome = _execute(farm, SCRIPT, BST_PLATFORM, [".", "../../../buildstream-install"])
        assert outcome.status.code == code_pb2.OK, outcome.status
        result = outcome.result
        assert result.exit_code == 0, farm.text(result.stderr_digest)
        assert farm.text(result.stdout_digest) == f"/{WORKDIR}\n"  # the input root is /
        assert [d.path for d in result.output_directories] == [".", "../../../buildstream-install"]
        assert not result.output_files
        build, install = result.output_directories
        assert not build.HasField("tree_digest")  # DIRECTORY_ONLY
        assert _listing(farm, root_directory_digest(build)) == {"source.c": b"int main;\n", "built.o": b"object\n"}
        assert _listing(farm, root_directory_digest(install)) == {
            ".keep": b"", "usr": "dir", "usr/bin": "dir", "usr/bin/tool": b"tool\n"}
    finally:
        farm.close()


def test_an_actions_root_mode_overrides_the_farm_default(staging):
    farm = _farm(staging, PlatformPolicy.of(RootMode.CHROOT))
    try:
        outcome = _execute(farm, "pwd", {**BST_PLATFORM, "rootMode": "host-tools"}, ["."])
        assert outcome.status.code == code_pb2.OK, outcome.status
        assert farm.text(outcome.result.stdout_digest) == f"/build/{WORKDIR}\n"
    finally:
        farm.close()


def test_the_default_farm_runs_host_tools_and_still_resolves_dotdot_outputs(staging):
    farm = _farm(staging, WorkerConfig().platform_policy)
    try:
        script = "pwd; mkdir -p ../../../buildstream-install/usr; echo x > ../../../buildstream-install/usr/x"
        outcome = _execute(farm, script, BST_PLATFORM, ["../../../buildstream-install"])
        assert outcome.status.code == code_pb2.OK, outcome.status
        assert farm.text(outcome.result.stdout_digest) == f"/build/{WORKDIR}\n"
        (install,) = outcome.result.output_directories
        assert _listing(farm, root_directory_digest(install)) == {".keep": b"", "usr": "dir", "usr/x": b"x\n"}
    finally:
        farm.close()


def test_the_whole_root_as_output_from_the_root(staging):
    farm = _farm(staging, PlatformPolicy.of(RootMode.CHROOT))
    try:
        outcome = _execute(farm, "echo new > /made", BST_PLATFORM, ["."], working_directory="")
        assert outcome.status.code == code_pb2.OK, outcome.status
        (root,) = outcome.result.output_directories
        assert root.path == "."
        listing = _listing(farm, root_directory_digest(root))
        assert listing["made"] == b"new\n" and listing[f"{WORKDIR}/source.c"] == b"int main;\n"
        assert listing["bin"] == "->" + os.readlink("/bin")
    finally:
        farm.close()


def test_an_output_climbing_out_of_the_input_root_is_refused_naming_it(staging):
    farm = _farm(staging)
    try:
        outcome = _execute(farm, "true", BST_PLATFORM, ["../../../../etc"])
        assert outcome.status.code == code_pb2.INVALID_ARGUMENT
        assert "'../../../../etc' leaves the input root" in outcome.status.message
    finally:
        farm.close()


def test_an_unknown_platform_property_is_refused_before_anything_runs(staging):
    farm = _farm(staging)
    try:
        outcome = _execute(farm, "echo ran", {**BST_PLATFORM, "remoteApisSocketPath": "run/casd.sock"}, ["."])
        assert outcome.status.code == code_pb2.INVALID_ARGUMENT
        assert "'remoteApisSocketPath'" in outcome.status.message
        assert not outcome.result.HasField("stdout_digest")  # it never ran
    finally:
        farm.close()


def test_a_sparse_output_past_the_bound_fails_the_action_without_filling_the_cache(staging):
    farm = _farm(staging, PlatformPolicy.of(RootMode.CHROOT), max_output_bytes=64 << 20)
    try:
        outcome = _execute(farm, "truncate -s 8G huge", BST_PLATFORM, ["."])
        assert outcome.status.code == code_pb2.RESOURCE_EXHAUSTED, outcome.status
        assert "max_output_size" in outcome.status.message
        assert outcome.result.exit_code == 0  # the command itself succeeded
        stored = sum(os.lstat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(farm.cache_dir) for f in fs)
        assert 0 < stored < 64 << 20  # the streams and the action are there; no dense copy of 8 GiB
    finally:
        farm.close()
