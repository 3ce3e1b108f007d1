"""What this host can do, the one place a resource controller is chosen, and the probe that
tells whether sandboxes can still be set up.

:func:`probe_host` feeds ``reapi-worker capabilities`` and the platform properties a worker
advertises; :func:`choose_resource_controller` is called by a BubblewrapRunner given no
controller (the composition root makes one runner);
:func:`runner_probe` is what the worker's health check runs every few minutes.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from reapi_worker.protos.errors import ReapiError

from .errors import SandboxSetupError
from .identity import RunAs, effective_run_as, sandbox_can_protect_hardlinks
from .limits import ResourceController
from .request import Bind, ResourceLimits, RootMode, SandboxRequest
from .rlimits import RlimitController
from .runner import Runner

log = logging.getLogger(__name__)

#: A sandbox probe: ``None`` when a trivial sandbox ran, else why it did not.
Probe = Callable[[], str | None]


@dataclass(frozen=True)
class HostCapabilities:
    """What the sandbox can do here.

    * ``bwrap_path`` / ``bwrap_version`` — ``None`` when bubblewrap is not installed;
    * ``user_namespaces`` — a trivial sandbox really ran as the sandbox identity;
    * ``cgroup_version`` — 2, 1, or ``None`` when limits fall back to rlimits;
    * ``resource_controller`` — the chosen controller's kind; ``limits_enforced`` — which of
      memory, pids, cpu it enforces; ``cgroup_controllers`` — controllers of the hierarchies;
    * ``fuse`` — ``/dev/fuse`` exists and ``fusermount3`` is installed;
    * ``root_modes`` — the :class:`RootMode` s a sandbox can be built with;
    * ``hardlinks_protected`` — see :func:`~.identity.sandbox_can_protect_hardlinks`;
    * ``problems`` — why something is unavailable, for humans.
    """

    bwrap_path: str | None
    bwrap_version: str | None
    user_namespaces: bool
    cgroup_version: int | None
    cgroup_controllers: frozenset[str]
    resource_controller: str
    limits_enforced: frozenset[str]
    fuse: bool
    root_modes: tuple[RootMode, ...]
    hardlinks_protected: bool
    problems: tuple[str, ...] = ()


def choose_resource_controller(spares: int = 0) -> ResourceController:
    """cgroup v2 if the worker's v2 cgroup can delegate memory and pids, else cgroup v1 if a
    memory or pids hierarchy is writable, else rlimits. Creates the ``reapi-worker``
    directories, and on v2 may move the worker into a leaf cgroup (see :mod:`.cgroups`).
    ``spares``: cgroups to keep made ahead of the actions (:mod:`.cgroup_spares`) — for a
    controller that will run actions, not one that only reports."""
    from .cgroups import CgroupV1Controller, CgroupV2Controller

    try:
        return CgroupV2Controller.from_self(spares=spares)
    except SandboxSetupError as e:
        log.debug("cgroup v2 not usable: %s", e)
    try:
        return CgroupV1Controller.from_self(spares=spares)
    except SandboxSetupError as e:
        log.debug("cgroup v1 not usable: %s", e)
    return RlimitController()


def probe_host(
    bwrap: str = "bwrap",
    run_as: RunAs | None = None,
    controller: ResourceController | None = None,
) -> HostCapabilities:
    """Probe the host. Runs one trivial sandbox (a few ms) to prove user namespaces work as
    the sandbox identity; chooses a controller unless one is given."""
    problems: list[str] = []
    bwrap_path = shutil.which(bwrap)
    version = None
    userns = False
    if bwrap_path is None:
        problems.append(f"bubblewrap ({bwrap}) is not installed")
    else:
        out = subprocess.run([bwrap_path, "--version"], capture_output=True, text=True, env={})
        version = out.stdout.strip().removeprefix("bubblewrap ").strip() or None
        userns, problem = _try_sandbox(bwrap_path, run_as)
        if problem:
            problems.append(problem)

    if controller is None:
        controller = choose_resource_controller()
    cgroup_version = {"cgroup-v2": 2, "cgroup-v1": 1}.get(controller.kind)
    hierarchies: frozenset[str] = frozenset()
    if cgroup_version == 1:
        hierarchies = frozenset(getattr(controller, "parents", {}))
    elif cgroup_version == 2:
        hierarchies = controller.enforces

    fuse = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None
    modes: tuple[RootMode, ...] = ()
    if userns:
        modes = ((RootMode.HOST_TOOLS,) if os.path.isdir("/usr") else ()) + (RootMode.CHROOT,)
    try:
        protected = sandbox_can_protect_hardlinks(run_as)
    except SandboxSetupError as e:
        protected = False
        problems.append(str(e))
    return HostCapabilities(
        bwrap_path=bwrap_path,
        bwrap_version=version,
        user_namespaces=userns,
        cgroup_version=cgroup_version,
        cgroup_controllers=hierarchies,
        resource_controller=controller.kind,
        limits_enforced=controller.enforces,
        fuse=fuse,
        root_modes=modes,
        hardlinks_protected=protected,
        problems=tuple(problems),
    )


def _try_sandbox(bwrap_path: str, run_as: RunAs | None) -> tuple[bool, str | None]:
    try:
        target = effective_run_as(run_as)
    except SandboxSetupError as e:
        return False, str(e)
    true = shutil.which("true") or "/bin/true"
    argv = [bwrap_path, "--unshare-all", "--uid", "0", "--gid", "0", "--ro-bind", "/", "/", "--", true]
    # Once, at start: a plain fork of the worker is affordable here (the runner's spawner
    # exists for the per-action path).
    done = subprocess.run(
        argv, capture_output=True, text=True, env={}, stdin=subprocess.DEVNULL,
        user=None if target is None else target.uid, group=None if target is None else target.gid,
        extra_groups=None if target is None else [],
    )
    if done.returncode != 0:
        return False, f"bubblewrap cannot create user namespaces here: {done.stderr.strip()}"
    return True, None


def runner_probe(
    runner: Runner,
    scratch_dir: str,
    *,
    limits: ResourceLimits = ResourceLimits(),
    extra_ro_binds: Iterable[Bind] = (),
    command: str = "/bin/true",
    timeout: float = 30.0,
    run_as: RunAs | None = None,
) -> Probe:
    """A probe that runs ``command`` through ``runner`` the way an action runs (same runner,
    same limits and binds, an empty input root in ``scratch_dir``, usually the build root),
    so it fails for the reasons actions would. A few milliseconds with bubblewrap.
    ``run_as``: the host identity to probe as (an action's own uid); ``None``: the runner's
    default.

    The probe never raises for a finding: a :class:`~.errors.SandboxSetupError` or a
    non-zero exit becomes the reason it returns."""
    binds = tuple(extra_ro_binds)

    def probe() -> str | None:
        with tempfile.TemporaryDirectory(prefix="health-probe-", dir=scratch_dir) as top:
            # bubblewrap runs as the sandbox's uid, which must reach the input root.
            os.chmod(top, 0o755)
            root = os.path.join(top, "root")
            os.mkdir(root)
            os.chmod(root, 0o755)
            output = os.path.join(top, "output")
            request = SandboxRequest(
                arguments=(command,), environment={}, input_root=root, stdout_path=output,
                stderr_path=output, timeout=timeout, limits=limits, extra_ro_binds=binds, run_as=run_as,
            )
            try:
                result = runner.run(request)
            except ReapiError as error:
                return f"a trivial sandbox could not be set up: {error}"
            if result.exit_code != 0:
                with open(output, "rb") as stream:
                    said = stream.read()[-300:].decode(errors="replace").strip()
                return f"a trivial sandbox ({command}) exited {result.exit_code}: {said}"
        return None

    return probe
