"""Load an Action and its Command from CAS and check everything the client controls.

Nothing past this module sees an unchecked path: output paths (resolved as REAPI says,
:mod:`.output_paths`) and the working directory become tuples of checked components,
relative to the input root. Platform properties are checked strictly
(:mod:`.platform_properties`). A field the worker does not support — an unknown field
number from a newer REAPI, an unknown output node property or output directory format —
is refused with InvalidArgument naming it, never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.protos.unbound_fields import OutputDirectoryFormat, output_directory_format, unhandled_field_numbers
from reapi_worker.sandbox.request import RootMode
from reapi_worker.storage.content import ContentStore
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.paths import RelPath, split_relative

from .output_paths import OutputKind, OutputSpec, output_specs
from .platform_properties import NETWORK_KEY, ROOT_MODE_KEY, PlatformPolicy, check_platform

M = TypeVar("M", bound=Message)

__all__ = [
    "ActionSpec", "NETWORK_KEY", "NODE_PROPERTIES", "OutputKind", "OutputSpec", "PlatformPolicy", "ROOT_MODE_KEY",
    "RootMode", "check_action", "load_action", "parse_message",
]

#: ``output_node_properties`` this worker records (REAPI: any other is INVALID_ARGUMENT).
NODE_PROPERTIES = frozenset({"mtime", "unix_mode"})


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
    output_directory_format: OutputDirectoryFormat = OutputDirectoryFormat.TREE_ONLY
    uid: int = 0  # the ids the command sees (worker/sandbox_ids.py)
    gid: int = 0


def parse_message(message_type: type[M], data: bytes, what: str) -> M:
    """``data`` parsed as a ``message_type``; InvalidArgument naming ``what`` if it is not one."""
    message = message_type()
    try:
        message.ParseFromString(data)
    except DecodeError as error:
        raise InvalidArgument(f"{what} is not a valid {message_type.DESCRIPTOR.full_name}: {error}") from None
    return message


def load_action(
    store: ContentStore,
    action_digest: Digest,
    action: re_pb2.Action | None = None,
    policy: PlatformPolicy = PlatformPolicy(),
) -> ActionSpec:
    """Read (unless given) the Action and its Command, and check them (see
    :func:`check_action`; ``policy`` is the operator's side of platform properties).

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
    return check_action(action_digest, action, command, input_root_digest, policy)


def check_action(
    action_digest: Digest,
    action: re_pb2.Action,
    command: re_pb2.Command,
    input_root_digest: Digest,
    policy: PlatformPolicy = PlatformPolicy(),
) -> ActionSpec:
    """Check every client-controlled field and translate it: InvalidArgument names the
    field (and the path or property) at fault. A field the worker does not support is
    refused rather than ignored, since ignoring it would run a different action than the
    one asked for."""
    _refuse_unhandled_fields(action, "action")
    _refuse_unhandled_fields(command, "command")
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
    outputs = output_specs(working_directory, command.output_paths, command.output_files, command.output_directories)

    unsupported = sorted(set(command.output_node_properties) - NODE_PROPERTIES)
    if unsupported:
        raise InvalidArgument(
            f"command.output_node_properties: unsupported {', '.join(map(repr, unsupported))} "
            f"(this worker records {', '.join(sorted(NODE_PROPERTIES))})"
        )
    directory_format = output_directory_format(command)
    if directory_format not in set(OutputDirectoryFormat):
        # REAPI says to fall back to TREE_ONLY; a value from a newer API is more likely a
        # format the client depends on, and a clear refusal beats a result it cannot read.
        raise InvalidArgument(f"command.output_directory_format {directory_format} is not supported")

    if action.HasField("platform"):
        platform = check_platform(action.platform, policy, "action.platform")
    else:
        platform = check_platform(command.platform, policy, "command.platform")

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
        outputs=outputs,
        timeout=timeout,
        root_mode=platform.root_mode,
        network=platform.network,
        node_properties=frozenset(command.output_node_properties),
        output_directory_format=OutputDirectoryFormat(directory_format),
        uid=platform.uid,
        gid=platform.gid,
    )


def _refuse_unhandled_fields(message: Message, what: str) -> None:
    numbers = unhandled_field_numbers(message)
    if numbers:
        listed = ", ".join(str(n) for n in numbers)
        raise InvalidArgument(
            f"{what} sets field number{'s' if len(numbers) > 1 else ''} {listed}, which this worker does not "
            f"support (from a newer REAPI version than it knows)"
        )


def _checked_digest(proto: re_pb2.Digest, field: str) -> Digest:
    try:
        return Digest.from_proto(proto)
    except InvalidArgument as error:
        raise error.within(field) from None
