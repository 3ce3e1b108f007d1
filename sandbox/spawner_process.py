"""The sandbox spawner's own program: a small, single-threaded process that forks sandboxes.

Run by :class:`~.spawner.Spawner` as ``python -I -S spawner_process.py FD``, never imported.
It uses the standard library only (``-S``: no site, so no third-party module and a small
heap), which keeps each ``fork`` cheap — the reason it exists (see :mod:`.spawner`).

Protocol on the stream socket FD, one request at a time:

* request: 4-byte little-endian length, then that many bytes of JSON ``{"argv", "env",
  "cwd", "rlimits": [[resource, value]], "tasks": [path], "new_network": bool, "uid",
  "gid"}``; the descriptors the child gets as 0, 1, 2, 3... ride as SCM_RIGHTS on the first
  bytes, in that order;
* reply: 4-byte length, JSON ``{"pid": N}`` with a pidfd of the child as SCM_RIGHTS, or
  ``{"error": "..."}`` when no child was made.

The child, in this order: own session; descriptors in place; rlimits (soft = hard); each
cgroup ``tasks`` file gets ``0``, "the calling thread" (single-threaded, so the whole
process; see :mod:`.limits` for why not the pid into ``cgroup.procs``); with
``new_network``, a network namespace of its own (as root, before the switch); then no
supplementary groups, gid, uid; ``chdir``; signal dispositions back to the defaults; exec.
A step that fails writes one line to the child's stderr (the action's stderr file, which
the runner reads to explain a failed start) and exits 125 — the argv never runs.

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
_EXIT_SETUP_FAILED = 125
_libc = ctypes.CDLL(None, use_errno=True)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.set_inheritable(False)
    if _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit(f"reapi-worker spawner: prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
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
        pid = os.fork()
    except OSError as e:
        return {"error": f"fork: {e}"}, None
    if pid == 0:
        _child(request, fds)  # never returns
    # Not reaped yet (only this loop reaps), so the pid is still this child's.
    return {"pid": pid}, os.pidfd_open(pid)


def _child(request: dict, fds: list[int]) -> None:
    step = "set up its descriptors"
    try:
        os.setsid()
        # Above every target first, so that no dup2 below overwrites a descriptor still to move.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, len(fds)) for fd in fds]
        for target, fd in enumerate(high):
            os.dup2(fd, target)  # inheritable; everything else is close-on-exec
        step = "set its resource limits"
        for number, value in request["rlimits"]:
            resource.setrlimit(number, (value, value))
        for tasks in request["tasks"]:
            step = f"join cgroup {tasks}"
            fd = os.open(tasks, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        if request["new_network"]:
            step = "make its network namespace"
            if _libc.unshare(_CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        if request["uid"] is not None:
            step = f"switch to {request['uid']}:{request['gid']}"
            os.setgroups([])
            os.setresgid(request["gid"], request["gid"], request["gid"])
            os.setresuid(request["uid"], request["uid"], request["uid"])
        step = f"enter {request['cwd']}"
        os.chdir(request["cwd"])
        # Python ignores these; an ignored signal stays ignored across exec.
        for number in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGINT):
            signal.signal(number, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        step = f"exec {request['argv'][0]}"
        os.execve(request["argv"][0], request["argv"], request["env"])
    except BaseException as e:  # noqa: BLE001 — nothing may return into the spawner's loop
        try:
            os.write(2, f"reapi-worker sandbox: cannot {step}: {e}\n".encode(errors="replace"))
        finally:
            os._exit(_EXIT_SETUP_FAILED)


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
