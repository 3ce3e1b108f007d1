"""Per-action cgroups, v2 and v1, behind :class:`~.limits.ResourceController`.

Both versions follow one life cycle per action: create a cgroup named ``<worker pid>-<n>``
under a ``reapi-worker`` directory below the worker's *own* cgroup (so a worker confined by
its host never reaches outside its subtree, and two workers never collide), write the
limits, put the spawned process in it before it can fork (v1: the spawned process joins
itself; v2: :meth:`~.limits.Confinement.join` from the worker), read the figures, kill what
is left, remove it.

Where things are found: ``/proc/self/mountinfo`` gives each hierarchy's mount point and the
cgroup path its mount shows as ``/``; ``/proc/self/cgroup`` gives the worker's cgroup per
hierarchy. On this machine kind (v1), memory is ``/process_api/<id>`` and the others ``/``.

v2 (one hierarchy): ``memory.max``, ``memory.swap.max`` (0, so the limit is not escaped by
swapping), ``pids.max``, ``cpu.max``; OOM kills from ``memory.events``; kill through
``cgroup.kill`` (Linux 5.14+). Because of v2's "no internal processes" rule, the directory
holding action cgroups can only enable controllers for them if it holds no process itself;
:meth:`CgroupV2Controller.from_self` therefore moves the worker into a leaf
``reapi-worker-supervisor`` of its own cgroup when needed (the usual delegation dance), and
gives up — falling back — if other processes share the worker's cgroup.

v1 (one hierarchy per controller, possibly co-mounted): ``memory.limit_in_bytes`` (+
``memory.memsw.limit_in_bytes`` where swap is accounted), ``pids.max``,
``cpu.cfs_quota_us``/``cpu.cfs_period_us``; OOM kills from ``oom_kill`` in
``memory.oom_control`` (Linux 4.13+); figures from ``memory.max_usage_in_bytes``,
``pids.peak``, ``cpuacct.usage{,_user,_sys}``; kill by listing ``cgroup.procs``.
"""

from __future__ import annotations

import abc
import errno
import itertools
import os
import resource
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from reapi_worker.host.mountinfo import MountEntry, parse_mountinfo

from .cgroup_spares import SpareCgroups
from .cgroup_sweep import note_own_cgroup, sweep_dead_action_cgroups
from .errors import SandboxSetupError
from .limits import SANDBOX_OWN_TASKS, Confinement, ResourceController
from .request import ResourceLimits
from .usage import CgroupUsage

#: The directory, below the worker's own cgroup, that holds one cgroup per action.
ACTIONS_DIR = "reapi-worker"
#: v2 only: the leaf the worker moves itself into so its cgroup can delegate controllers.
SUPERVISOR_LEAF = "reapi-worker-supervisor"
CPU_PERIOD_US = 100_000
#: How long to wait for killed processes to leave a cgroup before giving up on removing it.
KILL_GRACE_SECONDS = 2.0

_SEQUENCE = itertools.count(1)

def open_files_rlimit(open_files: int | None) -> tuple[tuple[int, int], ...]:
    """The spawned process's RLIMIT_NOFILE (soft and hard) for ``open_files``; none without."""
    return () if open_files is None else ((resource.RLIMIT_NOFILE, int(open_files)),)


def join_cgroups(procs_files: Iterable[Path], pid: int) -> None:
    """Write ``pid`` into each ``cgroup.procs``; raises SandboxSetupError naming the one that
    refused. The first write waits for an RCU grace period when the kernel's cgroup lock was
    idle (see :attr:`~.limits.Confinement.join_tasks`); the others do not."""
    for procs in procs_files:
        try:
            _write(procs, str(pid))
        except OSError as e:
            raise SandboxSetupError(f"cannot join cgroup {procs}: {e}") from e


def _pids_refused(pids_dir: Path | None) -> bool:
    """``pids.events``' ``max``: how many forks the limit refused (v1 and v2 alike)."""
    return pids_dir is not None and (_read_key(pids_dir / "pids.events", "max") or 0) > 0


# --- discovery -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupMount:
    """One mounted cgroup hierarchy: where, which cgroup it shows as its root, which controllers
    (empty for v2, whose controllers are per-cgroup)."""

    mount_point: str
    root: str
    version: int
    controllers: frozenset[str]


