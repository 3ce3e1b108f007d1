"""URL parsing and option checks of storage/channels.py (no server needed)."""

from __future__ import annotations

import pytest

from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.storage.channels import ConnectionOptions, Endpoint, parse_url


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("grpc://127.0.0.1:50051", Endpoint("127.0.0.1:50051", tls=False)),
        ("grpc://cas.example:8980/", Endpoint("cas.example:8980", tls=False)),
        ("http://cas.example", Endpoint("cas.example:80", tls=False)),
        ("grpcs://cas.example", Endpoint("cas.example:443", tls=True)),
        ("https://cas.example:8443", Endpoint("cas.example:8443", tls=True)),
        ("GRPCS://cas.example:1", Endpoint("cas.example:1", tls=True)),
        ("grpc://[::1]:50051", Endpoint("[::1]:50051", tls=False)),
        ("unix:/run/cas.sock", Endpoint("unix:/run/cas.sock", tls=False)),
        ("unix:///run/cas.sock", Endpoint("unix:/run/cas.sock", tls=False)),
    ],
)
def test_accepted_urls(url: str, endpoint: Endpoint) -> None:
    assert parse_url(url) == endpoint


@pytest.mark.parametrize(
    "url",
    [
        "",
        "127.0.0.1:50051",  # no scheme
        "ftp://cas.example:21",
        "grpc://cas.example",  # grpc has no well-known port
        "grpc://cas.example:notaport",
        "grpc://cas.example:99999",
        "grpc://:50051",
        "grpc://cas.example:50051/main",  # an instance name smuggled into the path
        "grpc://cas.example:50051?instance=main",
        "grpcs://user:secret@cas.example",  # credentials in a URL end up in logs
        "unix:relative.sock",
        "unix://relative.sock",
    ],
)
def test_refused_urls(url: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_url(url)


def test_tls_files_on_a_plaintext_url_are_a_mistake() -> None:
    with pytest.raises(InvalidArgument, match="ca_cert_file"):
        ConnectionOptions("grpc://127.0.0.1:1", ca_cert_file="/etc/ssl/ca.pem")


def test_a_client_certificate_needs_its_key() -> None:
    with pytest.raises(InvalidArgument, match="together"):
        ConnectionOptions("grpcs://cas.example", client_cert_file="/tmp/cert.pem")


def test_a_message_limit_below_grpcs_default_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="max_message_bytes"):
        ConnectionOptions("grpc://127.0.0.1:1", max_message_bytes=1024)
