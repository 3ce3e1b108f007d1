"""Lazy staging through FUSE: input trees served read-only from the CAS, written through
a per-action overlay.

Public surface:

* :class:`FuseMount` (:mod:`.mount`) — the worker's one FUSE mount and its thread;
* :class:`FuseStager` (:mod:`.stager`) — the :class:`~..staging.Stager` using it.

Internal: :mod:`.operations` (the request handlers), :mod:`.inodes` (the inode table),
:mod:`.kernel_mounts` (overlay mounts, stale-mount clean-up).
"""

from .mount import FuseMount
from .stager import FuseStager

__all__ = ["FuseMount", "FuseStager"]
