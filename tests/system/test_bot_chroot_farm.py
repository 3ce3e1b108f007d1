"""A chroot farm through the real BuildGrid 0.4.4: ``reapi-worker bot --root-mode chroot``
runs a BuildStream-shaped action (a busybox sysroot as the input root, only OSFamily/ISA,
outputs ``"."`` and ``../../../buildstream-install`` as DIRECTORY_ONLY) and the client
receives ``root_directory_digest`` with every Directory in the scheduler's CAS."""

from __future__ import annotations

import os
import shutil

import pytest

from bot_fixtures import Farm
from conftest import require, require_tool

from reapi_worker.protos import code_pb2, re_pb2
from reapi_worker.protos.unbound_fields import OutputDirectoryFormat, root_directory_digest, set_output_directory_format
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.directory.cas import CasDirectory

pytestmark = pytest.mark.buildgrid

WORKDIR = "buildstream/project/element.bst"


@pytest.fixture
def farm(buildgrid):
    require_tool("bwrap")
    busybox = require_tool("busybox")
    with open(busybox, "rb") as stream:
        head = stream.read(4096)  # a dynamic ELF names its loader (PT_INTERP) in its first page
    require(b"ld-linux" not in head, "busybox must be static (Debian's busybox-static) to be a whole sysroot")
    farm = Farm(buildgrid)
    yield farm
    farm.close()


def _sysroot(top: str) -> None:
    os.makedirs(os.path.join(top, "bin"))
    shutil.copy2(shutil.which("busybox"), os.path.join(top, "bin", "busybox"))
    for applet in ("sh", "mkdir", "cat"):
        os.symlink("busybox", os.path.join(top, "bin", applet))
    os.makedirs(os.path.join(top, WORKDIR))
    with open(os.path.join(top, WORKDIR, "source.c"), "w") as stream:
        stream.write("int main;\n")
    os.makedirs(os.path.join(top, "buildstream-install"))


def _buildstream_action(farm: Farm, sysroot: str, script: str) -> Digest:
    root = CasDirectory.empty(farm.store)
    root.import_files(sysroot)
    command = re_pb2.Command(
        arguments=["sh", "-c", "-e", script], working_directory=WORKDIR,
        output_paths=[".", "../../../buildstream-install"],
        environment_variables=[re_pb2.Command.EnvironmentVariable(name="PATH", value="/bin")],
    )
    set_output_directory_format(command, OutputDirectoryFormat.DIRECTORY_ONLY)
    platform = re_pb2.Platform(properties=[
        re_pb2.Platform.Property(name="ISA", value=farm.token), re_pb2.Platform.Property(name="OSFamily", value="linux")])
    command.platform.CopyFrom(platform)
    action = re_pb2.Action(command_digest=farm.store.write(serialize(command)).to_proto(),
                           input_root_digest=root.digest().to_proto(), platform=platform, do_not_cache=True)
    digest = farm.store.write(serialize(action))
    blobs = {digest, Digest.from_proto(action.command_digest)}
    blobs |= {d for d, _ in root.file_digests()} | {d for d, _ in root.directory_protos()}
    farm.store.upload_missing(blobs)
    return digest


def _listing(farm: Farm, digest_proto, prefix: str = "") -> dict:
    found: dict = {}
    directory = re_pb2.Directory.FromString(farm.store.read(Digest.from_proto(digest_proto)))
    for f in directory.files:
        found[prefix + f.name] = farm.store.read(Digest.from_proto(f.digest))
    for d in directory.directories:
        found[prefix + d.name] = "dir"
        found.update(_listing(farm, d.digest, prefix + d.name + "/"))
    return found


def test_a_chroot_farm_serves_a_buildstream_shaped_action(farm, tmp_path):
    worker = farm.start_worker("chroot", 1, "--root-mode", "chroot")
    worker.wait_registered()
    _sysroot(str(tmp_path / "sysroot"))
    script = "pwd; echo object > built.o; mkdir -p /buildstream-install/usr/bin; echo tool > /buildstream-install/usr/bin/tool"
    execution = farm.execute(_buildstream_action(farm, str(tmp_path / "sysroot"), script))
    assert execution.response.status.code == code_pb2.OK, execution.response.status
    result = execution.response.result
    assert result.exit_code == 0, farm.store.read(Digest.from_proto(result.stderr_digest))
    assert farm.stdout(execution) == f"/{WORKDIR}\n"  # the sysroot is /
    assert [d.path for d in result.output_directories] == [".", "../../../buildstream-install"]
    build, install = result.output_directories
    # Read through the scheduler's CAS: every Directory was uploaded.
    assert _listing(farm, root_directory_digest(build)) == {"source.c": b"int main;\n", "built.o": b"object\n"}
    assert _listing(farm, root_directory_digest(install)) == {"usr": "dir", "usr/bin": "dir", "usr/bin/tool": b"tool\n"}
