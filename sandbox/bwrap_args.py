"""The bubblewrap argument list, built by a pure function of the request and the host layout.

Everything the sandbox is — namespaces, mounts, environment, working directory — is decided
here and nowhere else, so it can be read, reviewed and unit-tested as a list of strings. The
result is what follows ``bwrap``: options, then ``--``, then the command. The runner passes
the options through ``--args FD`` (bubblewrap takes only options there), which keeps host
paths and environment values out of ``/proc/1/cmdline`` inside the sandbox.

Choices, and why:

* Namespaces user, pid, ipc, uts (hostname fixed), cgroup, and net unless the request wants
  network: with its own net namespace the command has only a loopback of its own and cannot
  reach the host's 127.0.0.1 nor its abstract UNIX sockets. A request with ``network`` is
  never run in the host's namespace either: the runner starts bubblewrap in a namespace of
  its own with an outbound NAT attached (:mod:`.network`). bubblewrap's pid-1 init reaps
  orphans, and when the command
  exits the init exits, which makes the kernel kill everything left in the namespace —
  double-forked daemons included.
* ``--die-with-parent``: if the worker dies, so does the sandbox. ``--new-session``: no
  ``TIOCSTI`` into a terminal. ``--cap-drop ALL``: no capabilities even inside.
* ``--clearenv`` then ``--setenv`` per variable, sorted, so that nothing of the worker leaks.
  bubblewrap then *adds* ``PWD`` (it always does, after ``chdir``). In HOST_TOOLS mode the
  command is therefore started through the host's ``env -u PWD --`` (a 0.5 ms exec that
  replaces itself with the command, keeping execvp's PATH rules and the shell's 127/126
  exit codes) — unless the client's ``PWD`` is the working directory itself, bubblewrap's
  value. In CHROOT mode nothing of the host can be relied on inside the root, so
  bubblewrap's ``PWD`` (the sandbox working directory — deterministic, not worker data)
  stays; documented as the one difference. ``env`` would take an ``arguments[0]``
  containing ``=`` for an assignment, so such a command is also run without it.
* HOST_TOOLS: a read-only tmpfs root with the host's ``/usr``, the allowed entries of its
  ``/etc`` (:mod:`.host_etc`; one bind of the runner's prepared view, :mod:`.etc_view`, when
  it has one — one bind costs bubblewrap one mountinfo read, ~30 cost 2 ms) and the top-level
  links or directories ``/bin``, ``/sbin``, ``/lib``, ``/lib32``, ``/lib64``, ``/libx32``
  that exist (a symlink on the host, as on merged-/usr systems, stays a symlink), the input
  root read-write at ``/build``, fresh ``/proc``, minimal ``/dev``, tmpfs ``/tmp``.
* CHROOT: the input root read-write as ``/``, fresh ``/proc``, minimal ``/dev``, tmpfs ``/tmp``.
* ``/tmp`` is sized by ``limits.tmp_bytes`` (``--size``) when set: a tmpfs without a size
  may take half the host's memory.
* Operator binds come last, read-only, so they may cover anything above.
* Read-only subtrees (``subtree_access``, the client's ``SubtreeReadOnly``): every subtree
  whose access changes is first bound onto itself (the root already is a mount), so it is
  a mount point of its own; after ``/proc``, ``/dev``, ``/tmp`` and the operator binds are
  mounted — their mount points still created where missing — the read-only ones are
  remounted read-only. ``--remount-ro`` does not recurse, so a writable subtree inside a
  read-only one (a mount of its own) and the sandbox's own mounts stay as they are.
  Why a mount and not file modes: the sandbox's uid owns the staged directories and could
  ``chmod`` them back, whereas a read-only mount is out of its reach — it holds no
  capability to remount or unmount it (``--cap-drop ALL``), and in any user namespace it
  could create, the kernel locks the mount's read-only flag and keeps it joined to its
  parent mounts. Writes get EROFS, with either stager: both give a directory to bind.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from .host_etc import DEFAULT_HOST_ETC, allowed_etc_entries
from .request import HOST_TOOLS_INPUT_ROOT, SANDBOX_HOSTNAME, RootMode, SandboxRequest

#: Top-level host entries offered in HOST_TOOLS mode besides ``/usr`` and ``/etc``'s allowed ones.
HOST_TOOLS_TOP_LEVEL = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

#: What every sandbox mounts of its own, whatever the input root holds there.
SANDBOX_MOUNTS = ("/proc", "/dev", "/tmp")

#: The in-sandbox exec shim used in HOST_TOOLS mode (see the module docstring).
ENV_SHIM = "/usr/bin/env"


@dataclass(frozen=True)
class HostEntry:
    """One host path as HOST_TOOLS mode reproduces it: a directory or file to bind read-only,
    or (``symlink_target`` set) a symlink to recreate."""

    path: str
    symlink_target: str | None = None


@dataclass(frozen=True)
class HostLayout:
    """The parts of the host a HOST_TOOLS sandbox shows, read once when a runner starts.

    ``entries`` lists ``/usr``, the :data:`HOST_TOOLS_TOP_LEVEL` paths that exist and the
    allowed entries of ``/etc`` (``/etc/passwd``, ..., see :mod:`.host_etc`);
    ``env_shim`` is :data:`ENV_SHIM` if the host has it under ``/usr``, else ``None``;
    ``etc_allow`` and ``etc_dir`` are what the ``/etc`` entries were chosen by and from, for
    a runner that shows them through one prepared view (:mod:`.etc_view`) instead.
    """

    entries: tuple[HostEntry, ...]
    env_shim: str | None
    etc_allow: tuple[str, ...] = ()
    etc_dir: str = "/etc"

    @classmethod
    def probe(cls, root: str = "/", etc_allow: tuple[str, ...] = DEFAULT_HOST_ETC) -> "HostLayout":
        """Read the layout of the host (or of ``root``, for tests), showing the entries of
        ``/etc`` that ``etc_allow`` names. Raises SandboxSetupError for a bad allow-list."""
        entries = []
        for path in ("/usr", *HOST_TOOLS_TOP_LEVEL):
            host = os.path.join(root, path.lstrip("/"))
            try:
                st = os.lstat(host)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                entries.append(HostEntry(path, symlink_target=os.readlink(host)))
            elif stat.S_ISDIR(st.st_mode):
                entries.append(HostEntry(path))
        entries += [HostEntry(path, target) for path, target in allowed_etc_entries(etc_allow, root)]
        shim = os.path.join(root, ENV_SHIM.lstrip("/"))
        has_shim = any(e.path == "/usr" and e.symlink_target is None for e in entries) and os.access(shim, os.X_OK)
        return cls(
            entries=tuple(entries), env_shim=ENV_SHIM if has_shim else None,
            etc_allow=tuple(etc_allow), etc_dir=os.path.join(root, "etc"),
        )


@dataclass(frozen=True)
class ControlFds:
    """bubblewrap's control descriptors, as numbered in its process."""

    info_fd: int
    status_fd: int
    block_fd: int


