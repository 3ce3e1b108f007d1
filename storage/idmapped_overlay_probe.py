"""Can this kernel do what the directory cache's views need: an overlay over an idmapped layer?

:class:`~.cached_staging.CachedTreeStager` shows each cached tree to an action through an
idmapped mount used as an overlayfs lower layer. Idmapped mounts came with Linux 5.12,
overlayfs accepted them as layers only from 5.19, and a hardened kernel or a seccomp
profile of a container may refuse either. Found out per action, that would fail every
action that chose the cache with INTERNAL; found out once at start, ``staging = "cached"``
is refused with the kernel's reason and ``auto`` does without the cache.

The probe does exactly what a view does, on an empty scratch directory: a user namespace
mapping one id, an idmapped clone, an overlay over it; then unmounts and removes it all.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from reapi_worker.protos.errors import ReapiError

from .fuse import kernel_mounts
from .idmapped_mounts import OwnerMappings, attach_idmapped


def idmapped_overlay_refusal(scratch_parent: str, mappings: OwnerMappings | None = None) -> str | None:
    """None if an overlay over an idmapped mount works here, else the reason it does not.

    ``scratch_parent``: an existing directory the probe may make one directory in (the build
    root). Everything made is gone when this returns."""
    own_mappings = mappings is None
    mappings = mappings or OwnerMappings()
    scratch = tempfile.mkdtemp(prefix=".idmap-probe-", dir=scratch_parent)
    merged = os.path.join(scratch, "merged")
    point = os.path.join(scratch, "lower")
    try:
        for name in ("tree", "lower", "upper", "work", "merged"):
            os.makedirs(os.path.join(scratch, name), exist_ok=True)
        userns = mappings.userns_fd(65534, 65534)
        attach_idmapped(os.path.join(scratch, "tree"), point, userns)
        try:
            kernel_mounts.mount_overlay(point, os.path.join(scratch, "upper"), os.path.join(scratch, "work"), merged)
        finally:
            kernel_mounts.detach(point)
        kernel_mounts.unmount(merged)
        return None
    except (ReapiError, OSError) as error:
        return str(error)
    finally:
        for path in (merged, point):
            try:
                kernel_mounts.detach(path)
            except ReapiError:
                pass  # only empty scratch directories were ever mounted there
        shutil.rmtree(scratch, ignore_errors=True)
        if own_mappings:
            mappings.close()
