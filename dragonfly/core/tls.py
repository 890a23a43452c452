"""TLS trust for outgoing HTTPS (origins, registries): the system's, or a CA bundle given by the operator."""

from __future__ import annotations

from typing import Any

from twisted.internet import ssl
from twisted.web.client import BrowserLikePolicyForHTTPS


def pem_certificates(pem: bytes) -> list[bytes]:
    """Each PEM certificate block of C{pem}; ValueError if there is none."""
    marker = b"-----END CERTIFICATE-----"
    blocks = [b[b.index(b"-----BEGIN CERTIFICATE-----"):] + marker for b in pem.split(marker) if b"-----BEGIN CERTIFICATE-----" in b]
    if not blocks:
        raise ValueError("no PEM certificate in the file")
    return blocks


def https_policy(ca_file: str | None) -> Any:
    """
    A policy that verifies servers (service-identity hostname checks) against
    the system's roots, or only against the CA certificates in C{ca_file}.
    Raises ValueError with a readable reason for a bad file.
    """
    if not ca_file:
        return BrowserLikePolicyForHTTPS()
    try:
        with open(ca_file, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ValueError(str(e)) from None
    try:
        roots = [ssl.Certificate.loadPEM(block) for block in pem_certificates(pem)]
    except ValueError:
        raise
    except Exception as e:  # OpenSSL's errors
        raise ValueError(f"not a PEM certificate ({e})") from None
    return BrowserLikePolicyForHTTPS(trustRoot=ssl.trustRootFromCertificates(roots))
