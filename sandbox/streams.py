"""The command's stdout and stderr: files the worker opened, and optionally a bound on each.

Without a bound the command writes straight into the files (nothing to copy, nothing to
watch). With one, it writes into a pipe per stream, and the runner moves the bytes into the
file with ``splice`` (kernel to kernel, no copy through Python) from the same ``poll`` loop
that waits for the command to end. Why a pipe and not RLIMIT_FSIZE on the file: FSIZE
would bound every file the action writes, and turns the excess into ``SIGXFSZ``/``EFBIG``
for the command to interpret; a pipe bounds exactly this stream, and the worker decides:

* past the bound, the file keeps exactly the first ``stream_bytes`` bytes, the runner kills
  the action (an action that floods its log is broken, and waiting for it to finish would
  only burn time and disk), and the result names the bound (``"stream_bytes"``);
* a write error of the worker's own file (its disk is full) is the worker's fault, raised
  as the worker's own storage error (ResourceExhausted for a full disk, else Internal):
  never passed off as the action's result, and never as a sandbox set-up failure, which
  could be blamed on the action.

What the command sees differs only in ``fstat`` of its stdout: a pipe, not a file. Tools
buffer a pipe as they buffer a file (both are not a terminal). The same path for both
streams (``2>&1``) is one pipe and one bound, named stdout.

Not thread-safe: one run's loop uses it.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass

from reapi_worker.protos.errors import from_os_error
from .request import SandboxRequest

#: Most bytes moved by one ``splice`` (a pipe holds 64 KiB by default).
_CHUNK = 1 << 16
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC


@dataclass(slots=True)
class _Stream:
    name: str
    file_fd: int
    reader: int | None = None  # the pipe's read end (bounded streams only)
    written: int = 0
    done: bool = False


class OutputStreams:
    """stdout/stderr of one run (see the module docstring). Owns every descriptor it opens;
    :meth:`close` releases them (idempotent). ``child_fds`` go to the spawned process; the
    runner calls :meth:`child_started` once it has them, so that EOF means what it says."""

    def __init__(self, request: SandboxRequest) -> None:
        self.bound = request.limits.stream_bytes
        self.exceeded = False
        self._streams: list[_Stream] = []
        self._child: list[int] = []
        try:
            paths = [("stdout", request.stdout_path)]
            if request.stderr_path != request.stdout_path:
                paths.append(("stderr", request.stderr_path))
            for name, path in paths:
                self._streams.append(_Stream(name, os.open(path, _FILE_FLAGS, 0o644)))
            for stream in self._streams:
                if self.bound is None:
                    self._child.append(os.dup(stream.file_fd))
                else:
                    reader, writer = os.pipe()  # O_CLOEXEC: no concurrent spawn inherits them
                    stream.reader = reader
                    self._child.append(writer)
                    os.set_blocking(reader, False)  # only this end: the writer's stays blocking
        except OSError as e:
            self.close()
            raise from_os_error(e, "creating the action's output file", own_file=True) from e

    @property
    def child_fds(self) -> tuple[int, int]:
        """(stdout, stderr) for the child; the same descriptor twice for ``2>&1``."""
        return self._child[0], self._child[-1]

    def child_started(self) -> None:
        """The child holds its ends now: drop the worker's copies."""
        for fd in self._child:
            _close_quietly(fd)
        self._child.clear()

    @property
    def readers(self) -> list[int]:
        """The pipe ends still to be read (empty without a bound)."""
        return [s.reader for s in self._streams if s.reader is not None and not s.done]

    def pump(self, reader: int) -> None:
        """Move what the pipe ``reader`` holds into its file, without blocking. Sets
        :attr:`exceeded` when the command wrote past the bound."""
        stream = next(s for s in self._streams if s.reader == reader)
        assert self.bound is not None
        while not stream.done:
            room = self.bound - stream.written
            try:
                if room == 0:
                    # Full: one more byte means the command went past the bound.
                    if os.read(reader, 1):
                        self.exceeded = True
                    stream.done = True  # nothing more is kept either way
                    return
                moved = os.splice(reader, stream.file_fd, min(room, _CHUNK))
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EPIPE:
                    return
                raise from_os_error(e, f"writing the action's {stream.name}", own_file=True) from e
            if moved == 0:
                stream.done = True  # EOF: every writer has exited
                return
            stream.written += moved

    def drain(self) -> None:
        """After the sandbox is gone (no writer is left): move what remains."""
        for reader in self.readers:
            self.pump(reader)

    def close(self) -> None:
        self.child_started()
        for stream in self._streams:
            for fd in (stream.file_fd, stream.reader):
                if fd is not None:
                    _close_quietly(fd)
        self._streams.clear()

    def __enter__(self) -> "OutputStreams":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
