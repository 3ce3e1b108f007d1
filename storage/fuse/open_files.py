"""The open input files of the FUSE mount: one descriptor per blob, and a quota per action.

Every ``open`` of an input by an action is a file handle of the mount; what a handle costs
the worker, and who may have how many, is decided here:

* **One descriptor per blob**, shared by every handle on it and closed when the last one
  is released. Contents are immutable, so one descriptor serves every reader (``pread``
  has no shared offset). The worker's descriptors are therefore bounded by the distinct
  blobs actions hold open, not by how often they open them.
* **A quota per action** (``per_action``): the handles one action may hold at once. Past
  it, that action's ``open`` fails with EMFILE — what a process expects when it has too
  many files open — and no other action notices. Without it, one action opening a few
  thousand inputs exhausted the worker's RLIMIT_NOFILE and failed every action.

Who "an action" is: the opener's pid namespace. FUSE tells the daemon the pid of the
calling thread (in the daemon's namespace, also through an overlay, which opens the lower
file in the caller's context); every sandbox has a pid namespace of its own, so the
namespace's inode number (``/proc/<pid>/ns/pid``, one ``stat``) names the action without
anyone registering anything. An opener that cannot be identified (the kernel itself, a
thread gone meanwhile) is counted under ``None``, which has no quota: it cannot be a
sandbox's process flooding the mount, since those are alive while they wait on ``open``.

Thread-safety: none of its own; the inode table's lock guards it (see :mod:`.inodes`).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass

#: Who opened a file: the inode number of the opener's pid namespace, or None (no quota).
Opener = int | None


class QuotaExceeded(Exception):
    """The opener holds its whole quota of open files already (EMFILE for it)."""


def opener_of(pid: int) -> Opener:
    """The opener's identity for the quota (module docstring)."""
    if pid <= 0:
        return None
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


@dataclass(slots=True)
class _Blob:
    fd: int
    handles: int = 0
    backing: int | None = None  # the kernel's passthrough id for fd (see ``close_backing``)


class OpenFiles:
    """Handles and the descriptors behind them (module docstring). ``per_action`` is the
    quota; ``None`` for none."""

    def __init__(self, per_action: int | None = None) -> None:
        self.per_action = per_action
        self._blobs: dict[Hashable, _Blob] = {}
        self._handles: dict[int, tuple[Hashable, Opener]] = {}
        self._held: Counter[Opener] = Counter()
        self._next_handle = 1
        #: Closes a backing id registered with the kernel for a blob's descriptor (the
        #: /dev/fuse backend's passthrough), called as the descriptor closes.
        self.close_backing: Callable[[int], None] | None = None

    def check(self, opener: Opener) -> None:
        """Raise QuotaExceeded if ``opener`` may open nothing more."""
        if opener is not None and self.per_action is not None and self._held[opener] >= self.per_action:
            raise QuotaExceeded(f"{self._held[opener]} files open")

    def share(self, blob: Hashable, opener: Opener) -> int | None:
        """A new handle on ``blob`` if a descriptor of it is open already, else ``None`` (the
        caller opens one and calls :meth:`add`). Raises QuotaExceeded."""
        self.check(opener)
        if blob not in self._blobs:
            return None
        return self._new_handle(blob, opener)

    def add(self, blob: Hashable, fd: int, opener: Opener) -> int:
        """A new handle on ``blob`` with ``fd`` just opened for it; this object owns ``fd``
        from now on (closed at once if a descriptor of the blob was opened meanwhile, or if
        the opener went over its quota meanwhile: QuotaExceeded)."""
        try:
            self.check(opener)
        except QuotaExceeded:
            _close_quietly(fd)
            raise
        if blob in self._blobs:
            _close_quietly(fd)
        else:
            self._blobs[blob] = _Blob(fd)
        return self._new_handle(blob, opener)

    def descriptor(self, handle: int) -> int | None:
        entry = self._handles.get(handle)
        return None if entry is None else self._blobs[entry[0]].fd

    def backing(self, handle: int) -> int | None:
        """The backing id recorded for ``handle``'s blob (None: none recorded yet)."""
        entry = self._handles.get(handle)
        return None if entry is None else self._blobs[entry[0]].backing

    def set_backing(self, handle: int, backing: int) -> None:
        """Record the backing id of ``handle``'s blob (a negative one: passthrough refused
        for it): every handle on the blob shares it until the descriptor closes."""
        self._blobs[self._handles[handle][0]].backing = backing

    def release(self, handle: int) -> None:
        """Drop ``handle``; the blob's descriptor is closed with its last handle."""
        entry = self._handles.pop(handle, None)
        if entry is None:
            return
        blob_key, opener = entry
        self._held[opener] -= 1
        if self._held[opener] <= 0:
            del self._held[opener]
        blob = self._blobs[blob_key]
        blob.handles -= 1
        if blob.handles == 0:
            del self._blobs[blob_key]
            self._close(blob)

    @property
    def handles(self) -> int:
        return len(self._handles)

    @property
    def descriptors(self) -> int:
        return len(self._blobs)

    def close_all(self) -> None:
        for blob in self._blobs.values():
            self._close(blob)
        self._blobs.clear()
        self._handles.clear()
        self._held.clear()

    def _close(self, blob: _Blob) -> None:
        if blob.backing is not None and blob.backing >= 0 and self.close_backing is not None:
            self.close_backing(blob.backing)
        _close_quietly(blob.fd)

    def _new_handle(self, blob: Hashable, opener: Opener) -> int:
        handle = self._next_handle
        self._next_handle += 1
        self._handles[handle] = (blob, opener)
        self._blobs[blob].handles += 1
        self._held[opener] += 1
        return handle


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
