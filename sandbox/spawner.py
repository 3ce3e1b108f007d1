"""How a sandbox's first process is made: by a small helper process, not an exec chain.

Before bubblewrap may run, its process must have its rlimits, be inside its v1 cgroups
(joined as a thread move: see :mod:`.limits`) and run as the sandbox's uid. The worker
cannot do these for another process (it lacks CAP_SYS_RESOURCE here; a v1 thread move is
cheap only for the moving thread itself), and it cannot do them in a child of its own
either: changing ids or running Python after ``fork`` rules out ``vfork``, and a plain
``fork`` of a worker with a large heap costs tens of milliseconds (27 ms measured at
800 MB); Python between ``fork`` and ``exec`` in a threaded process is unsafe besides. So
each step used to be a program of its own — ``sh`` (``ulimit``, cgroup ``tasks``),
``prlimit``, ``unshare --net``, ``setpriv`` — each exec ~0.6–1.4 ms on every action.

The spawner is one small process started once per runner (stdlib only, one thread), which
puts *itself* in the state the child must be born in — the action's cgroups, its real ids,
a fresh network namespace — for the moment of a ``posix_spawn`` (a ``vfork``-like clone:
no copy of any address space), sets the child's rlimits with ``prlimit`` and goes back
(:mod:`.spawner_process` has the order, and why each step is safe). Measured here (v1,
three hierarchies, ``bwrap true`` to its exit): the spawner with a Python ``fork`` in
place of ``posix_spawn`` 8.4 ms, with ``posix_spawn`` 6.7 ms.

What the worker gets back is a pid and a pidfd: the process is the spawner's child, not the
worker's, so it is watched, signalled and waited for through the pidfd (its exit status
is not needed: bubblewrap's ``--json-status-fd`` carries the command's). If the spawner
dies, the call raises SandboxSetupError and the next one starts a new spawner; every
sandbox it had started dies with it (``--die-with-parent``).
"""

from __future__ import annotations

import array
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import SandboxSetupError
from .identity import RunAs

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("<I")
_PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spawner_process.py")


@dataclass(frozen=True)
class ChildSetup:
    """What the child does to itself before it execs, in this order (see the module docstring).

    * ``rlimits`` — ``(resource.RLIMIT_*, value)``, set as soft and hard limit;
    * ``join_tasks`` — cgroup v1 ``tasks`` files the child is born inside of (the spawner
      joins them for the moment of the spawn, then goes back to ``home_tasks``, its own);
    * ``new_network`` — a network namespace of its own, made before the uid switch;
    * ``run_as`` — the host identity to switch to (no supplementary groups); ``None``: stay.
    """

    rlimits: tuple[tuple[int, int], ...] = ()
    join_tasks: tuple[str, ...] = ()
    home_tasks: tuple[str, ...] = ()
    new_network: bool = False
    run_as: RunAs | None = None


@dataclass(frozen=True)
class SpawnedProcess:
    """A child of the spawner: its pid (in the worker's pid namespace) and a pidfd on it,
    owned by the caller (close it)."""

    pid: int
    pidfd: int


class Spawner:
    """Starts processes through the spawner process (see the module docstring). Thread-safe:
    requests are answered one at a time, each in well under a millisecond."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._socket: socket.socket | None = None

    def spawn(
        self,
        argv: Sequence[str],
        fds: Sequence[int],
        setup: ChildSetup = ChildSetup(),
        env: Mapping[str, str] | None = None,
    ) -> SpawnedProcess:
        """Start ``argv`` (``argv[0]`` an absolute path) as a child with ``fds`` as its
        descriptors 0, 1, 2, 3..., ``setup`` applied, ``/`` as its working directory and
        ``env`` (nothing of the worker's by default). Raises SandboxSetupError, naming the
        step, when no child could be made; then nothing ran."""
        if setup.join_tasks and len(setup.home_tasks) != len(setup.join_tasks):
            raise SandboxSetupError("a spawn that joins cgroups must name the spawner's own to return to")
        request = json.dumps({
            "argv": list(argv), "env": dict(env or {}),
            "rlimits": [list(limit) for limit in setup.rlimits], "tasks": list(setup.join_tasks),
            "home_tasks": list(setup.home_tasks),
            "new_network": setup.new_network,
            "uid": None if setup.run_as is None else setup.run_as.uid,
            "gid": None if setup.run_as is None else setup.run_as.gid,
        }).encode()
        with self._lock:
            sock = self._connected()
            try:
                sock.sendmsg([_LENGTH.pack(len(request)) + request],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                answer, pidfd = _receive(sock)
            except OSError as e:
                self._forget()
                raise SandboxSetupError(f"the sandbox spawner failed: {e}") from e
        if "error" in answer or pidfd is None:
            if pidfd is not None:
                os.close(pidfd)
            raise SandboxSetupError(f"the sandbox spawner could not start {argv[0]}: {answer.get('error')}")
        pid = answer.get("pid")
        if not isinstance(pid, int):
            os.close(pidfd)
            raise SandboxSetupError(f"the sandbox spawner answered {answer!r}")
        return SpawnedProcess(pid, pidfd)

    def close(self) -> None:
        """Stop the spawner (it exits at EOF). Sandboxes still running die with it."""
        with self._lock:
            self._forget()

    def _connected(self) -> socket.socket:
        if self._socket is not None and self._process is not None:
            status = self._process.poll()
            if status is None:
                return self._socket
            # Every sandbox it had started died with it: say so where operators look.
            log.warning("the sandbox spawner (pid %d) exited with status %d; starting a new one",
                        self._process.pid, status)
        self._forget()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", _PROGRAM, str(theirs.fileno())],
                # This very interpreter, found through the kernel's link rather than its path:
                # a path another uid made (a venv's link into a home directory the worker
                # cannot search) may not be executable by the worker's own uid.
                executable="/proc/self/exe",
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env={}, cwd="/",
                start_new_session=True,  # the worker's terminal signals are the worker's
            )
        except OSError as e:
            ours.close()
            raise SandboxSetupError(f"cannot start the sandbox spawner: {e}") from e
        finally:
            theirs.close()
        self._socket = ours
        return ours

    def _forget(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


def _receive(sock: socket.socket) -> tuple[dict[str, object], int | None]:
    pidfd: int | None = None
    head = b""
    while len(head) < _LENGTH.size:
        data, ancillary, _flags, _ = sock.recvmsg(
            _LENGTH.size - len(head), socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(payload) >= 4:
                pidfd = struct.unpack("i", payload[:4])[0]
        if not data:
            raise ConnectionResetError("the spawner closed its socket")
        head += data
    (length,) = _LENGTH.unpack(head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise ConnectionResetError("the spawner closed its socket mid-answer")
        body += chunk
    answer = json.loads(body)
    if not isinstance(answer, dict):
        raise ConnectionResetError(f"the spawner answered {answer!r}")
    return answer, pidfd
