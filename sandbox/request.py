"""What to run: :class:`SandboxRequest` and the values it is made of.

Every value here is a frozen dataclass checked when it is built, so a runner never sees a
request it cannot express: an argument or environment entry with NUL, an environment name
with ``=``, a working directory that is absolute or climbs out with ``..``, a negative
limit. Client-controlled fields raise :class:`InvalidArgument`; operator-controlled ones
(binds) raise :class:`SandboxSetupError`, because a bad bind is a misconfigured host, not a
bad action.
"""

from __future__ import annotations

import enum
import posixpath
import types
from collections.abc import Mapping
from dataclasses import dataclass, field

from reapi_worker.protos.errors import InvalidArgument

from .errors import SandboxSetupError
from .identity import RunAs

#: Where the input root appears inside a HOST_TOOLS sandbox. Fixed (never the host path,
#: never random) so that paths baked into outputs — debug info, ``__FILE__``, rpaths — are the
#: same on every worker and every run.
HOST_TOOLS_INPUT_ROOT = "/build"

#: The hostname every sandbox sees. ``localhost`` because it resolves through the host's
#: ``/etc/hosts`` without a network, which tools that look up their own name (the JVM) need.
SANDBOX_HOSTNAME = "localhost"


#: The paths, relative to the input root, a CHROOT sandbox mounts over (fresh ``/proc``,
#: minimal ``/dev``, tmpfs ``/tmp``); each must be a directory of the input root or absent.
CHROOT_MOUNT_POINTS = ("proc", "dev", "tmp")


class RootMode(enum.Enum):
    """What the sandbox's ``/`` is."""

    #: A fresh, read-only root holding the host's ``/usr``, ``/bin``, ``/sbin``, ``/lib*``
    #: and ``/etc`` (read-only, those that exist), the input root read-write at
    #: :data:`HOST_TOOLS_INPUT_ROOT`, fresh ``/proc``, minimal ``/dev`` and a tmpfs ``/tmp``.
    #: Nothing else of the host. This is how Bazel-like clients expect to run.
    HOST_TOOLS = "host-tools"
    #: The input root *is* ``/`` (read-write), with fresh ``/proc``, minimal ``/dev`` and a
    #: tmpfs ``/tmp`` on top, plus the operator's ``extra_ro_binds``. BuildStream sends
    #: actions that carry their whole root this way. bubblewrap creates the ``/proc``,
    #: ``/dev``, ``/tmp`` and bind-target directories inside the input root if missing; where
    #: present they must be directories (the executor refuses anything else by name first).
    CHROOT = "chroot"


@dataclass(frozen=True)
class ResourceLimits:
    """Per-action limits; ``None`` means unlimited.

    * ``memory_bytes`` — resident memory of the whole action (cgroups: OOM kill past it;
      rlimit fallback: RLIMIT_DATA per process, so allocations fail instead).
    * ``max_pids`` — processes *and threads* the action may have at once, not counting the
      sandbox's own two (bubblewrap's monitor and its init), which the runner adds.
    * ``cpu_cores`` — CPU bandwidth in cores (``1.5`` = 150 ms per 100 ms period); cgroups only.
    * ``tmp_bytes`` — size of the sandbox's tmpfs ``/tmp``. Its pages are the action's
      memory too: the kernel charges tmpfs pages to the memory cgroup of the process that
      wrote them, so under cgroups ``/tmp`` and the processes share ``memory_bytes``.
    * ``stream_bytes`` — bytes the command may write to stdout, and again to stderr; past
      it the action is killed and the stream keeps exactly its first ``stream_bytes``.
    * ``open_files`` — RLIMIT_NOFILE (soft and hard) of every process of the action.
    """

    memory_bytes: int | None = None
    max_pids: int | None = None
    cpu_cores: float | None = None
    tmp_bytes: int | None = None
    stream_bytes: int | None = None
    open_files: int | None = None

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "max_pids", "tmp_bytes", "stream_bytes", "open_files"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise InvalidArgument(f"resource limit {name}={value!r} must be a positive integer")
        if self.cpu_cores is not None and not self.cpu_cores > 0:
            raise InvalidArgument(f"resource limit cpu_cores={self.cpu_cores!r} must be positive")

    @property
    def unlimited(self) -> bool:
        return all(getattr(self, name) is None for name in self.__dataclass_fields__)