@dataclass(frozen=True)
class BwrapArguments:
    """bubblewrap's options and the command it runs (behind the env shim when used)."""

    options: tuple[str, ...]
    command: tuple[str, ...]

    def argv(self) -> list[str]:
        """Everything after ``bwrap`` on one command line."""
        return [*self.options, "--", *self.command]


def bwrap_arguments(
    request: SandboxRequest, layout: HostLayout, fds: ControlFds, etc_view: str | None = None
) -> BwrapArguments:
    """The arguments after ``bwrap`` that run ``request``; pure (no I/O, no globals).

    ``etc_view``: a prepared read-only ``/etc`` (:mod:`.etc_view`) bound in one piece
    instead of the layout's ``/etc`` entries one by one (HOST_TOOLS only).
    The caller guarantees ``request`` is valid (it validates itself when built).
    """
    args: list[str] = [
        "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup",
    ]
    if not request.network:
        args.append("--unshare-net")  # else the runner's NAT namespace (see the docstring)
    args += [
        "--uid", str(request.uid), "--gid", str(request.gid),
        "--hostname", SANDBOX_HOSTNAME,
        "--die-with-parent", "--new-session", "--cap-drop", "ALL",
        "--clearenv",
    ]
    for name in sorted(request.environment):
        args += ["--setenv", name, request.environment[name]]

    if request.root_mode is RootMode.HOST_TOOLS:
        for entry in layout.entries:
            if etc_view is not None and entry.path.startswith("/etc/"):
                continue  # shown by the view, bound below
            if entry.symlink_target is not None:
                args += ["--symlink", entry.symlink_target, entry.path]
            else:
                args += ["--ro-bind", entry.path, entry.path]
        if etc_view is not None:
            args += ["--ro-bind", etc_view, "/etc"]
        # Every bubblewrap bind is remounted nosuid,nodev (only --dev-bind keeps devices):
        # a setuid binary or device node in the input root is inert inside, in both root
        # modes (tests/system/test_tenant_uids.py reads it back from mountinfo).
        args += ["--bind", request.input_root, HOST_TOOLS_INPUT_ROOT]
    else:
        args += ["--bind", request.input_root, "/"]
    # Subtrees the sandbox mounts over keep the access of what covers them.
    subtrees = [a for a in request.subtree_access if not _covered(request.sandbox_path(a.path), request)]
    for access in subtrees:
        if access.path:  # each its own mount point (see the module docstring)
            args += ["--bind", os.path.join(request.input_root, access.path), request.sandbox_path(access.path)]
    args += ["--proc", "/proc", "--dev", "/dev"]
    if request.limits.tmp_bytes is not None:
        args += ["--size", str(request.limits.tmp_bytes)]  # applies to the next --tmpfs
    args += ["--tmpfs", "/tmp"]
    for bind in request.extra_ro_binds:
        args += ["--ro-bind", bind.source, bind.target]
    for access in subtrees:
        if access.read_only:
            args += ["--remount-ro", request.sandbox_path(access.path)]
    if request.root_mode is RootMode.HOST_TOOLS:
        # The tmpfs root itself: nothing to write there; /build and /tmp stay writable.
        args += ["--remount-ro", "/"]

    args += ["--chdir", request.sandbox_working_directory]
    args += ["--info-fd", str(fds.info_fd), "--json-status-fd", str(fds.status_fd), "--block-fd", str(fds.block_fd)]
    return BwrapArguments(options=tuple(args), command=tuple(_command(request, layout)))


