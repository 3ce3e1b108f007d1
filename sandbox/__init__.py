"""Run one command in isolation.

This package knows nothing of REAPI, leases or the CAS. Its whole contract is
:class:`Runner`: *run these arguments, with exactly this environment, in this directory of
this staged input root, within these limits; tell me how it ended and what it cost.*

Why the runner is a separate, narrow seam (as Buildbarn's ``runner.proto`` and
buildbox-common's ``Runner`` are): isolation is where the security and the host-specific
mess live — user namespaces, uid mapping, mount tables, cgroup versions, process-tree
killing. Keeping it behind one small interface lets it be reviewed and tested on its own
against a real bubblewrap, lets the executor pipeline be tested against
:class:`FakeRunner`, and lets another implementation (a remote runner, a different
isolation tool, a runner in a separate privileged process) replace it without the executor
changing. Nothing REAPI-shaped crosses it: the caller turns a ``Command`` into a
:class:`SandboxRequest` and a :class:`SandboxResult` into an ``ActionResult``.

Public surface::

    SandboxRequest(arguments, environment, input_root, stdout_path, stderr_path,
                   working_directory="", root_mode=RootMode.HOST_TOOLS, network=False,
                   timeout=None, limits=ResourceLimits(), extra_ro_binds=(),
                   subtree_access=(), uid=0, gid=0, run_as=None)
    SubtreeAccess(path, read_only)                 a read-only (or writable again) subtree
    RootMode.HOST_TOOLS | RootMode.CHROOT          HOST_TOOLS_INPUT_ROOT == "/build"
    ResourceLimits(memory_bytes=None, max_pids=None, cpu_cores=None, tmp_bytes=None,
                   stream_bytes=None, open_files=None)
    Bind(source, target)
    SandboxResult(exit_code, signal, timed_out, cancelled, oom_killed, usage, exceeded=frozenset())
    ResourceUsage(wall_seconds, user_cpu_seconds, system_cpu_seconds, peak_rss_bytes, cgroup)
    CgroupUsage(memory_peak_bytes, pids_peak, cpu_seconds, user_cpu_seconds, system_cpu_seconds)
    Runner.run(request, cancel: threading.Event | None = None) -> SandboxResult
    BubblewrapRunner(bwrap_path="bwrap", *, run_as=None, controller=None, layout=None, nat=None,
                     etc_view=True)                 /etc as one prepared read-only view (root)
    SlirpNat()                                           outbound network for network=on
    HostLayout.probe(etc_allow=DEFAULT_HOST_ETC)         what a HOST_TOOLS sandbox shows
    FakeRunner(respond)                                  for the executor's unit tests
    SandboxSetupError(Internal)                          the sandbox could not be set up
    RunAs(uid, gid), NOBODY, prepare_build_dir(path, uid, gid),
    sandbox_can_protect_hardlinks(run_as=None, cache_owner_uid=None) -> bool
    ResourceController, Confinement                      limits behind one interface
    choose_resource_controller() -> ResourceController   cgroup v2 | cgroup v1 | rlimits
    probe_host(bwrap="bwrap", run_as=None, controller=None) -> HostCapabilities
    runner_probe(runner, scratch_dir, *, limits, extra_ro_binds, run_as) -> Probe   health's sandbox check
    UidPool(ids).lease() -> UidLease (.run_as, .release(), .retire(why))   one host uid per action
    bwrap_arguments(request, layout, fds) -> BwrapArguments   the pure argument builder

The security argument (hardlinked inputs and uid 0) is in :mod:`.identity`; one host uid
per action in :mod:`.uid_pool`; the network boundary in :mod:`.network`; the /etc
allow-list in :mod:`.host_etc`, shown through one prepared view (:mod:`.etc_view`); why no
zombie outlives an action in :mod:`.reaper`; the sandbox's shape in :mod:`.bwrap_args`; one run step by step
in :mod:`.bubblewrap`; limits in :mod:`.limits` and :mod:`.cgroups`; how each bound is
enforced and seen in :mod:`.bounds`.
"""

from .bubblewrap import BubblewrapRunner
from .bwrap_args import BwrapArguments, ControlFds, HostLayout, bwrap_arguments
from .errors import SandboxSetupError
from .fake import FakeRunner
from .host_etc import DEFAULT_HOST_ETC
from .identity import NOBODY, RunAs, prepare_build_dir, sandbox_can_protect_hardlinks
from .limits import Confinement, ResourceController
from .network import SlirpNat
from .probe import HostCapabilities, Probe, choose_resource_controller, probe_host, runner_probe
from .request import HOST_TOOLS_INPUT_ROOT, Bind, ResourceLimits, RootMode, SandboxRequest, SubtreeAccess
from .result import SandboxResult
from .runner import Runner
from .uid_pool import SharedUid, UidLease, UidPool
from .usage import CgroupUsage, ResourceUsage

__all__ = [
    "DEFAULT_HOST_ETC",
    "HOST_TOOLS_INPUT_ROOT",
    "NOBODY",
    "Bind",
    "BwrapArguments",
    "BubblewrapRunner",
    "CgroupUsage",
    "Confinement",
    "ControlFds",
    "FakeRunner",
    "HostCapabilities",
    "HostLayout",
    "Probe",
    "ResourceController",
    "ResourceLimits",
    "ResourceUsage",
    "RootMode",
    "RunAs",
    "Runner",
    "SandboxRequest",
    "SandboxResult",
    "SandboxSetupError",
    "SubtreeAccess",
    "SlirpNat",
    "SharedUid",
    "UidLease",
    "UidPool",
    "bwrap_arguments",
    "choose_resource_controller",
    "prepare_build_dir",
    "probe_host",
    "runner_probe",
    "sandbox_can_protect_hardlinks",
]
