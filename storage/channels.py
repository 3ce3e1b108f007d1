"""gRPC channels to a remote CAS (or scheduler) from a URL and a few options.

Accepted URLs (anything else is refused with InvalidArgument where it enters):

* ``grpc://HOST:PORT``, ``http://HOST[:PORT]`` — plaintext (http defaults to port 80);
* ``grpcs://HOST[:PORT]``, ``https://HOST[:PORT]`` — TLS (default port 443), verified
  against ``ca_cert_file`` or the system roots, with an optional client certificate;
* ``unix:/ABS/PATH`` or ``unix:///ABS/PATH`` — plaintext over a Unix socket.

A URL never carries an instance name, a path, a query or user info: instance names are
passed to the clients separately, and a URL that looks like it holds one is a mistake
better reported at start-up than as NOT_FOUND on every call.

The access token, if configured, is re-read whenever its file changes (tokens are often
rotated by an agent) and sent as ``authorization: Bearer TOKEN`` metadata on every call. It
is added by an interceptor rather than gRPC call credentials because gRPC refuses call
credentials on plaintext channels, and a loopback or Unix-socket CAS is usually plaintext.
A token over plaintext to a remote host is sent in the clear; that is the operator's choice.
"""

from __future__ import annotations

import collections
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from reapi_worker.protos.errors import InvalidArgument

