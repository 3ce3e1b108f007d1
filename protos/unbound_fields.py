"""REAPI fields newer than the generated bindings, read and written by field number.

The messages come from ``buildgrid-common`` 0.5.2 (the newest on PyPI), whose
``remote_execution.proto`` predates REAPI v2.3's output directory formats:

* ``Command.output_directory_format = 9`` (an enum: TREE_ONLY 0, DIRECTORY_ONLY 1,
  TREE_AND_DIRECTORY 2), which BuildStream 2 sets to DIRECTORY_ONLY;
* ``OutputDirectory.root_directory_digest = 5`` (a ``Digest``), which it reads back.

Protobuf keeps fields it has no descriptor for as *unknown fields* and writes them back
when the message is serialized, merged or packed into an ``Any``. So these fields are read
from a parsed message's unknown-field set and written by merging their wire encoding into
the message: the bytes on the wire are exactly what bindings with the field would produce.
Generating our own copy of the proto instead would register a second
``build.bazel.remote.execution.v2`` in the descriptor pool beside buildgrid-common's.
When the bindings gain these fields, this module becomes plain attribute access.
"""

from __future__ import annotations

import enum

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from . import re_pb2

COMMAND_OUTPUT_DIRECTORY_FORMAT = 9
OUTPUT_DIRECTORY_ROOT_DIRECTORY_DIGEST = 5

_VARINT = 0
_LENGTH_DELIMITED = 2

#: Field numbers of each message that this module reads or writes although the bindings
#: lack them: they are "known" to the worker, not unknown fields of the client's.
_HANDLED: dict[str, frozenset[int]] = {
    re_pb2.Command.DESCRIPTOR.full_name: frozenset({COMMAND_OUTPUT_DIRECTORY_FORMAT}),
    re_pb2.OutputDirectory.DESCRIPTOR.full_name: frozenset({OUTPUT_DIRECTORY_ROOT_DIRECTORY_DIGEST}),
}


class OutputDirectoryFormat(enum.IntEnum):
    """``Command.OutputDirectoryFormat``: how output directories are reported."""

    TREE_ONLY = 0
    DIRECTORY_ONLY = 1
    TREE_AND_DIRECTORY = 2

    @property
    def tree(self) -> bool:
        return self is not OutputDirectoryFormat.DIRECTORY_ONLY

    @property
    def directory(self) -> bool:
        return self is not OutputDirectoryFormat.TREE_ONLY


def unhandled_field_numbers(message: Message) -> list[int]:
    """Numbers of the fields set in ``message`` (top level only) that neither the bindings
    nor this module know, sorted: fields a newer client sent that the worker would ignore."""
    handled = _HANDLED.get(message.DESCRIPTOR.full_name, frozenset())
    return sorted({field.field_number for field in UnknownFieldSet(message)} - handled)


def output_directory_format(command: re_pb2.Command) -> int:
    """The raw ``output_directory_format`` value of ``command`` (0, TREE_ONLY, when unset).
    The last occurrence wins, as protobuf's own parser does for a scalar."""
    value = 0
    for field in UnknownFieldSet(command):
        if field.field_number == COMMAND_OUTPUT_DIRECTORY_FORMAT and field.wire_type == _VARINT:
            value = field.data
    return value


def set_output_directory_format(command: re_pb2.Command, value: int) -> None:
    """Set ``output_directory_format`` (for clients and tests: the worker only reads it).
    Only call on a command that does not have it yet."""
    if value:
        command.MergeFromString(_varint((COMMAND_OUTPUT_DIRECTORY_FORMAT << 3) | _VARINT) + _varint(value))


def set_root_directory_digest(output: re_pb2.OutputDirectory, digest: re_pb2.Digest) -> None:
    """Set ``root_directory_digest`` on ``output`` (once: a second call would add a second
    occurrence, which parsers merge)."""
    encoded = digest.SerializeToString()
    tag = (OUTPUT_DIRECTORY_ROOT_DIRECTORY_DIGEST << 3) | _LENGTH_DELIMITED
    output.MergeFromString(_varint(tag) + _varint(len(encoded)) + encoded)


def root_directory_digest(output: re_pb2.OutputDirectory) -> re_pb2.Digest | None:
    """``output.root_directory_digest``, or None when it is not set."""
    found: re_pb2.Digest | None = None
    for field in UnknownFieldSet(output):
        if field.field_number == OUTPUT_DIRECTORY_ROOT_DIRECTORY_DIGEST and field.wire_type == _LENGTH_DELIMITED:
            found = found or re_pb2.Digest()
            found.MergeFromString(field.data)  # repeated occurrences merge, as protobuf's do
    return found


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)