@dataclass(frozen=True)
class Bind:
    """A host path bound read-only into the sandbox (operator configuration).

    ``source`` is an absolute host path; ``target`` an absolute, normalised sandbox path
    other than ``/``. A source that does not exist is reported by bubblewrap when the
    sandbox is set up (SandboxSetupError), not checked here, to keep a stat off the hot path.
    """

    source: str
    target: str

    def __post_init__(self) -> None:
        for what, path in (("source", self.source), ("target", self.target)):
            if not path.startswith("/") or "\0" in path:
                raise SandboxSetupError(f"bind {what} {path!r} must be an absolute path")
        if posixpath.normpath(self.target) != self.target or self.target.startswith("//"):
            raise SandboxSetupError(f"bind target {self.target!r} is not a normalised path")
        if self.target == "/":
            raise SandboxSetupError("a bind cannot replace the sandbox's root")


@dataclass(frozen=True)
class SubtreeAccess:
    """Whether the command may write below ``path`` (relative to the input root, ``""`` for
    the root itself, normalised): a client's ``SubtreeReadOnly`` marking, reduced to where
    the answer changes. Deeper entries override shallower ones; ``path`` must be a directory
    of the staged input root (the runner binds it onto itself)."""

    path: str
    read_only: bool

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or "\0" in self.path or self.path.startswith("/"):
            raise InvalidArgument(f"read-only subtree {self.path!r} is not a relative path")
        if self.path and posixpath.normpath(self.path) != self.path or self.path.split("/")[0] == "..":
            raise InvalidArgument(f"read-only subtree {self.path!r} is not a normalised path inside the input root")

    @property
    def depth(self) -> int:
        return len(self.path.split("/")) if self.path else 0