def cgroup_mounts(entries: Iterable[MountEntry]) -> list[CgroupMount]:
    """The cgroup hierarchies among the mounts ``entries`` (see :mod:`reapi_worker.host`)."""
    mounts = []
    for entry in entries:
        if entry.fstype == "cgroup2":
            mounts.append(CgroupMount(entry.mount_point, entry.root, 2, frozenset()))
        elif entry.fstype == "cgroup":
            controllers = frozenset(
                opt for opt in entry.super_options.split(",") if opt not in ("rw", "ro") and "=" not in opt
            )
            mounts.append(CgroupMount(entry.mount_point, entry.root, 1, controllers))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as controller -> path; the v2 entry under the key ``""``."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            paths[""] = path
        for controller in controllers.split(","):
            if controller and not controller.startswith("name="):
                paths[controller] = path
    return paths


def host_dir(mount: CgroupMount, cgroup_path: str) -> Path | None:
    """The directory of ``cgroup_path`` under ``mount``, or ``None`` if the mount cannot see it."""
    root = mount.root.rstrip("/") or "/"
    if root != "/" and cgroup_path != root and not cgroup_path.startswith(root + "/"):
        return None
    relative = cgroup_path[len(root):] if root != "/" else cgroup_path
    return Path(mount.mount_point, relative.lstrip("/"))


def _read_self(name: str) -> str:
    with open(f"/proc/self/{name}") as f:
        return f.read()


# --- file helpers ------------------------------------------------------------------------


def _write(path: Path, value: str) -> None:
    # O_CREAT is harmless on cgroupfs (the file exists) and lets a fake tree in tests work.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str | None:
    # Raw descriptors, not open(): a run reads ~10 of these files, and the io layers cost
    # three times the read itself (11 µs against 3 µs here).
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # absent on this kernel, or the cgroup is gone
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text.split()[0]) if text else None
    except ValueError:
        return None


def _read_key(path: Path, key: str) -> int | None:
    """The value of ``key`` in a flat-keyed cgroup file (``memory.events``, ``cpu.stat``...)."""
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _pids(procs: Path) -> list[int]:
    return [int(pid) for pid in (_read(procs) or "").split()]


def _kill_until_empty(procs_files: list[Path], kill_file: Path | None = None) -> bool:
    """SIGKILL everything listed in the ``cgroup.procs`` files until they are empty; whether
    they are.

    Returns at once when nothing is left (the normal case: the pid namespace is already
    gone). Otherwise waits with a short backoff, up to :data:`KILL_GRACE_SECONDS`.
    """
    deadline = time.monotonic() + KILL_GRACE_SECONDS
    delay = 0.0005
    killed_via_file = False
    while True:
        pids = sorted({pid for procs in procs_files for pid in _pids(procs)})
        if not pids:
            return True
        if kill_file is not None and not killed_via_file:
            try:
                _write(kill_file, "1")  # cgroup.kill: atomic, race-free against forks
                killed_via_file = True
            except OSError:
                kill_file = None
        if not killed_via_file:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _remove(path: Path, remove_dir: Callable[[Path], None]) -> None:
    deadline = time.monotonic() + KILL_GRACE_SECONDS
    delay = 0.0005
    while True:
        try:
            remove_dir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise SandboxSetupError(f"cannot remove cgroup {path}: {e}") from e
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _action_name() -> str:
    note_own_cgroup()
    return f"{os.getpid()}-{next(_SEQUENCE)}"


# --- what v1 and v2 share -------------------------------------------------------------------


@dataclass(frozen=True)
class _Bounds:
    """What of an action's limits its cgroups enforce: a spare prepared with equal bounds is
    ready to use as it is."""

    memory_bytes: int | None
    max_pids: int | None
    cpu_cores: float | None

    @classmethod
    def of(cls, limits: ResourceLimits) -> "_Bounds":
        return cls(limits.memory_bytes, limits.max_pids, limits.cpu_cores)


