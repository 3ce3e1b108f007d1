"""Channels from storage/channels.py against the fake CAS server: TLS with a private CA,
a client certificate, a Unix socket, and the bearer token (re-read when its file changes)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import grpc
import pytest

from conftest import require_tool
from fakes.cas_server import FakeCasServer
from reapi_worker.protos.errors import InvalidArgument, Unavailable
from reapi_worker.storage.channels import ConnectionOptions, open_channel
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.remote_cas import RemoteCAS, RemoteOptions
from reapi_worker.storage.retry import RetryPolicy


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for localhost / 127.0.0.1: (cert path, key path)."""
    openssl = require_tool("openssl")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", key, "-out", cert, "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return cert, key


def read_file(path: str) -> bytes:
    with open(path, "rb") as stream:
        return stream.read()


def round_trip(options: ConnectionOptions) -> None:
    channel = open_channel(options)
    try:
        with RemoteCAS(channel) as cas:
            digest = cas.write(b"over the channel")
            assert cas.read(digest) == b"over the channel"
    finally:
        channel.close()


@pytest.fixture
def tls_server(certificate: tuple[str, str]) -> Iterator[FakeCasServer]:
    cert, key = certificate
    credentials = grpc.ssl_server_credentials([(read_file(key), read_file(cert))])
    server = FakeCasServer()
    server.start("127.0.0.1:0", credentials)
    yield server
    server.stop()


def test_tls_with_a_private_ca_and_a_rotated_token(
    tls_server: FakeCasServer, certificate: tuple[str, str], tmp_path: os.PathLike[str]
) -> None:
    token = os.path.join(tmp_path, "token")
    with open(token, "w") as stream:
        stream.write("first-token\n")
    options = ConnectionOptions(
        f"grpcs://{tls_server.address}", ca_cert_file=certificate[0], access_token_file=token
    )
    round_trip(options)
    assert {m.get("authorization") for m in tls_server.metadata} == {"Bearer first-token"}

    with open(token, "w") as stream:
        stream.write("second-token-longer\n")
    tls_server.metadata.clear()
    round_trip(options)
    assert {m.get("authorization") for m in tls_server.metadata} == {"Bearer second-token-longer"}


def test_tls_refuses_a_server_the_ca_does_not_vouch_for(tls_server: FakeCasServer) -> None:
    # No CA file: the system roots do not know our self-signed certificate.
    channel = open_channel(ConnectionOptions(f"grpcs://{tls_server.address}"))
    try:
        with RemoteCAS(channel, RemoteOptions(retry=RetryPolicy(max_attempts=1))) as cas:
            with pytest.raises(Unavailable):
                cas.read(Digest.of_bytes(b"x"))
    finally:
        channel.close()
    assert tls_server.calls == {}


def test_plaintext_over_a_unix_socket_with_a_token(tmp_path: os.PathLike[str]) -> None:
    socket_path = os.path.join(tmp_path, "cas.sock")
    token = os.path.join(tmp_path, "token")
    with open(token, "w") as stream:
        stream.write("tok")
    server = FakeCasServer()
    server.start(f"unix:{socket_path}")
    try:
        round_trip(ConnectionOptions(f"unix://{socket_path}", access_token_file=token))
    finally:
        server.stop()
    assert server.metadata and all(m.get("authorization") == "Bearer tok" for m in server.metadata)


def test_a_missing_token_file_is_reported_when_the_channel_is_opened(tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(tmp_path, "absent")
    with pytest.raises(InvalidArgument, match="absent"):
        open_channel(ConnectionOptions("grpc://127.0.0.1:1", access_token_file=missing))


def test_mutual_tls_sends_the_client_certificate(certificate: tuple[str, str]) -> None:
    cert, key = certificate
    credentials = grpc.ssl_server_credentials(
        [(read_file(key), read_file(cert))], root_certificates=read_file(cert), require_client_auth=True
    )
    server = FakeCasServer()
    server.start("127.0.0.1:0", credentials)
    try:
        url = f"grpcs://{server.address}"
        round_trip(ConnectionOptions(url, ca_cert_file=cert, client_cert_file=cert, client_key_file=key))
        calls = sum(server.calls.values())

        channel = open_channel(ConnectionOptions(url, ca_cert_file=cert))  # no client certificate
        try:
            with RemoteCAS(channel, RemoteOptions(retry=RetryPolicy(max_attempts=1))) as cas:
                with pytest.raises(Unavailable):
                    cas.read(Digest.of_bytes(b"x"))
        finally:
            channel.close()
        assert sum(server.calls.values()) == calls
    finally:
        server.stop()
