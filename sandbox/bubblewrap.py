""":class:`BubblewrapRunner`: the :class:`~.runner.Runner` that isolates with bubblewrap.

One run, step by step (each step's *why* is in the code):

1. HOST_TOOLS: the process's ``/etc`` view is checked against the host (:mod:`.etc_view`).
   The confinement (cgroup or rlimits) is created for the action's limits.
2. The output files are opened by the worker, so the sandbox needs no access to their paths;
   with a ``stream_bytes`` bound the command writes to pipes instead (:mod:`.streams`).
3. ``bwrap --args FD -- COMMAND`` is started through the runner's :class:`~.spawner.Spawner`,
   born in its v1 cgroups, in a network namespace of its own if the request wants network,
   as the sandbox's uid, and with its rlimits — no program of its own for any of these. bubblewrap waits for its options
   (from the pure :func:`~.bwrap_args.bwrap_arguments`) on that pipe; before writing them
   the worker joins the process to its cgroup where the child did not
   (:meth:`~.limits.Confinement.join`, v2). Either way it is inside before anything can
   fork, and bubblewrap's cgroup namespace is rooted at the action's cgroup.
4. bubblewrap reports its init's pid on ``--info-fd`` and then waits on ``--block-fd`` after
   setting up the mounts. The runner opens a pidfd on the init — from then on it can kill
   the whole pid namespace without any pid-reuse race — and, with a ``/tmp`` bound, the
   sandbox's mount namespace (:class:`~.bounds.TmpfsWatch`), attaches the outbound NAT to
   the init's network namespace if the request wants network (:mod:`.network`), and
   releases the command. The timeout starts.
5. The runner waits on a pidfd of bubblewrap's monitor (the spawner's child) with ``poll`` (never ``select``,
   which fails for descriptors past 1023, and a busy worker has many), moving bounded
   streams as they fill (with a ``cancel`` event, it wakes every 50 ms to look at it). On
   timeout, cancel or a stream past its bound it SIGKILLs the init (the kernel then kills
   every process of the namespace), the monitor, and, as a second line, everything in the
   cgroup.
6. The monitor exits as soon as the command has (the spawner reaps it), and its init — the
   pid namespace — dies with it (``--die-with-parent``); the runner SIGKILLs the init anyway
   and waits on its pidfd, which turns readable only once the kernel has emptied the
   namespace. The init, orphaned when the monitor exited, is reaped by the spawner (a child
   subreaper) or, should the spawner be gone, by the worker (one too, :mod:`.reaper`, or
   PID 1 in a container). So when ``run`` returns, nothing of the action is alive, cgroup
   or not.
   ``--json-status-fd`` says whether the command was exec'd at all: if not, bubblewrap's own
   message in the stderr file (nothing else can have written there yet) says whether the
   command was not found / not executable (127 / 126) or the sandbox could not be set up.
7. Cgroup figures are read (see :mod:`.usage` for why not ``wait4``), the bounds the action
   ran into are collected (:mod:`.bounds`), leftovers killed, the cgroup removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import select
import shutil
import signal
import threading
import time

from .bounds import MAX_PIDS, STREAM_BYTES, TMP_BYTES, TmpfsWatch
from .bwrap_args import ControlFds, HostLayout, bwrap_arguments
from .errors import BubblewrapRefused, SandboxSetupError
from .etc_view import EtcView, shared_etc_view
from .identity import RunAs, effective_run_as, sandbox_can_protect_hardlinks
from .limits import Confinement, ResourceController
from .network import SlirpNat
from .reaper import become_child_subreaper, reap_if_child
from .request import RootMode, SandboxRequest
from .result import SandboxResult
from .runner import Runner
from .spawner import ChildSetup, Spawner, SpawnedProcess
from .streams import OutputStreams
from .usage import ResourceUsage

log = logging.getLogger(__name__)

#: How often ``run`` looks at a ``cancel`` event while the command runs (the contract is 0.2 s).
CANCEL_POLL_SECONDS = 0.05
#: How long to wait for the sandbox's init to vanish after the monitor has exited.
INIT_EXIT_GRACE_SECONDS = 2.0
#: Cgroups a runner that chose its own controller keeps made ahead (:mod:`.cgroup_spares`).
SPARE_CGROUPS = 2
#: The tail of the stderr file read to explain a failed set-up.
_STDERR_TAIL = 4096
_EXEC_FAILURE = re.compile(r"^bwrap: execvp (?P<command>.*): (?P<reason>[^\n]*)$", re.MULTILINE)
_NOT_FOUND = {os.strerror(errno.ENOENT), os.strerror(errno.ENOTDIR)}
#: The descriptors bubblewrap's process gets from the spawner: 0, 1, 2, then these.
_CHILD_INFO_FD, _CHILD_STATUS_FD, _CHILD_BLOCK_FD, _CHILD_ARGS_FD = 3, 4, 5, 6


class BubblewrapRunner(Runner):
    """Runs requests in bubblewrap sandboxes (see the module docstring for one run).

    * ``bwrap_path`` — the bubblewrap binary (looked up on the worker's PATH once, here).
    * ``run_as`` — the default host identity of a sandbox, for requests that name none (a
      request's ``run_as`` wins: an action's own uid from a :class:`~.uid_pool.UidPool`);
      ``None`` = automatic (65534:65534 when the worker is root, else the worker itself).
      See :mod:`.identity` for why.
    * ``controller`` — limits and the second kill line; the composition root passes the one
      :func:`~.probe.choose_resource_controller` picked. ``None`` = choose now.
    * ``layout`` — the host paths a HOST_TOOLS sandbox shows; ``None`` = probe the host now.
    * ``nat`` — outbound connectivity for requests with ``network``; ``None`` = such a
      request is refused with SandboxSetupError (the operator forbids it, and the executor
      should have refused the action before it got here).
    * ``etc_view`` — show ``/etc`` through the process's prepared view (:mod:`.etc_view`):
      one bind per sandbox instead of one per entry. Needs root; a worker that is not root
      (or ``False``, or one that cannot make the view: logged) binds the entries one by one,
      as the layout lists them.

    Makes the worker process a child subreaper (:mod:`.reaper`). Raises SandboxSetupError
    when bubblewrap is missing or ``run_as`` is not possible. Thread-safe; :meth:`close`
    stops its spawner (a runner left open keeps it until the worker exits).
    """

    def __init__(
        self,
        bwrap_path: str = "bwrap",
        *,
        run_as: RunAs | None = None,
        controller: ResourceController | None = None,
        layout: HostLayout | None = None,
        nat: SlirpNat | None = None,
        etc_view: bool = True,
    ) -> None:
        found = shutil.which(bwrap_path)
        if found is None:
            raise SandboxSetupError(f"bubblewrap ({bwrap_path}) is not installed")
        self.bwrap_path = found
        self.run_as = effective_run_as(run_as)
        self._spawner = Spawner()
        self._owns_controller = controller is None
        if controller is None:
            from .probe import choose_resource_controller

            controller = choose_resource_controller(spares=SPARE_CGROUPS)
        self.controller = controller
        self.layout = HostLayout.probe() if layout is None else layout
        self.protects_hardlinks = sandbox_can_protect_hardlinks(run_as)
        self.nat = nat
        self.etc_view: EtcView | None = None
        if etc_view and os.geteuid() == 0 and self.layout.etc_allow:
            try:
                self.etc_view = shared_etc_view(self.layout.etc_allow, self.layout.etc_dir)
            except SandboxSetupError as e:
                # Only slower without it (the same entries, bound one by one): not a reason
                # to refuse to start.
                log.warning("binding /etc entry by entry: %s", e)
        become_child_subreaper()

    def close(self) -> None:
        """Stop the spawner (runs after this start a new one) and, if the runner chose its
        controller itself, release the controller's spare cgroups."""
        self._spawner.close()
        if self._owns_controller:
            self.controller.close()

    @property
    def host_ids(self) -> tuple[int, int]:
        """The host uid/gid a sandbox of a request without ``run_as`` runs as — what the
        build directory's directories must be owned by (:func:`~.identity.prepare_build_dir`)."""
        if self.run_as is None:
            return os.geteuid(), os.getegid()
        return self.run_as.uid, self.run_as.gid

    def run(self, request: SandboxRequest, cancel: threading.Event | None = None) -> SandboxResult:
        if request.network and self.nat is None:
            raise SandboxSetupError("the request wants network, and this runner has no outbound NAT")
        started = time.monotonic()
        if self.etc_view is None or request.root_mode is not RootMode.HOST_TOOLS:
            return self._run(request, cancel, started, None)
        with self.etc_view.acquire() as etc_view:  # held until bubblewrap has bound it, and more
            return self._run(request, cancel, started, etc_view)

    def _run(
        self, request: SandboxRequest, cancel: threading.Event | None, started: float, etc_view: str | None
    ) -> SandboxResult:
        confinement = self.controller.confine(request.limits)
        try:
            with _Descriptors() as fds, OutputStreams(request) as streams:
                return self._run_confined(request, cancel, confinement, fds, streams, started, etc_view)
        finally:
            try:
                confinement.close()
            except SandboxSetupError as e:
                # The action ran (or failed to start for another reason, which is raised);
                # a cgroup that would not go away is the host's problem, logged.
                log.error("after running %r: %s", request.arguments[0], e)

    # -- one run ---------------------------------------------------------------------------

    def _run_confined(
        self,
        request: SandboxRequest,
        cancel: threading.Event | None,
        confinement: Confinement,
        fds: "_Descriptors",
        streams: OutputStreams,
        started: float,
        etc_view: str | None,
    ) -> SandboxResult:
        stdout_fd, stderr_fd = streams.child_fds
        # os.pipe() gives O_CLOEXEC descriptors, so a concurrent run's spawn cannot inherit them.
        info_r, info_w = fds.pipe()
        status_r, status_w = fds.pipe()
        block_r, block_w = fds.pipe()
        args_r, args_w = fds.pipe()
        devnull = fds.adopt(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        child_ends = (info_w, status_w, block_r, args_r)
        bwrap_args = bwrap_arguments(
            request, self.layout, ControlFds(_CHILD_INFO_FD, _CHILD_STATUS_FD, _CHILD_BLOCK_FD), etc_view)
        setup = ChildSetup(
            rlimits=confinement.rlimits,
            join_tasks=confinement.join_tasks,
            home_tasks=confinement.home_tasks,
            # A network request starts in a fresh namespace (made as root, before the uid
            # switch) that the NAT attaches to, and which bubblewrap then keeps.
            new_network=request.network,
            # The request's own identity (one uid per action) or the runner's default.
            run_as=self.run_as if request.run_as is None else effective_run_as(request.run_as),
        )
        # bubblewrap's own environment is empty (C locale, nothing of the worker), and so is
        # what the sandbox's init shows in /proc/1/environ; its working directory is /.
        spawned = self._spawner.spawn(
            [self.bwrap_path, "--args", str(_CHILD_ARGS_FD), "--", *bwrap_args.command],
            (devnull, stdout_fd, stderr_fd, *child_ends), setup,
        )
        for fd in (devnull, *child_ends):  # only the child holds these now, so EOF means what it says
            fds.close(fd)
        streams.child_started()

        monitor = _Monitor(spawned)
        reason: str | None = None
        tmp_watch: TmpfsWatch | None = None
        try:
            with contextlib.ExitStack() as network:
                # bubblewrap cannot fork before it has its options: the window to join where
                # the child did not (:mod:`.limits`). A failed join raises before the options
                # go out, and the handler below kills the process, which has run nothing.
                confinement.join(spawned.pid)
                _write_args(args_w, bwrap_args.options)
                fds.close(args_w)
                init_pid = _read_init_pid(info_r)
                if init_pid is None:
                    monitor.kill()  # it failed before creating the sandbox; make sure it is gone
                else:
                    monitor.hold_init(init_pid)
                    if request.limits.tmp_bytes is not None:
                        tmp_watch = TmpfsWatch.hold(init_pid)
                    if request.network and monitor.init_pidfd is not None:
                        assert self.nat is not None
                        # Stopped (the exit stack) only after the sandbox is gone.
                        network.enter_context(self.nat.attach(init_pid))
                    # Release the command. (EOF on --block-fd would release it too, which is
                    # why every failure path kills before any descriptor is closed.)
                    _write_quietly(block_w, b"1")
                deadline = None if request.timeout is None else time.monotonic() + request.timeout
                reason = monitor.wait(deadline, cancel, streams)
                if reason is not None:
                    monitor.kill()
                    confinement.kill_all()
                monitor.reap()
            streams.drain()  # every writer is gone: what is left in the pipes, then EOF
            wall = time.monotonic() - started

            confinement.kill_all()  # the second line: after the pid namespace, nothing is left
            usage = ResourceUsage.measured(wall, confinement.usage())
            oom = confinement.oom_killed()
            exceeded = {MAX_PIDS} if confinement.pids_exhausted() else set()
            if streams.exceeded:
                exceeded.add(STREAM_BYTES)
            if reason is not None:
                return SandboxResult(
                    exit_code=128 + signal.SIGKILL, signal=signal.SIGKILL, timed_out=reason == "timeout",
                    cancelled=reason == "cancel", oom_killed=oom, usage=usage, exceeded=frozenset(exceeded),
                )
            exit_code = _command_exit_code(status_r)
            if exit_code is None and not oom:
                exit_code = _exec_failure(request, init_pid)
            if exit_code is None:  # OOM-killed before bubblewrap could report
                exit_code = 128 + signal.SIGKILL
            if exit_code != 0 and tmp_watch is not None and tmp_watch.full():
                exceeded.add(TMP_BYTES)
            return SandboxResult(
                exit_code=exit_code, signal=_signal_of(exit_code), timed_out=False, cancelled=False,
                oom_killed=oom, usage=usage, exceeded=frozenset(exceeded),
            )
        except BaseException:
            monitor.kill()
            monitor.reap()
            raise
        finally:
            if tmp_watch is not None:
                tmp_watch.close()


class _Descriptors:
    """The descriptors of one run, each closed exactly once.

    Closing a descriptor twice is a real bug in a threaded worker: the second close may hit
    a descriptor another thread has just opened under the same number.
    """

    def __init__(self) -> None:
        self._open: set[int] = set()

    def adopt(self, fd: int) -> int:
        self._open.add(fd)
        return fd

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        return self.adopt(r), self.adopt(w)

    def close(self, fd: int) -> None:
        if fd in self._open:
            self._open.discard(fd)
            _close_quietly(fd)

    def __enter__(self) -> "_Descriptors":
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in list(self._open):
            self.close(fd)


class _Monitor:
    """bubblewrap's monitor process (the spawner's child: watched through its pidfd, reaped
    by the spawner) and, once known, a pidfd on its init."""

    def __init__(self, spawned: SpawnedProcess) -> None:
        self.pidfd: int | None = spawned.pidfd
        self.init_pidfd: int | None = None
        self._reaped = False

    def hold_init(self, pid: int) -> None:
        # The init is alive and blocked on --block-fd, so this pid cannot have been reused.
        try:
            self.init_pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.init_pidfd = None  # it already failed; the monitor will report it

    def wait(
        self, deadline: float | None, cancel: threading.Event | None, streams: OutputStreams
    ) -> str | None:
        """Wait until the monitor exits (``None``), the deadline passes (``"timeout"``),
        ``cancel`` is set (``"cancel"``) or a stream goes past its bound
        (``"stream_bytes"``), moving bounded streams meanwhile."""
        assert self.pidfd is not None
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        readers = set(streams.readers)
        for reader in readers:
            poller.register(reader, select.POLLIN)
        while True:
            if cancel is not None and cancel.is_set():
                return "cancel"
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                return "timeout"
            if cancel is not None:
                timeout = CANCEL_POLL_SECONDS if timeout is None else min(timeout, CANCEL_POLL_SECONDS)
            ready = poller.poll(None if timeout is None else max(1, int(timeout * 1000)))
            for fd, _events in ready:
                if fd in readers:
                    streams.pump(fd)
            if streams.exceeded:
                return STREAM_BYTES
            for reader in readers - set(streams.readers):  # at EOF: poll would spin on POLLHUP
                poller.unregister(reader)
                readers.discard(reader)
            if any(fd == self.pidfd for fd, _events in ready):
                return None

    def kill(self) -> None:
        """SIGKILL the init (and so the pid namespace) and the monitor. Idempotent."""
        if self.init_pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
        if self.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def reap(self) -> None:
        """Wait until the monitor has exited, then until the init — and so the whole pid
        namespace — is gone."""
        if self._reaped:
            return
        try:
            assert self.pidfd is not None
            # poll, not select: the descriptors may be numbered past select's 1023.
            exited = select.poll()
            exited.register(self.pidfd, select.POLLIN)
            exited.poll()
            if self.init_pidfd is not None:
                # Already dying of PDEATHSIG; make it certain, and wait for the kernel to
                # finish tearing the namespace down (the pidfd turns readable after that).
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
                exited = select.poll()
                exited.register(self.init_pidfd, select.POLLIN)
                exited.poll(INIT_EXIT_GRACE_SECONDS * 1000)
                reap_if_child(self.init_pidfd)  # ours only if the spawner died meanwhile
        finally:
            for fd in (self.pidfd, self.init_pidfd):
                if fd is not None:
                    _close_quietly(fd)
            self.pidfd = self.init_pidfd = None
            self._reaped = True


def _write_args(fd: int, args: tuple[str, ...]) -> None:
    """Send ``args`` NUL-terminated; bubblewrap reads them concurrently, so any size works."""
    data = memoryview(b"".join(os.fsencode(a) + b"\0" for a in args))
    try:
        while data:
            data = data[os.write(fd, data):]
    except BrokenPipeError:
        pass  # it died before reading them all: reported as a set-up failure below


def _read_init_pid(fd: int) -> int | None:
    """The init's pid from ``--info-fd`` (bubblewrap closes it after writing), or ``None``
    if bubblewrap failed before creating the sandbox."""
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    try:
        return int(json.loads(b"".join(chunks))["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


def _command_exit_code(status_fd: int) -> int | None:
    """The ``exit-code`` from ``--json-status-fd``; present only if the command was exec'd."""
    data = b""
    while chunk := os.read(status_fd, 4096):
        data += chunk
    for line in data.decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "exit-code" in record:
            return int(record["exit-code"])
    return None


def _exec_failure(request: SandboxRequest, init_pid: int | None) -> int:
    """The command was never exec'd: 127/126 if exec failed, else raise SandboxSetupError.

    Only bubblewrap (and the spawned process before it) can have written to stderr so far,
    so its message is trustworthy here: the command could not forge it.
    """
    tail = _read_tail(request.stderr_path)
    if init_pid is not None:
        match = None
        for match in _EXEC_FAILURE.finditer(tail):
            pass
        if match is not None:
            return 127 if match.group("reason") in _NOT_FOUND else 126
    message = tail.strip().splitlines()[-1] if tail.strip() else "it exited without a message"
    raise BubblewrapRefused(f"bubblewrap failed before running the command: {message}")


def _read_tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _STDERR_TAIL))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _signal_of(exit_code: int) -> int | None:
    number = exit_code - 128
    return number if 0 < number < signal.NSIG else None


def _write_quietly(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)
    except BrokenPipeError:
        pass  # the init already died (a set-up failure); the monitor reports it


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
