"""Another host user against in-flight build directories: real executor, real bubblewrap,
both stagers (hardlink and FUSE).

A runner wrapper of our own looks at the build directory from the outside while it exists
— before the sandbox runs (inputs staged) and after it ran (outputs written, not yet
captured) — as an unprivileged host user who is neither the worker nor the sandbox's uid.
"""

from __future__ import annotations

import os
import subprocess
import threading

import pytest

from conftest import require, require_tool
from executor_fixtures import STAGINGS, make_farm

from reapi_worker.sandbox.request import SandboxRequest
from reapi_worker.sandbox.result import SandboxResult
from reapi_worker.sandbox.runner import Runner

#: A host user that is neither root nor the sandbox's 65534.
OTHER_USER = 4242
SECRET_INPUT = b"the tenant's sources\n"


class OtherUserLooks(Runner):
    """Runs the request with ``inner``; before and after, an unprivileged host user tries to
    list and read everything root can find under the build root."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner
        self.build_root = ""  # set once the farm exists
        self.seen: list[str] = []  # what the other user managed to read, with its content

    def run(self, request: SandboxRequest, cancel: threading.Event | None = None) -> SandboxResult:
        self._look()
        result = self.inner.run(request, cancel)
        self._look()
        return result

    def _look(self) -> None:
        paths = [self.build_root]
        for top, dirs, files, _fd in os.fwalk(self.build_root):
            paths += [os.path.join(top, name) for name in dirs + files]
        script = 'for p; do if [ -d "$p" ]; then ls "$p" >/dev/null 2>&1 && echo "LISTED $p"; ' \
                 'else cat "$p" 2>/dev/null | sed "s|^|READ $p: |"; fi; done'
        done = subprocess.run(
            ["setpriv", f"--reuid={OTHER_USER}", f"--regid={OTHER_USER}", "--clear-groups", "--",
             "sh", "-c", script, "sh", *paths],
            capture_output=True, text=True,
        )
        self.seen += done.stdout.splitlines()


@pytest.mark.parametrize("staging", STAGINGS)
def test_attack_another_host_user_cannot_read_an_in_flight_build_directory(staging):
    require_tool("bwrap")
    require_tool("setpriv")
    require(os.geteuid() == 0, "the worker runs as root")
    if staging == "fuse":
        require_tool("fusermount3")
        require(os.path.exists("/dev/fuse"), "FUSE staging needs /dev/fuse")
    looks: list[OtherUserLooks] = []
    farm = make_farm(
        max_action_timeout=30, staging=staging,
        wrap_runner=lambda inner: looks.append(OtherUserLooks(inner)) or looks[-1],
    )
    [look] = looks
    look.build_root = farm.build_root
    try:
        outcome = farm.run(
            ["sh", "-c", "cat src/in.txt > out.txt && cp /bin/true tool && chmod 4755 tool"],
            {"src/in.txt": SECRET_INPUT}, output_paths=["out.txt"],
        )
        assert outcome.ok, outcome.status.message
        assert outcome.result.exit_code == 0
        # The build root itself is listable (the sandbox's uid must traverse it); nothing
        # below it is, and no input or output was read.
        assert look.seen and set(look.seen) == {f"LISTED {farm.build_root}"}, look.seen
    finally:
        farm.close()

