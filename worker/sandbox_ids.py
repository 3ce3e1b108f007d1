"""Which uid/gid the command sees: the ``unixUID`` / ``unixGID`` platform properties.

BuildStream sends them when its project sets ``build-uid`` / ``build-gid`` (and the
buildbox runner advertises them). Inside the sandbox's user namespace any id can be shown
to the command: it maps to the runner's one unprivileged host uid either way (see
:mod:`reapi_worker.sandbox.identity`), so honouring the request costs no isolation.
Absent, the command runs as 0:0, as BuildStream's local sandbox and the C++ runner do.
"""

from __future__ import annotations

from collections.abc import Mapping

from reapi_worker.protos.errors import InvalidArgument

UID_KEY = "unixUID"
GID_KEY = "unixGID"

#: The platform property keys this module understands, for the list of known keys.
SANDBOX_ID_KEYS = (UID_KEY, GID_KEY)

#: The largest id a user namespace can map (2**32 - 1 is the "no id" value).
_MAX_ID = 2**32 - 2


def sandbox_ids(properties: Mapping[str, str]) -> tuple[int, int]:
    """(uid, gid) the command should see, from an action's platform properties (name ->
    value). InvalidArgument naming the property if a value is not a decimal id."""
    return _id(properties, UID_KEY), _id(properties, GID_KEY)


def _id(properties: Mapping[str, str], key: str) -> int:
    value = properties.get(key)
    if value is None:
        return 0
    if not (value.isascii() and value.isdigit()) or int(value) > _MAX_ID:
        raise InvalidArgument(f"platform property {key}={value!r}: expected a decimal id from 0 to {_MAX_ID}")
    return int(value)