def _usable_spare(spares: SpareCgroups | None, bounds: _Bounds) -> tuple[str, bool] | None:
    """A spare for an action with ``bounds``: its name and whether its limits are written
    already (prepared for exactly these), or ``None``. One prepared for other bounds is
    removed: rewriting limits in place has ordering traps (memsw >= limit) and would leave
    a limit the action does not ask for."""
    taken = spares.take() if spares else None
    if taken is None or spares is None:
        return None
    name, prepared = taken
    if prepared is None or prepared == bounds:
        return name, prepared is not None
    spares.remove(name)
    return None


class _ActionCgroupController(ResourceController):
    """The life of an action's cgroups, whichever the version: take a spare made ahead
    (:mod:`.cgroup_spares`) whose prepared bounds fit, else make them now; write the limits
    unless the spare has them. Subclasses say how a set is made (:meth:`_make`), limited
    (:meth:`_write_limits`) and named in errors (:meth:`_where`), and whether a spare can be
    prepared for bounds (:meth:`_preparable`)."""

    def _keep_spares(self, parents: Iterable[Path], count: int, remove_dir: Callable[[Path], None]) -> None:
        """Start keeping ``count`` spares under ``parents`` (none for 0). Call it last in
        ``__init__``: the spares' thread prepares them from then on."""
        self._remove_dir = remove_dir
        self._last: _Bounds | None = None  # the cgroup bounds of the latest action
        parents = tuple(parents)
        #: cgroups made ahead of the actions, or ``None``
        self.spares = SpareCgroups(parents, _action_name, count, self._prepare, remove_dir) if count and parents else None

    def confine(self, limits: ResourceLimits) -> Confinement:
        bounds = self._last = _Bounds.of(limits)
        spare = _usable_spare(self.spares, bounds)
        name = spare[0] if spare else _action_name()
        try:
            confinement = self._make(name, bounds, limits.open_files, made_ahead=spare is not None)
        except OSError as e:
            raise SandboxSetupError(f"cannot create cgroup {self._where(name)}: {e}") from e
        if spare is None or not spare[1]:
            try:
                self._write_limits(confinement, bounds)
            except OSError as e:
                confinement.close()
                raise SandboxSetupError(f"cannot set limits on cgroup {self._where(name)}: {e}") from e
        return confinement

    def close(self) -> None:
        if self.spares is not None:
            self.spares.close()

    def _prepare(self, name: str) -> _Bounds | None:
        """Write the latest action's bounds into the spare ``name`` (the spares' thread)."""
        bounds = self._last
        if bounds is None or not self._preparable(bounds):
            return None
        self._write_limits(self._make(name, bounds, None, made_ahead=True), bounds)
        return bounds

    def _preparable(self, bounds: _Bounds) -> bool:
        return True

    @abc.abstractmethod
    def _make(self, name: str, bounds: _Bounds, open_files: int | None, made_ahead: bool) -> Confinement:
        """The confinement ``name`` for ``bounds``, its directories made unless ``made_ahead``
        (those of a spare); raises OSError, having removed what it made."""

    @abc.abstractmethod
    def _write_limits(self, confinement: Confinement, bounds: _Bounds) -> None:
        """Write ``bounds`` into the confinement's control files; raises OSError."""

    @abc.abstractmethod
    def _where(self, name: str) -> str:
        """How an error names the cgroup ``name``."""


# --- v2 ------------------------------------------------------------------------------------


