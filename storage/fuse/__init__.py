"""Lazy staging through FUSE: input trees served read-only from the CAS, written through
a per-action overlay.

Public surface:

* :class:`FuseMount` (:mod:`.mount`) — the worker's one FUSE mount and its thread;
* :class:`FuseStager` (:mod:`.stager`) — the :class:`~..staging.Stager` using it.

Internal: :mod:`.inodes` (the inode table), :mod:`.open_files` (descriptors, quota),
:mod:`.kernel_mounts` (overlay mounts, stale-mount clean-up), and the two backends that
serve the mount (:data:`.mount.BACKENDS`): :mod:`.operations` (pyfuse3's request
handlers) and :mod:`.kernel_session` + :mod:`.kernel_requests` + :mod:`.protocol` (the
/dev/fuse protocol spoken directly, in a page-cache mode with :mod:`.kernel_prefetch`,
or with passthrough reads); :mod:`.blobs` is their shared access to the local cache.
"""

from .mount import FuseMount
from .stager import FuseStager

__all__ = ["FuseMount", "FuseStager"]