@dataclass(frozen=True)
class SandboxRequest:
    """Run ``arguments`` with exactly ``environment`` in ``working_directory`` of ``input_root``.

    * ``arguments[0]`` is resolved as REAPI says: absolute; else containing ``/``: relative to
      the working directory; else a bare name looked up on the ``PATH`` of ``environment``
      (glibc's ``execvp`` rules, inside the sandbox's view — never the worker's PATH; with no
      ``PATH`` given, execvp's own default ``/bin:/usr/bin``).
    * ``environment`` is the command's whole environment: nothing of the worker's is added,
      not even ``PWD`` (see :mod:`.bwrap_args`).
    * ``input_root`` is the host path of the staged build directory; its directories must be
      writable by the sandbox's host uid (``run_as``, else the runner's; see
      :func:`~.identity.prepare_build_dir`), and
      every ancestor must be searchable (``x``) by it, since bubblewrap runs as that uid when
      it binds the root (e.g. a ``0711`` builds directory; pytest's ``0700`` tmp dirs fail).
    * ``working_directory`` is relative to the input root (``""`` for the root itself).
    * ``stdout_path`` / ``stderr_path`` are host files the runner creates (truncating) and the
      command writes to; the same path for both interleaves them like ``2>&1``. Keep them
      outside the input root so the command cannot see them by path.
    * ``extra_ro_binds`` are operator-configured host paths bound read-only; in HOST_TOOLS mode
      they may not land on or under :data:`HOST_TOOLS_INPUT_ROOT`.
    * ``subtree_access`` makes subtrees of the input root read-only (or writable again below
      a read-only one), each path once (kept sorted shallowest first); empty: all writable.
      ``/proc``, ``/dev``, ``/tmp`` and operator binds are mounts of their own and keep
      their own access whatever the subtree around them says.
    * ``uid`` / ``gid`` are the ids the command sees *inside* the sandbox (default 0, as the
      C++ reference runner and BuildStream expect). They map to the sandbox's unprivileged
      host uid, never to the host's root; see :mod:`.identity`.
    * ``run_as`` is that host uid/gid for this request (an action's own, from a
      :class:`~.uid_pool.UidPool`); ``None``: the runner's default identity. The input
      root's directories must be owned by it.
    * ``timeout`` in seconds from the moment the command is released; ``None`` for none.
    """

    arguments: tuple[str, ...]
    environment: Mapping[str, str]
    input_root: str
    stdout_path: str
    stderr_path: str
    working_directory: str = ""
    root_mode: RootMode = RootMode.HOST_TOOLS
    network: bool = False
    timeout: float | None = None
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    extra_ro_binds: tuple[Bind, ...] = ()
    subtree_access: tuple[SubtreeAccess, ...] = ()
    uid: int = 0
    gid: int = 0
    run_as: RunAs | None = None

    def __post_init__(self) -> None:
        # Freeze the mutable inputs so that a request cannot change under a running sandbox.
        object.__setattr__(self, "arguments", tuple(self.arguments))
        object.__setattr__(self, "environment", types.MappingProxyType(dict(self.environment)))
        object.__setattr__(self, "extra_ro_binds", tuple(self.extra_ro_binds))
        # Shallower first, so that a subtree's own mount always lands on its parent's.
        access = tuple(sorted(self.subtree_access, key=lambda a: (a.depth, a.path)))
        object.__setattr__(self, "subtree_access", access)
        if len({a.path for a in access}) != len(access):
            raise InvalidArgument("a read-only subtree is listed twice")
        if not self.arguments or self.arguments[0] == "":
            raise InvalidArgument("a command needs a non-empty arguments[0]")
        for arg in self.arguments:
            if not isinstance(arg, str) or "\0" in arg:
                raise InvalidArgument(f"argument {arg!r} is not a string without NUL")
        for name, value in self.environment.items():
            if not isinstance(name, str) or not name or "=" in name or "\0" in name:
                raise InvalidArgument(f"environment variable name {name!r} is invalid")
            if not isinstance(value, str) or "\0" in value:
                raise InvalidArgument(f"environment variable {name} has a value with NUL")
        object.__setattr__(self, "working_directory", _check_working_directory(self.working_directory))
        if not self.input_root.startswith("/"):
            raise SandboxSetupError(f"input root {self.input_root!r} must be an absolute host path")
        if self.timeout is not None and not self.timeout > 0:
            raise InvalidArgument(f"timeout {self.timeout!r} must be positive")
        for ident in (self.uid, self.gid):
            if not isinstance(ident, int) or not 0 <= ident < 2**32 - 1:
                raise InvalidArgument(f"sandbox uid/gid {ident!r} is out of range")
        if self.root_mode is RootMode.HOST_TOOLS:
            for bind in self.extra_ro_binds:
                if bind.target == HOST_TOOLS_INPUT_ROOT or bind.target.startswith(HOST_TOOLS_INPUT_ROOT + "/"):
                    raise SandboxSetupError(
                        f"bind target {bind.target!r} would land inside the input root "
                        f"({HOST_TOOLS_INPUT_ROOT}) and create directories in it"
                    )

    @property
    def sandbox_working_directory(self) -> str:
        """The working directory as the command sees it (an absolute sandbox path)."""
        return self.sandbox_path(self.working_directory)

    def sandbox_path(self, path: str) -> str:
        """Where ``path`` (relative to the input root) appears inside the sandbox."""
        root = HOST_TOOLS_INPUT_ROOT if self.root_mode is RootMode.HOST_TOOLS else "/"
        return posixpath.join(root, path) if path else root


def mount_points(root_mode: RootMode, extra_ro_binds: tuple[Bind, ...]) -> tuple[str, ...]:
    """The paths, relative to the input root, where a sandbox of ``root_mode`` mounts
    something over the input root: :data:`CHROOT_MOUNT_POINTS` and the operator's bind
    targets in CHROOT mode; none in HOST_TOOLS mode (the input root is ``/build`` and no
    bind may land there). bubblewrap follows a symlink at such a path and fails on
    anything but a directory, so the caller refuses those before the sandbox is built."""
    if root_mode is not RootMode.CHROOT:
        return ()
    return CHROOT_MOUNT_POINTS + tuple(bind.target.lstrip("/") for bind in extra_ro_binds)


def _check_working_directory(path: str) -> str:
    """Normalise a relative working directory; refuse absolute paths and ``..``.

    The caller has already validated it against the Command; this is the cheap second look
    a security boundary deserves, since bubblewrap would happily ``chdir`` out of the root.
    """
    if not isinstance(path, str) or "\0" in path:
        raise InvalidArgument(f"working directory {path!r} is not a string without NUL")
    if path.startswith("/"):
        raise InvalidArgument(f"working directory {path!r} is absolute")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise InvalidArgument(f"working directory {path!r} contains '..'")
    return "/".join(parts)
