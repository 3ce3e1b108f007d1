"""``/proc/<pid>/mountinfo``, parsed once (proc(5) describes the format).

One line per mount::

    36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    (1)(2) (3)  (4)   (5)     (6)      (7)   (8)  (9)    (10)      (11)

(7) is zero or more optional fields, ended by the separator (8). Paths in (4), (5) and
(10) have space, tab, newline and backslash escaped as ``\\ooo`` octal.
"""

from __future__ import annotations

from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One mount: ``root`` is the directory of its file system shown at ``mount_point``
    (``/`` unless a bind mount or a namespaced cgroup shows a subtree); ``super_options``
    the file system's own options (for cgroup v1: its controllers)."""

    mount_id: int
    parent_id: int
    root: str
    mount_point: str
    fstype: str
    source: str
    super_options: str


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Every mount in a mountinfo text, in the kernel's order (a later mount on the same
    point is on top). Lines that are not mountinfo lines are skipped."""
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(" "), right.split(" ")
        if not sep or len(fields) < 6 or len(tail) < 3:
            continue
        try:
            mount_id, parent_id = int(fields[0]), int(fields[1])
        except ValueError:
            continue
        entries.append(MountEntry(
            mount_id=mount_id, parent_id=parent_id, root=unescape(fields[3]), mount_point=unescape(fields[4]),
            fstype=tail[0], source=unescape(tail[1]), super_options=tail[2],
        ))
    return entries


def read_mountinfo(path: str = MOUNTINFO) -> list[MountEntry]:
    """This process's mounts (or those of the mountinfo file at ``path``). Raises OSError."""
    # surrogateescape: a mount point need not be UTF-8; it round-trips through os.fsencode.
    with open(path, encoding="utf-8", errors="surrogateescape") as stream:
        return parse_mountinfo(stream.read())


def unescape(field: str) -> str:
    """Undo mountinfo's ``\\ooo`` escapes."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():  # \ooo may end the field
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)