class CgroupV2Confinement(Confinement):
    def __init__(self, path: Path, remove_dir: Callable[[Path], None], open_files: int | None = None) -> None:
        self.path = path
        self._remove_dir = remove_dir
        self._open_files = open_files
        self._closed = False
        self._emptied = False  # see kill_all

    @property
    def rlimits(self) -> tuple[tuple[int, int], ...]:
        return open_files_rlimit(self._open_files)

    def join(self, pid: int) -> None:
        # v2 has no per-thread ``tasks`` outside threaded subtrees, so the whole process is
        # moved (and the grace period paid) — from the worker, while bubblewrap starts.
        # CLONE_INTO_CGROUP would avoid it, but CPython's subprocess cannot clone3.
        join_cgroups([self.path / "cgroup.procs"], pid)

    def pids_exhausted(self) -> bool:
        return _pids_refused(self.path)

    def kill_all(self) -> None:
        # Listed only until once found empty (the runner calls this after the run and
        # ``close`` again): a process enters an action's cgroup only by the join, before
        # the spawned process can fork, or as a child of a member; every call comes after
        # the spawned process has joined or died, so an empty cgroup stays empty.
        if not self._emptied:
            self._emptied = _kill_until_empty([self.path / "cgroup.procs"], kill_file=self.path / "cgroup.kill")

    def oom_killed(self) -> bool:
        return (_read_key(self.path / "memory.events", "oom_kill") or 0) > 0

    def usage(self) -> CgroupUsage:
        cpu = {key: _read_key(self.path / "cpu.stat", key) for key in ("usage_usec", "user_usec", "system_usec")}
        seconds = {key: None if value is None else value / 1e6 for key, value in cpu.items()}
        return CgroupUsage(
            memory_peak_bytes=_read_int(self.path / "memory.peak"),
            pids_peak=_read_int(self.path / "pids.peak"),
            cpu_seconds=seconds["usage_usec"],
            user_cpu_seconds=seconds["user_usec"],
            system_cpu_seconds=seconds["system_usec"],
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.kill_all()
        _remove(self.path, self._remove_dir)


class CgroupV2Controller(_ActionCgroupController):
    """Action cgroups under ``parent``, a v2 cgroup that holds no process and delegates
    ``controllers`` to its children (see :meth:`from_self`). ``remove_dir`` exists for tests
    on a fake tree."""

    kind = "cgroup-v2"

    def __init__(
        self, parent: Path, controllers: frozenset[str], remove_dir: Callable[[Path], None] = os.rmdir,
        spares: int = 0,
    ) -> None:
        self.parent = parent
        self.enforces = frozenset(controllers & {"memory", "pids", "cpu"})
        self._keep_spares([parent], spares, remove_dir)

    @classmethod
    def from_self(
        cls,
        mounts: list[CgroupMount] | None = None,
        own: Mapping[str, str] | None = None,
        remove_dir: Callable[[Path], None] = os.rmdir,
        spares: int = 0,
    ) -> "CgroupV2Controller":
        """Set up below the worker's own v2 cgroup; raises SandboxSetupError if it cannot.
        ``spares``: cgroups kept made ahead of the actions (:mod:`.cgroup_spares`)."""
        mounts = cgroup_mounts(parse_mountinfo(_read_self("mountinfo"))) if mounts is None else mounts
        own = parse_proc_cgroup(_read_self("cgroup")) if own is None else own
        if "" not in own:
            raise SandboxSetupError("the worker is in no cgroup v2 hierarchy")
        base = next((d for m in mounts if m.version == 2 for d in [host_dir(m, own[""])] if d), None)
        if base is None:
            raise SandboxSetupError("no cgroup v2 mount shows the worker's cgroup")
        available = set((_read(base / "cgroup.controllers") or "").split())
        wanted = {"memory", "pids", "cpu"} & available
        if not {"memory", "pids"} <= wanted:
            raise SandboxSetupError(
                f"cgroup v2 {base} does not delegate memory and pids (has: {sorted(available)})"
            )
        enable = " ".join(f"+{c}" for c in sorted(wanted))
        try:
            try:
                _write(base / "cgroup.subtree_control", enable)
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                # "No internal processes": move the worker into a leaf of its own cgroup.
                leaf = base / SUPERVISOR_LEAF
                leaf.mkdir(exist_ok=True)
                _write(leaf / "cgroup.procs", str(os.getpid()))
                _write(base / "cgroup.subtree_control", enable)
            parent = base / ACTIONS_DIR
            parent.mkdir(exist_ok=True)
            _write(parent / "cgroup.subtree_control", enable)
        except OSError as e:
            raise SandboxSetupError(f"cannot delegate cgroup v2 controllers below {base}: {e}") from e
        sweep_dead_action_cgroups([parent], remove_dir=remove_dir)
        return cls(parent, frozenset(wanted), remove_dir, spares)

    def _make(self, name: str, bounds: _Bounds, open_files: int | None, made_ahead: bool) -> Confinement:
        path = self.parent / name
        if not made_ahead:
            path.mkdir()
        return CgroupV2Confinement(path, self._remove_dir, open_files)

    def _where(self, name: str) -> str:
        return str(self.parent / name)

    def _write_limits(self, confinement: Confinement, bounds: _Bounds) -> None:
        assert isinstance(confinement, CgroupV2Confinement)
        path = confinement.path
        if bounds.memory_bytes is not None and "memory" in self.enforces:
            _write(path / "memory.max", str(bounds.memory_bytes))
            try:
                _write(path / "memory.swap.max", "0")
            except OSError:
                pass  # no swap accounting: nothing to escape to
        if bounds.max_pids is not None and "pids" in self.enforces:
            _write(path / "pids.max", str(bounds.max_pids + SANDBOX_OWN_TASKS))
        if bounds.cpu_cores is not None and "cpu" in self.enforces:
            quota = max(1000, round(bounds.cpu_cores * CPU_PERIOD_US))
            _write(path / "cpu.max", f"{quota} {CPU_PERIOD_US}")


# --- v1 ------------------------------------------------------------------------------------


class CgroupV1Confinement(Confinement):
    def __init__(
        self, dirs: Mapping[str, Path], remove_dir: Callable[[Path], None], open_files: int | None = None
    ) -> None:
        #: controller -> this action's directory in that controller's hierarchy
        self.dirs = dict(dirs)
        self._unique = list(dict.fromkeys(self.dirs.values()))
        self._remove_dir = remove_dir
        self._open_files = open_files
        self._closed = False
        self._emptied = False  # see kill_all

    @property
    def rlimits(self) -> tuple[tuple[int, int], ...]:
        return open_files_rlimit(self._open_files)

    @property
    def join_tasks(self) -> tuple[str, ...]:
        return tuple(str(d / "tasks") for d in self._unique)

    @property
    def home_tasks(self) -> tuple[str, ...]:
        # <worker's cgroup>/ACTIONS_DIR/<action>: the worker's own is two levels up.
        return tuple(str(d.parent.parent / "tasks") for d in self._unique)

    def pids_exhausted(self) -> bool:
        return _pids_refused(self.dirs.get("pids"))

    def kill_all(self) -> None:
        # Every hierarchy holds every process of the action; one listing is enough, but a
        # second guards against a hierarchy that was joined and another that was not.
        # Listed only until once found empty: see CgroupV2Confinement.kill_all.
        if not self._emptied:
            self._emptied = _kill_until_empty([d / "cgroup.procs" for d in self._unique])

    def oom_killed(self) -> bool:
        memory = self.dirs.get("memory")
        return memory is not None and (_read_key(memory / "memory.oom_control", "oom_kill") or 0) > 0

    def usage(self) -> CgroupUsage:
        memory, pids, cpuacct = (self.dirs.get(c) for c in ("memory", "pids", "cpuacct"))

        def seconds(name: str) -> float | None:
            nanoseconds = _read_int(cpuacct / name) if cpuacct else None
            return None if nanoseconds is None else nanoseconds / 1e9

        return CgroupUsage(
            memory_peak_bytes=_read_int(memory / "memory.max_usage_in_bytes") if memory else None,
            pids_peak=_read_int(pids / "pids.peak") if pids else None,
            cpu_seconds=seconds("cpuacct.usage"),
            user_cpu_seconds=seconds("cpuacct.usage_user"),
            system_cpu_seconds=seconds("cpuacct.usage_sys"),
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.kill_all()
        errors = []
        for path in self._unique:
            try:
                _remove(path, self._remove_dir)
            except SandboxSetupError as e:
                errors.append(e)
        if errors:
            raise errors[0]


class CgroupV1Controller(_ActionCgroupController):
    """Action cgroups under ``parents`` (controller -> the ``reapi-worker`` directory in that
    controller's hierarchy). ``memory``, ``pids`` and ``cpuacct`` are joined for every action
    (OOM detection, figures, the kill list); ``cpu`` only when a CPU limit is asked for."""

    kind = "cgroup-v1"
    ALWAYS = ("memory", "pids", "cpuacct")

    def __init__(
        self, parents: Mapping[str, Path], remove_dir: Callable[[Path], None] = os.rmdir, spares: int = 0
    ) -> None:
        self.parents = dict(parents)
        self.enforces = frozenset(self.parents) & {"memory", "pids", "cpu"}
        always = [parent for controller, parent in self.parents.items() if controller in self.ALWAYS]
        #: what a spare holds: a directory in each hierarchy of a controller every action joins
        self._spare_parents = frozenset(always) if spares else frozenset()
        self._keep_spares(always, spares, remove_dir)

    @classmethod
    def from_self(
        cls,
        mounts: list[CgroupMount] | None = None,
        own: Mapping[str, str] | None = None,
        remove_dir: Callable[[Path], None] = os.rmdir,
        spares: int = 0,
    ) -> "CgroupV1Controller":
        """Find the v1 hierarchies the worker can create cgroups in; raises SandboxSetupError
        unless at least ``memory`` or ``pids`` is usable. ``spares``: cgroups kept made ahead
        of the actions (:mod:`.cgroup_spares`)."""
        mounts = cgroup_mounts(parse_mountinfo(_read_self("mountinfo"))) if mounts is None else mounts
        own = parse_proc_cgroup(_read_self("cgroup")) if own is None else own
        parents: dict[str, Path] = {}
        problems = []
        for controller in ("memory", "pids", "cpu", "cpuacct"):
            mount = next((m for m in mounts if m.version == 1 and controller in m.controllers), None)
            if mount is None or controller not in own:
                continue
            base = host_dir(mount, own[controller])
            if base is None:
                continue
            parent = base / ACTIONS_DIR
            try:
                parent.mkdir(exist_ok=True)
            except OSError as e:
                problems.append(f"{controller}: {e}")
                continue
            parents[controller] = parent
        if not {"memory", "pids"} & set(parents):
            detail = "; ".join(problems) or "no memory or pids hierarchy mounted"
            raise SandboxSetupError(f"no usable cgroup v1 hierarchy: {detail}")
        sweep_dead_action_cgroups(parents.values(), remove_dir=remove_dir)
        return cls(parents, remove_dir, spares)

    def _make(self, name: str, bounds: _Bounds, open_files: int | None, made_ahead: bool) -> Confinement:
        dirs = self._dirs(name, bounds, made_ahead=self._spare_parents if made_ahead else frozenset())
        return CgroupV1Confinement(dirs, self._remove_dir, open_files)

    def _where(self, name: str) -> str:
        return name

    def _dirs(self, name: str, bounds: _Bounds, made_ahead: frozenset[Path]) -> dict[str, Path]:
        """controller -> the action's directory, made where not ``made_ahead``; on a failure
        what was made is removed and OSError raised."""
        wanted = [c for c in self.parents if c in self.ALWAYS or (c == "cpu" and bounds.cpu_cores is not None)]
        dirs: dict[str, Path] = {}
        by_parent: dict[Path, Path] = {}  # co-mounted controllers share one directory
        try:
            for controller in wanted:
                parent = self.parents[controller]
                if parent not in by_parent:
                    path = parent / name
                    if parent not in made_ahead:
                        path.mkdir()
                    by_parent[parent] = path
                dirs[controller] = by_parent[parent]
        except OSError:
            CgroupV1Confinement(dirs, self._remove_dir).close()
            raise
        return dirs

    def _preparable(self, bounds: _Bounds) -> bool:
        # A cpu directory the spare lacks: the action makes its own.
        return bounds.cpu_cores is None or self.parents.get("cpu") in self._spare_parents

    def _write_limits(self, confinement: Confinement, bounds: _Bounds) -> None:
        assert isinstance(confinement, CgroupV1Confinement)
        dirs = confinement.dirs
        if bounds.memory_bytes is not None and "memory" in dirs:
            _write(dirs["memory"] / "memory.limit_in_bytes", str(bounds.memory_bytes))
            try:
                # Must follow limit_in_bytes (memsw >= limit); absent without swap accounting.
                _write(dirs["memory"] / "memory.memsw.limit_in_bytes", str(bounds.memory_bytes))
            except OSError:
                pass
        if bounds.max_pids is not None and "pids" in dirs:
            _write(dirs["pids"] / "pids.max", str(bounds.max_pids + SANDBOX_OWN_TASKS))
        if bounds.cpu_cores is not None and "cpu" in dirs:
            _write(dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(dirs["cpu"] / "cpu.cfs_quota_us", str(max(1000, round(bounds.cpu_cores * CPU_PERIOD_US))))
