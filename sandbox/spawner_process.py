"""The sandbox spawner's own program: a small, single-threaded process that starts sandboxes.

Run by :class:`~.spawner.Spawner` as ``python -I -S spawner_process.py FD``, never imported.
It uses the standard library only (``-S``: no site, so no third-party module), and it is
single-threaded, which is what lets it change its own credentials, cgroups and network
namespace for a moment (see :mod:`.spawner` for why it exists).

Protocol on the stream socket FD, one request at a time:

* request: 4-byte little-endian length, then that many bytes of JSON ``{"argv", "env",
  "rlimits": [[resource, value]], "tasks": [path], "home_tasks": [path], "new_network":
  bool, "uid", "gid"}``; the descriptors the child gets as 0, 1, 2, 3... ride as SCM_RIGHTS
  on the first bytes, in that order;
* reply: 4-byte length, JSON ``{"pid": N}`` with a pidfd of the child as SCM_RIGHTS, or
  ``{"error": "..."}`` when no child was made (nothing ran then).

One spawn, and why in this order. The child is made by ``posix_spawn`` — glibc's
``vfork``-like clone, about twice as fast as a Python ``fork`` + exec, whose copy-on-write
faults and address-space teardown cost more than the exec itself — so it can run no code of
ours. Everything it must start with, it inherits from this process, set for the moment:

1. this process writes ``0`` — "the calling thread" — into each cgroup ``tasks`` file of the
   action, so the child is born inside (why a thread move: :mod:`.limits`);
2. with ``new_network``, it enters a fresh network namespace (as root);
3. its *real* (and saved) uid/gid become the sandbox's, its effective ones stay root's;
4. ``posix_spawn`` with ``resetids`` (the child's effective ids := the real ones, so it
   runs as the sandbox's uid, with no capability and no supplementary group: this process
   has none), ``setsid``, default dispositions for the signals Python ignores, and the
   descriptors moved into place; the child execs straight away and waits for its options;
5. the rlimits are set on the child with ``prlimit``: lowering another process's limits
   needs no capability when the caller's *real* ids are the child's (this worker lacks
   CAP_SYS_RESOURCE); the child cannot fork before the worker has sent its options, so it
   is bounded before anything of the action runs;
6. real ids back to root, the home network namespace and the home cgroups.

If this process cannot get back to where it was, it exits (the worker starts a new one): a
spawner left in an action's cgroup or namespace must never make the next child.

Children are reaped here (this process is a child subreaper, so orphaned sandbox inits come
here too). A pidfd is opened before any reaping can happen, so the pid it names is never a
reused one. At EOF on FD — the worker is gone — the spawner exits, and bubblewrap's
``--die-with-parent`` takes every sandbox with it.
"""

import ctypes
import fcntl
import json
import os
import resource
import select
import signal
import socket
import struct
import sys

_LENGTH = struct.Struct("<I")
_MAX_FDS = 16
_CLONE_NEWNET = 0x40000000
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)
#: Ignored by Python (an ignored signal stays ignored across exec): default in the child.
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT)
_HOME_NETWORK = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.set_inheritable(False)
    if _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit(f"reapi-worker spawner: prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
    if os.geteuid() == 0:
        os.setgroups([])  # the children inherit them (posix_spawn's resetids keeps groups)
    # SIGCHLD wakes the loop through a pipe; the handler itself does nothing.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
            _reap_all()
        if sock.fileno() in ready:
            request = _receive(sock)
            if request is None:
                return  # EOF: the worker is gone
            message, fds = request
            try:
                _reply(sock, *_spawn(message, fds))
            finally:
                for fd in fds:
                    os.close(fd)
        _reap_all()


def _receive(sock: socket.socket) -> tuple[dict, list[int]] | None:
    fds: list[int] = []
    head = b""
    while len(head) < _LENGTH.size:
        data, ancillary, _flags, _ = sock.recvmsg(
            _LENGTH.size - len(head), socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]))
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        head += data
    (length,) = _LENGTH.unpack(head)
    body = bytearray()
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            return None
        body += chunk
    return json.loads(body), fds


def _reply(sock: socket.socket, answer: dict, pidfd: int | None) -> None:
    data = json.dumps(answer).encode()
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", pidfd))] if pidfd is not None else []
    try:
        sock.sendmsg([_LENGTH.pack(len(data)) + data], ancillary)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _spawn(request: dict, fds: list[int]) -> tuple[dict, int | None]:
    try:
        pid = _spawn_as_asked(request, fds)
    except OSError as e:
        return {"error": str(e)}, None
    # Not reaped yet (only the loop reaps), so the pid is still this child's.
    return {"pid": pid}, os.pidfd_open(pid)


def _spawn_as_asked(request: dict, received: list[int]) -> int:
    """Steps 1–6 of the module docstring; raises OSError (nothing spawned) for a step that
    fails, and exits the process if it cannot undo one."""
    # Above every target first, so that no dup2 of the child overwrites a descriptor still
    # to move (the child's dup2 of a descriptor onto its own number would also keep it
    # close-on-exec).
    fds = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, len(received)) for fd in received]
    try:
        return _spawn_with(request, fds)
    finally:
        for fd in fds:
            os.close(fd)


def _spawn_with(request: dict, fds: list[int]) -> int:
    switch = request["uid"] is not None  # the worker sends uid and gid together
    to_undo: set[str] = set()  # marked before each step: undoing a step not done is harmless
    try:
        if request["tasks"]:
            to_undo.add("cgroups")
            for tasks in request["tasks"]:
                _write_zero(tasks, "join cgroup")
        if request["new_network"]:
            to_undo.add("network")
            _check(_libc.unshare(_CLONE_NEWNET), "make a network namespace")
        if switch:
            to_undo.add("ids")
            # Saved ids too: the kernel lets posix_spawn return once the child's exec has
            # replaced its memory, before it commits the new credentials (saved := effective),
            # and prlimit wants the child's real, effective *and* saved ids to be our real
            # ones. With an effective uid of 0 this process keeps its capabilities, so it can
            # still go back.
            os.setresgid(request["gid"], 0, request["gid"])
            os.setresuid(request["uid"], 0, request["uid"])
        pid = os.posix_spawn(
            request["argv"][0], request["argv"], request["env"],
            file_actions=[(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)],
            setsid=True, setsigdef=_DEFAULT_SIGNALS, resetids=switch,
        )
        try:
            for number, value in request["rlimits"]:
                resource.prlimit(pid, number, (value, value))
        except OSError:
            os.kill(pid, signal.SIGKILL)  # blocked on its options: it has run nothing
            raise
        return pid
    finally:
        _go_home(to_undo, request["home_tasks"])


def _go_home(to_undo: set[str], home_tasks: list[str]) -> None:
    try:
        if "ids" in to_undo:
            os.setresuid(0, 0, 0)
            os.setresgid(0, 0, 0)
        if "network" in to_undo:
            _check(_libc.setns(_HOME_NETWORK, _CLONE_NEWNET), "return to its network namespace")
        if "cgroups" in to_undo:
            for tasks in home_tasks:
                _write_zero(tasks, "return to cgroup")
    except OSError as e:
        sys.exit(f"reapi-worker spawner: cannot undo a spawn's set-up, exiting: {e}")


def _write_zero(tasks: str, what: str) -> None:
    try:
        fd = os.open(tasks, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    except OSError as e:
        raise OSError(e.errno, f"cannot {what} {tasks}: {e.strerror}") from e


def _check(result: int, what: str) -> None:
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"cannot {what}: {os.strerror(number)}")


def _reap_all() -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


if __name__ == "__main__":
    main()