def _covered(path: str, request: SandboxRequest) -> bool:
    """Whether the sandbox path ``path`` is at or below one of the sandbox's own mounts."""
    mounts = [*SANDBOX_MOUNTS, *(bind.target for bind in request.extra_ro_binds)]
    return any(path == mount or path.startswith(mount + "/") for mount in mounts)


def uses_env_shim(request: SandboxRequest, layout: HostLayout) -> bool:
    """Whether :func:`bwrap_arguments` starts the command through :data:`ENV_SHIM`.

    Not when the client's own ``PWD`` is exactly the working directory: that is the value
    bubblewrap sets, so the environment is already exact and the exec (~0.5-1 ms of a
    sandbox start, ``bench/bench_sandbox.py``) would change nothing.
    """
    return (
        request.root_mode is RootMode.HOST_TOOLS
        and layout.env_shim is not None
        and "=" not in request.arguments[0]
        and request.environment.get("PWD") != request.sandbox_working_directory
    )


def _command(request: SandboxRequest, layout: HostLayout) -> Iterable[str]:
    if not uses_env_shim(request, layout):
        return request.arguments
    assert layout.env_shim is not None
    # env: drop the PWD bubblewrap added, restore the client's own PWD if it sent one.
    # Assignments come after "--" and before the command, as env(1) parses them.
    shim = [layout.env_shim, "-u", "PWD", "--"]
    if "PWD" in request.environment:
        shim.append("PWD=" + request.environment["PWD"])
    return [*shim, *request.arguments]
