"""Which of the host's ``/etc`` a HOST_TOOLS sandbox sees: an allow-list, never the whole.

The host's ``/etc`` is the worker's, too: its own configuration directory (world-readable
when it is a Kubernetes ConfigMap mount), credentials of other services, the host's network
and mount set-up. An action needs little of it — who users are, how names resolve, where
shared libraries are, the time zone and locale, CA certificates — so only the top-level
entries named by an allow-list are shown, each read-only, and nothing else of ``/etc``
exists inside.

An allow-list entry is one name directly under ``/etc`` (``passwd``, ``ld.so.conf.d``) or an
``fnmatch`` pattern of one (``ld.so.*``, ``java-*``); a directory comes whole. Entries that
do not exist on the host are skipped. A symlink (``/etc/localtime`` ->
``/usr/share/zoneinfo/...``) is recreated as the same symlink rather than bound, so it
resolves inside the sandbox as it does on the host, and never to a host path outside the
sandbox's view. Names are checked where they enter (:func:`check_etc_names`): no ``/``, no
``.`` or ``..``, nothing empty — an allow-list cannot climb out of ``/etc``.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import SandboxSetupError

#: What compilers, shells, interpreters and test runners commonly read, and nothing that
#: belongs to a service: accounts and name resolution (``passwd``, ``group``, ``hosts``,
#: ``nsswitch.conf``, ``resolv.conf``, ``gai.conf``, ``host.conf``, ``services``,
#: ``protocols``), the dynamic linker (``ld.so.*``), Debian's ``alternatives`` links, time
#: zone and locale, CA certificates for ``network=on`` fetches, the OS identification files,
#: shell start-up files, and the system-wide configuration of a JVM and of Perl/Python.
DEFAULT_HOST_ETC: tuple[str, ...] = (
    "passwd", "group", "hosts", "host.conf", "nsswitch.conf", "resolv.conf", "gai.conf",
    "services", "protocols", "ld.so.*", "alternatives", "localtime", "timezone",
    "locale.alias", "locale.conf", "ssl", "ca-certificates", "ca-certificates.conf",
    "os-release", "debian_version", "shells", "profile", "bash.bashrc", "inputrc",
    "mime.types", "java-*", "perl", "python3*",
)


def check_etc_names(names: Iterable[str]) -> tuple[str, ...]:
    """The allow-list as a tuple, each entry checked: one path component or a pattern of one.

    Raises SandboxSetupError (an operator's mistake) naming the bad entry.
    """
    checked = []
    for name in names:
        if not isinstance(name, str) or not name or "/" in name or "\0" in name or name in (".", ".."):
            raise SandboxSetupError(
                f"host /etc allow-list entry {name!r} must be one name (or pattern) directly under /etc"
            )
        checked.append(name)
    return tuple(checked)


@dataclass(frozen=True)
class EtcEntry:
    """One allowed entry of the host's ``/etc`` as it is now: its name, whether it is a
    symlink (``target``) or a file/directory to bind, and the identity (device, inode) of
    what the path names, which changes when the entry is replaced (``rename`` over it, a
    mount on it) but not when it is rewritten in place."""

    name: str
    target: str | None
    is_dir: bool
    dev: int
    ino: int


def allow_pattern(allow: Iterable[str]) -> re.Pattern[str]:
    """The allow-list as one compiled regular expression (``fnmatchcase`` semantics): a scan
    runs before every sandbox start, where ~30 patterns times every name of ``/etc`` through
    ``fnmatch`` would cost a millisecond."""
    patterns = check_etc_names(allow)
    if not patterns:
        return re.compile(r"(?!)")  # matches nothing
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def scan_etc(allow: re.Pattern[str], etc: str = "/etc") -> tuple[EtcEntry, ...]:
    """The allowed entries of the directory ``etc``, sorted by name. Entries that are neither
    a file, a directory nor a symlink (sockets, fifos, devices) are never shown."""
    try:
        # One descriptor for the directory: each lstat then resolves one name, not a path.
        fd = os.open(etc, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return ()
    try:
        entries = []
        for name in sorted(filter(allow.match, os.listdir(fd))):
            try:
                st = os.lstat(name, dir_fd=fd)
                target = os.readlink(name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else None
            except FileNotFoundError:
                continue  # removed while we looked
            if target is not None or stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
                entries.append(EtcEntry(name, target, stat.S_ISDIR(st.st_mode), st.st_dev, st.st_ino))
        return tuple(entries)
    finally:
        os.close(fd)


def allowed_etc_entries(allow: Iterable[str], root: str = "/") -> list[tuple[str, str | None]]:
    """``(sandbox path, symlink target or None)`` for each allowed entry of ``root``'s ``/etc``,
    sorted by name; ``None`` means "bind it read-only" (see :func:`scan_etc`)."""
    return [("/etc/" + e.name, e.target) for e in scan_etc(allow_pattern(allow), os.path.join(root, "etc"))]