#: gRPC's default receive limit, and what a stock REAPI server (BuildGrid) accepts per
#: message. Request packing (``remote_cas``) is sized against this, not the channel limit.
GRPC_DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# Our own limits are larger than the server's so that a response a little above 4 MiB
# (a full BatchReadBlobs answer plus its per-blob framing) is still accepted.
_DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_PLAINTEXT_SCHEMES: dict[str, int | None] = {"grpc": None, "http": 80}
_TLS_SCHEMES: dict[str, int | None] = {"grpcs": 443, "https": 443}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to connect: a gRPC target string (``host:port`` or ``unix:/path``) and
    whether to use TLS."""

    target: str
    tls: bool


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """How to reach a server. Validated on construction (InvalidArgument).

    ``url``: see the module docstring. ``ca_cert_file``: PEM roots to verify the server
    (TLS only; default: the system roots). ``client_cert_file`` / ``client_key_file``: PEM
    client certificate and key for mutual TLS (both or neither; TLS only).
    ``tls_server_name``: the name to check the server certificate against when it differs
    from the URL's host (TLS only). ``access_token_file``: a file holding a bearer token.
    ``max_message_bytes``: this channel's send and receive limit per message.
    """

    url: str
    ca_cert_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    tls_server_name: str | None = None
    access_token_file: str | None = None
    max_message_bytes: int = _DEFAULT_MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        endpoint = parse_url(self.url)
        tls_only = {
            "ca_cert_file": self.ca_cert_file,
            "client_cert_file": self.client_cert_file,
            "client_key_file": self.client_key_file,
            "tls_server_name": self.tls_server_name,
        }
        if not endpoint.tls:
            given = [name for name, value in tls_only.items() if value is not None]
            if given:
                raise InvalidArgument(f"{', '.join(given)} given for plaintext URL {self.url!r}")
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise InvalidArgument("client_cert_file and client_key_file must be given together")
        if self.max_message_bytes < GRPC_DEFAULT_MAX_MESSAGE_BYTES:
            raise InvalidArgument(
                f"max_message_bytes {self.max_message_bytes} is below gRPC's default "
                f"{GRPC_DEFAULT_MAX_MESSAGE_BYTES}; full CAS batches would be refused"
            )

    @property
    def endpoint(self) -> Endpoint:
        return parse_url(self.url)


def parse_url(url: str) -> Endpoint:
    """The :class:`Endpoint` of a server URL. Raises InvalidArgument for anything else
    than the forms in the module docstring."""
    if not isinstance(url, str) or not url:
        raise InvalidArgument(f"invalid server URL {url!r}: empty")
    if url.startswith("unix:"):
        path = url[len("unix:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path.startswith("/") or "\0" in path:
            raise InvalidArgument(f"invalid server URL {url!r}: expected unix:/ABSOLUTE/PATH")
        return Endpoint(target=f"unix:{path}", tls=False)

    parsed = urllib.parse.urlsplit(url)
    scheme = parsed.scheme.lower()
    default_port: int | None
    if scheme in _TLS_SCHEMES:
        tls, default_port = True, _TLS_SCHEMES[scheme]
    elif scheme in _PLAINTEXT_SCHEMES:
        tls, default_port = False, _PLAINTEXT_SCHEMES[scheme]
    else:
        raise InvalidArgument(
            f"invalid server URL {url!r}: scheme must be grpc, grpcs, http, https or unix"
        )
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise InvalidArgument(
            f"invalid server URL {url!r}: no path, query or fragment allowed "
            "(an instance name is configured separately)"
        )
    if parsed.username is not None or parsed.password is not None:
        raise InvalidArgument(f"invalid server URL {url!r}: user info is not allowed")
    port: int | None
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError as error:  # a port that is not a number or out of range
        raise InvalidArgument(f"invalid server URL {url!r}: {error}") from None
    if not host:
        raise InvalidArgument(f"invalid server URL {url!r}: no host")
    if port is None:
        if default_port is None:
            raise InvalidArgument(f"invalid server URL {url!r}: {scheme}:// needs an explicit port")
        port = default_port
    # urlsplit drops the brackets of an IPv6 literal; gRPC targets need them back.
    host_part = f"[{host}]" if ":" in host else host
    return Endpoint(target=f"{host_part}:{port}", tls=tls)


def open_channel(options: ConnectionOptions) -> grpc.Channel:
    """A new channel for ``options``. The caller owns it and closes it.

    Certificate and token files are read now, so a missing or unreadable file is reported
    at start-up (InvalidArgument naming the file), not on the first call. gRPC connects
    lazily: an unreachable server shows up as UNAVAILABLE on the first call.
    """
    endpoint = options.endpoint
    channel_args: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", options.max_message_bytes),
        ("grpc.max_receive_message_length", options.max_message_bytes),
    ]
    if endpoint.tls:
        if options.tls_server_name:
            channel_args.append(("grpc.ssl_target_name_override", options.tls_server_name))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read_optional(options.ca_cert_file, "CA certificate"),
            private_key=_read_optional(options.client_key_file, "client key"),
            certificate_chain=_read_optional(options.client_cert_file, "client certificate"),
        )
        channel = grpc.secure_channel(endpoint.target, credentials, options=channel_args)
    else:
        channel = grpc.insecure_channel(endpoint.target, options=channel_args)
    if options.access_token_file is not None:
        token = _TokenFile(options.access_token_file)
        token.metadata()  # fail now on a missing or empty file
        channel = grpc.intercept_channel(channel, _BearerTokenInterceptor(token.metadata))
    return channel


def _read_optional(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as error:
        raise InvalidArgument(f"reading {what} file {path!r}: {error.strerror or error}") from None


class _TokenFile:
    """A bearer token kept in a file, re-read when the file's mtime or size changes.

    Thread-safe. Raises InvalidArgument if the file cannot be read or is empty.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._metadata: tuple[tuple[str, str], ...] = ()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        with self._lock:
            try:
                stat = os.stat(self._path)
                stamp = (stat.st_mtime_ns, stat.st_size)
                if stamp != self._stamp:
                    with open(self._path, encoding="utf-8") as stream:
                        token = stream.read().strip()
                    if not token:
                        raise InvalidArgument(f"access token file {self._path!r} is empty")
                    self._metadata = (("authorization", f"Bearer {token}"),)
                    self._stamp = stamp
            except (OSError, UnicodeDecodeError) as error:
                raise InvalidArgument(f"reading access token file {self._path!r}: {error}") from None
            return self._metadata


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    """A mutable-by-copy ClientCallDetails (gRPC's own is private)."""


class _BearerTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the token metadata to every call, whatever its shape."""

    def __init__(self, metadata: Callable[[], tuple[tuple[str, str], ...]]) -> None:
        self._metadata = metadata

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), *self._metadata()]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request_iterator: Iterator[Any]
    ) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request_iterator: Iterator[Any]
    ) -> Any:
        return continuation(self._details(details), request_iterator)
