"""An action's platform properties, checked strictly: every key is one the worker knows.

REAPI leaves the property names to the server and says an unknown one SHOULD be refused.
A worker that ignores a key it does not understand runs the action somewhere other than
where the client asked (``network=on`` ignored is a build that fails for no visible
reason; a misspelt ``rootmode`` silently runs in the default mode). So each key is one of:

* **interpreted** by this worker (:data:`ROOT_MODE_KEY`, :data:`NETWORK_KEY`, and
  ``unixUID`` / ``unixGID``, see :mod:`.sandbox_ids`): its value
  decides how the sandbox is built, so it must be unambiguous — a key given twice with
  different values is refused (the same value twice is harmless);
* **matched** by the scheduler only (``OSFamily``, ``ISA``, and whatever the operator adds
  in ``PlatformPolicy.matched_keys``, e.g. the keys the bot advertises): the scheduler has
  already decided this worker fits, so their values are not read here, and REAPI lets a
  server accept several values of one key;
* anything else: refused with InvalidArgument naming the keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.sandbox.request import RootMode

from .sandbox_ids import SANDBOX_ID_KEYS, sandbox_ids

# Platform property keys this worker interprets. ``rootMode`` takes a :class:`RootMode`
# value (default: the operator's ``root_mode``); ``network`` is ``on`` or ``off``.
ROOT_MODE_KEY = "rootMode"
NETWORK_KEY = "network"
INTERPRETED_KEYS = frozenset({ROOT_MODE_KEY, NETWORK_KEY, *SANDBOX_ID_KEYS})

#: Keys every REAPI scheduler matches on (platform.md's standard lexicon).
STANDARD_MATCHED_KEYS = frozenset({"OSFamily", "ISA"})


@dataclass(frozen=True, slots=True)
class PlatformPolicy:
    """The operator's side of platform properties.

    ``default_root_mode``: the root mode of an action that gives no ``rootMode`` (a
    BuildStream farm sets ``chroot``: BuildStream cannot send the property).
    ``matched_keys``: keys accepted without being read, because the scheduler matches on
    them (the standard ones are always included).
    """

    default_root_mode: RootMode = RootMode.HOST_TOOLS
    matched_keys: frozenset[str] = STANDARD_MATCHED_KEYS

    @classmethod
    def of(cls, default_root_mode: RootMode, extra_matched_keys: Iterable[str] = ()) -> "PlatformPolicy":
        return cls(default_root_mode, STANDARD_MATCHED_KEYS | frozenset(extra_matched_keys))


@dataclass(frozen=True, slots=True)
class ActionPlatform:
    """What the interpreted properties ask for."""

    root_mode: RootMode
    network: bool
    uid: int = 0  # the ids the command sees
    gid: int = 0


def check_platform(platform: re_pb2.Platform, policy: PlatformPolicy, where: str = "platform") -> ActionPlatform:
    """The interpreted values of ``platform``. Raises InvalidArgument naming unknown keys,
    conflicting values of an interpreted key, or a value outside its choices."""
    values: dict[str, str] = {}
    unknown: list[str] = []
    for prop in platform.properties:
        if prop.name in INTERPRETED_KEYS:
            earlier = values.setdefault(prop.name, prop.value)
            if earlier != prop.value:
                raise InvalidArgument(
                    f"{where} property {prop.name} is given twice with different values "
                    f"({earlier!r} and {prop.value!r})"
                )
        elif prop.name not in policy.matched_keys and prop.name not in unknown:
            unknown.append(prop.name)
    if unknown:
        known = ", ".join(sorted(INTERPRETED_KEYS | policy.matched_keys))
        raise InvalidArgument(
            f"{where}: unsupported propert{'y' if len(unknown) == 1 else 'ies'} "
            f"{', '.join(repr(name) for name in unknown)} (this worker understands {known})"
        )

    root_mode_name = values.get(ROOT_MODE_KEY, policy.default_root_mode.value)
    try:
        root_mode = RootMode(root_mode_name)
    except ValueError:
        choices = ", ".join(mode.value for mode in RootMode)
        raise InvalidArgument(f"{where} property {ROOT_MODE_KEY}={root_mode_name!r}: expected one of {choices}") from None
    network_value = values.get(NETWORK_KEY, "off")
    if network_value not in ("on", "off"):
        raise InvalidArgument(f"{where} property {NETWORK_KEY}={network_value!r}: expected 'on' or 'off'")
    uid, gid = sandbox_ids(values)
    return ActionPlatform(root_mode=root_mode, network=network_value == "on", uid=uid, gid=gid)
