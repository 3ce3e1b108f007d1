"""Load an Action and its Command from CAS and check everything the client controls.

Nothing past this module sees an unchecked path: output paths and the working
directory become tuples of checked components, relative to the input root.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.sandbox.request import RootMode
from reapi_worker.storage.content import ContentStore
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.paths import RelPath, split_relative

M = TypeVar("M", bound=Message)

# Platform property keys this worker understands (advertised by the bot). ``rootMode``
# takes a :class:`RootMode` value: ``host-tools`` (default) or ``chroot``.
ROOT_MODE_KEY = "rootMode"
NETWORK_KEY = "network"


class OutputKind(enum.Enum):
    """Which REAPI field an output path came from; it decides how it is reported."""

    PATH = "output_paths"  # v2.1: file, directory or symlink, whatever is found
    FILE = "output_files"  # legacy
    DIRECTORY = "output_directories"  # legacy


@dataclass(frozen=True, slots=True)
class OutputSpec:
    path: str  # as the client wrote it, relative to the working directory: reported back
    components: RelPath  # relative to the input root, checked
    kind: OutputKind


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """An Action and its Command, checked and in the worker's terms."""

    action_digest: Digest
    action: re_pb2.Action
    command: re_pb2.Command
    input_root_digest: Digest
    arguments: tuple[str, ...]
    environment: dict[str, str]
    working_directory: RelPath
    outputs: tuple[OutputSpec, ...]
    timeout: float | None
    root_mode: RootMode
    network: bool
    node_properties: frozenset[str]


def parse_message(message_type: type[M], data: bytes, what: str) -> M:
    """``data`` parsed as a ``message_type``; InvalidArgument naming ``what`` if it is not one."""
    message = message_type()
    try:
        message.ParseFromString(data)
    except DecodeError as error:
        raise InvalidArgument(f"{what} is not a valid {message_type.DESCRIPTOR.full_name}: {error}") from None
    return message


def load_action(store: ContentStore, action_digest: Digest, action: re_pb2.Action | None = None) -> ActionSpec:
    """Read (unless given) the Action and its Command, and check them.

    Raises MissingBlobs for absent blobs (both at once when both are absent) and
    InvalidArgument naming the offending field.
    """
    if action is None:
        action = parse_message(re_pb2.Action, store.read(action_digest), f"action {action_digest}")
    if not action.HasField("command_digest"):
        raise InvalidArgument("action.command_digest is not set")
    if not action.HasField("input_root_digest"):
        raise InvalidArgument("action.input_root_digest is not set")
    command_digest = _checked_digest(action.command_digest, "action.command_digest")
    input_root_digest = _checked_digest(action.input_root_digest, "action.input_root_digest")
    command = parse_message(re_pb2.Command, store.read(command_digest), f"command {command_digest}")
    return check_action(action_digest, action, command, input_root_digest)


def check_action(
    action_digest: Digest, action: re_pb2.Action, command: re_pb2.Command, input_root_digest: Digest
) -> ActionSpec:
    if not command.arguments:
        raise InvalidArgument("command.arguments is empty")
    if any("\0" in argument for argument in command.arguments):
        raise InvalidArgument("command.arguments contains NUL")
    environment: dict[str, str] = {}
    for variable in command.environment_variables:
        if not variable.name or "=" in variable.name or "\0" in variable.name + variable.value:
            raise InvalidArgument(f"command.environment_variables: invalid name {variable.name!r}")
        if variable.name in environment:
            raise InvalidArgument(f"command.environment_variables: {variable.name!r} set twice")
        environment[variable.name] = variable.value
    working_directory = split_relative(command.working_directory, "command.working_directory")

    outputs = []
    for kind, paths in (
        (OutputKind.PATH, command.output_paths),
        (OutputKind.FILE, command.output_files),
        (OutputKind.DIRECTORY, command.output_directories),
    ):
        for path in paths:
            relative = split_relative(path, f"command.{kind.value} entry")
            components = working_directory + relative
            if not components and kind is not OutputKind.DIRECTORY and kind is not OutputKind.PATH:
                raise InvalidArgument(f"command.{kind.value}: {path!r} names the working directory itself")
            outputs.append(OutputSpec(path=path, components=components, kind=kind))

    platform = action.platform if action.HasField("platform") else command.platform
    properties: dict[str, str] = {}
    for prop in platform.properties:
        properties.setdefault(prop.name, prop.value)
    root_mode_name = properties.get(ROOT_MODE_KEY, RootMode.HOST_TOOLS.value)
    try:
        root_mode = RootMode(root_mode_name)
    except ValueError:
        choices = ", ".join(mode.value for mode in RootMode)
        raise InvalidArgument(f"platform property {ROOT_MODE_KEY}={root_mode_name!r}: expected one of {choices}") from None
    network_value = properties.get(NETWORK_KEY, "off")
    if network_value not in ("on", "off"):
        raise InvalidArgument(f"platform property {NETWORK_KEY}={network_value!r}: expected 'on' or 'off'")

    timeout = None
    if action.HasField("timeout"):
        timeout = action.timeout.ToTimedelta().total_seconds()
        if timeout < 0:
            raise InvalidArgument("action.timeout is negative")
        timeout = timeout or None  # REAPI: zero means "no timeout given"

    return ActionSpec(
        action_digest=action_digest,
        action=action,
        command=command,
        input_root_digest=input_root_digest,
        arguments=tuple(command.arguments),
        environment=environment,
        working_directory=working_directory,
        outputs=tuple(outputs),
        timeout=timeout,
        root_mode=root_mode,
        network=network_value == "on",
        node_properties=frozenset(command.output_node_properties),
    )


def _checked_digest(proto: re_pb2.Digest, field: str) -> Digest:
    try:
        return Digest.from_proto(proto)
    except InvalidArgument as error:
        raise error.within(field) from None
