"""REAPI v2 digests: SHA-256 hex of the bytes plus their size.

Messages are digested over their deterministic serialization so that the same
Directory always gets the same digest, whichever process built it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import BinaryIO

from google.protobuf.message import Message

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import InvalidArgument

HASH_HEX_LENGTH = 64
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


@dataclass(frozen=True, order=True, slots=True)
class Digest:
    """A checked REAPI digest. Construct with :meth:`of_bytes`, :meth:`from_proto` or
    :meth:`parse`; a hand-built one is validated too."""

    hash: str
    size_bytes: int

    def __post_init__(self) -> None:
        if not isinstance(self.hash, str) or not _HASH_RE.fullmatch(self.hash):
            raise InvalidArgument(f"invalid digest hash {self.hash!r}: expected 64 lowercase hex digits")
        if not isinstance(self.size_bytes, int) or self.size_bytes < 0:
            raise InvalidArgument(f"invalid digest size {self.size_bytes!r} for {self.hash}")

    @classmethod
    def of_bytes(cls, data: bytes) -> "Digest":
        return cls(hashlib.sha256(data).hexdigest(), len(data))

    @classmethod
    def of_message(cls, message: Message) -> "Digest":
        return cls.of_bytes(serialize(message))

    @classmethod
    def of_file(cls, stream: BinaryIO) -> "Digest":
        """Digest a file object from its current position to its end."""
        hasher = hashlib.sha256()
        size = 0
        while chunk := stream.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
        return cls(hasher.hexdigest(), size)

    @classmethod
    def from_proto(cls, proto: re_pb2.Digest) -> "Digest":
        return cls(proto.hash, proto.size_bytes)

    @classmethod
    def parse(cls, text: str) -> "Digest":
        """Parse ``HASH/SIZE`` (the form used on command lines and in resource names)."""
        hash_, sep, size = text.strip().partition("/")
        if not sep or not size.isdigit():
            raise InvalidArgument(f"invalid digest {text!r}: expected HASH/SIZE")
        return cls(hash_, int(size))

    def to_proto(self) -> re_pb2.Digest:
        return re_pb2.Digest(hash=self.hash, size_bytes=self.size_bytes)

    def __str__(self) -> str:
        return f"{self.hash}/{self.size_bytes}"


EMPTY_DIGEST = Digest.of_bytes(b"")


def serialize(message: Message) -> bytes:
    """Deterministic serialization: the bytes a message is digested and stored as."""
    return message.SerializeToString(deterministic=True)
