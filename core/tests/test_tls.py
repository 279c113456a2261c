"""Tests of the per-cluster TLS credentials.

Covers the certificate's names and extensions and a real mutual-TLS handshake on loopback.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from gateway_core.tls import new_cluster_credentials

pytestmark = pytest.mark.unit


def test_certificate_names_and_extensions() -> None:
    cert_pem, key_pem = new_cluster_credentials("abc123")
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert cert.public_key() == key.public_key()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "daskgateway-abc123" in san.get_values_for_type(x509.DNSName)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert x509.ExtendedKeyUsageOID.CLIENT_AUTH in eku
    now = datetime.datetime.now(datetime.UTC)
    assert cert.not_valid_before_utc < now - datetime.timedelta(minutes=30)
    assert cert.not_valid_after_utc > now + datetime.timedelta(days=300)


def test_each_cluster_gets_fresh_credentials_quickly() -> None:
    t0 = time.perf_counter()
    first = new_cluster_credentials("one")
    second = new_cluster_credentials("one")
    assert time.perf_counter() - t0 < 1.0
    assert first[0] != second[0] and first[1] != second[1]


async def test_mutual_tls_handshake_with_the_cluster_name(tmp_path: Path) -> None:
    cert_pem, key_pem = new_cluster_credentials("c1")
    cert_file, key_file = tmp_path / "dask.crt", tmp_path / "dask.pem"
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(key_pem)

    def context(purpose: ssl.Purpose) -> ssl.SSLContext:
        ctx = ssl.create_default_context(purpose, cafile=str(cert_file))
        ctx.load_cert_chain(str(cert_file), str(key_file))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        return ctx

    server_ctx = context(ssl.Purpose.CLIENT_AUTH)
    client_ctx = context(ssl.Purpose.SERVER_AUTH)
    peers: list[object] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peercert"))
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="daskgateway-c1"
        )
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
    assert peers and peers[0], "the server saw the client's certificate"

    other_cert, _ = new_cluster_credentials("c2")
    other_file = tmp_path / "other.crt"
    other_file.write_bytes(other_cert)
    stranger = ssl.create_default_context(cafile=str(other_file))
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(ssl.SSLError):
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=stranger, server_hostname="daskgateway-c1"
            )
