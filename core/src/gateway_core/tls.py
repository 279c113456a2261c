"""Per-cluster TLS credentials: one fresh self-signed certificate and key for every cluster.

Owns `new_cluster_credentials`; the same certificate is the CA and the identity of scheduler,
workers and client (mutual TLS), and names the SNI ``daskgateway-<cluster>`` the proxy routes on.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SNI_PREFIX = "daskgateway-"
"""Prefix of the TLS server name a client sends for a cluster (the SNI route drops it)."""

VALIDITY = datetime.timedelta(days=365)
CLOCK_SKEW = datetime.timedelta(hours=1)


def new_cluster_credentials(
    cluster_name: str, *, validity: datetime.timedelta = VALIDITY
) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a self-signed certificate for ``cluster_name``, both PEM.

    The certificate is valid from an hour ago (clock skew) for ``validity``; it is a CA (so a
    peer can trust it directly) and allowed for both server and client authentication. Its
    subject alternative names are ``daskgateway-<cluster_name>`` and ``localhost``.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    server_name = f"{SNI_PREFIX}{cluster_name}"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)])
    now = datetime.datetime.now(datetime.UTC)
    public_key = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(server_name), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem
