"""Facts about the Linux host that more than one layer reads.

Sizes are written one way by every layer (:mod:`.units`), and "is the process that made
this still alive?" is answered one way, by flock-held owner files (:mod:`.owner_locks`:
the local CAS, the build root, the sandbox's /etc views).

Both ``reapi_worker.sandbox`` (where the cgroup hierarchies are mounted) and
``reapi_worker.storage.fuse`` (which mounts a worker that died left behind) read the
kernel's mount table; neither may import the other, so the parser lives here, below both.
This package imports nothing else of the project.

Public surface::

    MountEntry(mount_id, parent_id, root, mount_point, fstype, source, super_options)
    parse_mountinfo(text) -> list[MountEntry]
    read_mountinfo(path="/proc/self/mountinfo") -> list[MountEntry]
    format_bytes(count, exact=False) -> str      (sizes in reasons and logs, every layer)
    owner_locks.become_owner(owners, note), owner_locks.lock_if_dead(owner)
"""

from .mountinfo import MountEntry, parse_mountinfo, read_mountinfo
from .units import format_bytes

__all__ = ["MountEntry", "format_bytes", "parse_mountinfo", "read_mountinfo"]
