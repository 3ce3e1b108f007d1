"""A prepared, read-only ``/etc`` for HOST_TOOLS sandboxes: one bind per sandbox, not ~30.

Why: bubblewrap reads ``/proc/self/mountinfo`` and remounts for every bind it makes, so the
~30 allowed entries of ``/etc`` (:mod:`.host_etc`), each bound on its own, were ~2 ms of a
~10 ms sandbox start (``bench/bench_sandbox.py``; without any of them: the same start minus
2.2 ms, and with this view: within noise of that). A view assembled once by the worker — a
small tmpfs holding a bind mount of each allowed entry — is bound as one tree instead.

Layout, per process (root only; the sandbox's uid needs only to traverse it)::

    /run/reapi-worker/etc-views/          0711
        .owners/<token>                   flock-held by the live process, for its life
        <token>/                          bound onto itself and made private: nothing
                                          mounted below propagates to other namespaces
            <generation>/                 a tmpfs named "reapi-etc", read-only once filled
                passwd, ssl, ...          read-only bind mounts of the host's entries
                localtime -> /usr/...     a host symlink, recreated as the same symlink, so
                                          it resolves inside as it does on the host

**It follows the host.** Before every sandbox start the allowed names of ``/etc`` are listed
and ``lstat``-ed (~0.1 ms) and compared with what the current generation was built from. An
entry rewritten in place is seen live through its bind (same inode); one replaced — DHCP
renaming a new ``resolv.conf`` over the old, a mount on it —, added or removed makes a new
generation, which this and later starts bind: no start ever gets a stale entry. Each entry
is opened ``O_PATH|O_NOFOLLOW`` and checked against the listing before it is bound from that
descriptor, so a symlink swapped in meanwhile is never followed out of ``/etc``. An old
generation is unmounted once no start holds it (a running sandbox has its own copy of the
mounts in its namespace; the count protects starts that have not bound it yet).

**Never writable by the sandbox**: bound with ``--ro-bind`` (bubblewrap remounts it and every
mount below read-only), and already read-only here; in the sandbox's user namespace those
read-only flags are locked. **No worker path**: each generation is a tmpfs of its own, so
the sandbox's mountinfo shows its root as ``/`` (source ``reapi-etc``), and each entry as the
host's ``/etc/<name>``, as binding the entries one by one did.

**After a crash**: a view's owner file is created and locked before its directory exists.
The first view of a process sweeps the directories (and owner files) whose owner file it can
lock — the kernel drops a flock when its process dies, in any pid namespace — detaching
every mount at or below them, then removing the emptied directories with ``rmdir`` only,
and only when no mount is left (never a recursive delete, which could reach through a mount
into the host's ``/etc``). Why not the pid in the name, as the cgroup sweep does: a worker
that is PID 1 of its own pid namespace (a container; ``tests/system/test_tenant_isolation.py``
runs one) sees none of the host's pids, took a live view for a dead one and removed it —
and an ``rmdir`` of a mount point detaches the mounts on it in *every* namespace. (The same
scheme as the build root's and the local CAS's owners: ``host/owner_locks.py``.)
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import stat
import threading
from collections.abc import Iterator

from reapi_worker.host.mounts import (
    MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, MS_REMOUNT, detach_all_under, mount,
)
from reapi_worker.host.owner_locks import become_owner, lock_if_dead

from .errors import SandboxSetupError
from .host_etc import EtcEntry, allow_pattern, scan_etc

log = logging.getLogger(__name__)

#: Where each process keeps its views.
DEFAULT_BASE = "/run/reapi-worker/etc-views"
#: The tmpfs source name a sandbox sees in its mountinfo for /etc.
TMPFS_SOURCE = "reapi-etc"

_OWNERS = ".owners"
_swept: set[str] = set()
_shared: dict[tuple[str, tuple[str, ...], str], "EtcView"] = {}
_shared_lock = threading.Lock()


class EtcView:
    """This process's view of the host's ``/etc`` entries that ``allow`` names (see the
    module docstring). Raises SandboxSetupError if it cannot be set up (needs root).
    Thread-safe."""

    def __init__(self, allow: tuple[str, ...], etc: str = "/etc", base: str = DEFAULT_BASE) -> None:
        self._pattern = allow_pattern(allow)
        self._etc = etc
        self._lock = threading.Lock()
        self._current: _Generation | None = None
        self._generations = itertools.count(1)
        self._closed = False
        self._pid = os.getpid()  # a forked child's exit must not unmount its parent's view
        try:
            os.makedirs(os.path.join(base, _OWNERS), mode=0o711, exist_ok=True)
            if base not in _swept:
                _swept.add(base)
                sweep_dead_views(base)
            token, self._owner_fd = become_owner(os.path.join(base, _OWNERS), str(os.getpid()))
        except OSError as e:
            raise SandboxSetupError(f"cannot set up the sandbox's /etc view under {base}: {e}") from e
        self._owner = os.path.join(base, _OWNERS, token)
        self.path = os.path.join(base, token)
        try:
            os.mkdir(self.path, 0o711)
            mount(self.path, self.path, None, MS_BIND)
            mount(None, self.path, None, MS_PRIVATE)
        except OSError as e:
            self._closed = True
            if _detach_all_under(self.path) and _remove_dirs(self.path):
                os.unlink(self._owner)
            os.close(self._owner_fd)
            raise SandboxSetupError(f"cannot set up the sandbox's /etc view under {base}: {e}") from e

    @contextlib.contextmanager
    def acquire(self) -> Iterator[str]:
        """The path of a view that matches the host's ``/etc`` now; it stays mounted until
        the block ends. Raises SandboxSetupError if a new generation cannot be made."""
        with self._lock:
            if self._closed:
                raise SandboxSetupError("the sandbox's /etc view is closed")
            generation = self._up_to_date()
            generation.users += 1
        try:
            yield generation.path
        finally:
            with self._lock:
                generation.users -= 1
                if generation is not self._current:
                    self._retire(generation)

    def close(self) -> None:
        """Unmount every generation and remove the directories. Idempotent."""
        with self._lock:
            if self._closed or os.getpid() != self._pid:
                return
            self._closed = True
            self._current = None
            if _detach_all_under(self.path) and _remove_dirs(self.path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._owner)
            os.close(self._owner_fd)

    def _up_to_date(self) -> "_Generation":
        for _attempt in range(3):
            entries = scan_etc(self._pattern, self._etc)
            current = self._current
            if current is not None and current.entries == entries:
                return current
            try:
                fresh = self._build(entries)
            except _Changed:
                continue  # /etc changed while we built: list it again
            self._current = fresh
            if current is not None:
                self._retire(current)
            return fresh
        raise SandboxSetupError(f"{self._etc} kept changing while the sandbox's view of it was made")

    def _build(self, entries: tuple[EtcEntry, ...]) -> "_Generation":
        path = os.path.join(self.path, str(next(self._generations)))
        try:
            os.mkdir(path, 0o755)
            mount(TMPFS_SOURCE, path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k,nr_inodes=4096")
        except OSError as e:
            _remove_dirs(path)
            raise SandboxSetupError(f"cannot make the sandbox's /etc view {path}: {e}") from e
        try:
            for entry in entries:
                _add(entry, self._etc, path)
            # The tmpfs itself: nothing can be added to it any more.
            mount(None, path, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except BaseException as e:
            if _detach_all_under(path):
                _remove_dirs(path)
            if isinstance(e, OSError):
                raise SandboxSetupError(f"cannot make the sandbox's /etc view {path}: {e}") from e
            raise
        return _Generation(path, entries)

    def _retire(self, generation: "_Generation") -> None:
        if generation.users == 0 and not generation.retired:
            generation.retired = True
            if _detach_all_under(generation.path):
                _remove_dirs(generation.path)


class _Generation:
    def __init__(self, path: str, entries: tuple[EtcEntry, ...]) -> None:
        self.path = path
        self.entries = entries
        self.users = 0
        self.retired = False


class _Changed(Exception):
    """An entry is not what the listing said any more."""


def _add(entry: EtcEntry, etc: str, view: str) -> None:
    target = os.path.join(view, entry.name)
    if entry.target is not None:
        os.symlink(entry.target, target)
        return
    try:
        fd = os.open(os.path.join(etc, entry.name), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise _Changed() from e
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, stat.S_ISDIR(st.st_mode)) != (entry.dev, entry.ino, entry.is_dir):
            raise _Changed()
        if entry.is_dir:
            os.mkdir(target, 0o755)
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    finally:
        os.close(fd)


def shared_etc_view(allow: tuple[str, ...], etc: str = "/etc", base: str | None = None) -> EtcView:
    """The one view of this process for ``allow`` (made on first use, closed at exit), so
    that every runner of a process — the worker's, a test's — shares its mounts. ``base``:
    :data:`DEFAULT_BASE` unless given."""
    base = DEFAULT_BASE if base is None else base
    key = (base, tuple(allow), etc)
    with _shared_lock:
        view = _shared.get(key)
        if view is None:
            view = _shared[key] = EtcView(allow, etc, base)
            atexit.register(view.close)
        return view


def sweep_dead_views(base: str) -> list[str]:
    """Remove the views whose owner file is not locked any more: their process is gone.
    Returns the directories removed."""
    owners = os.path.join(base, _OWNERS)
    names = [n for n in os.listdir(base) if n != _OWNERS]  # listed before the locks are tried
    swept = []
    for token in sorted(set(names) | set(os.listdir(owners))):
        fd = lock_if_dead(os.path.join(owners, token))
        if fd is None:
            continue
        try:
            path = os.path.join(base, token)
            if os.path.lexists(path):
                if not (_detach_all_under(path) and _remove_dirs(path)):
                    continue  # left, with its owner file, for a later sweep
                swept.append(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(owners, token))
        finally:
            if fd >= 0:
                os.close(fd)
    if swept:
        log.warning("swept the /etc views of dead workers: %s", ", ".join(swept))
    return swept


def _detach_all_under(path: str) -> bool:
    """Lazily unmount every mount at or below ``path``. Whether none is left; an error is
    logged, and what is left the next sweep finds."""
    try:
        detach_all_under(path)
        return True
    except OSError as e:
        log.error("cannot unmount %s: %s", e.filename, e.strerror)
        return False


def _remove_dirs(path: str) -> bool:
    """``rmdir`` the directories directly in ``path`` (generations' mount points, empty once
    unmounted), then ``path``; never anything deeper, nor a file. Whether ``path`` is gone."""
    try:
        for name in os.listdir(path):
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(path, name))
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError as e:
        log.error("leaving %s: %s", path, e)
        return False
