"""
The certificate authority dfdaemon uses to intercept HTTPS (C{hijack}).

C{dfdaemon gen-ca} writes a CA certificate and key; an operator makes the
container runtime trust the certificate (docs/dfdaemon.md) and gives both to
dfdaemon (C{--ca-cert}, C{--ca-key}).  For each intercepted host dfdaemon
mints a leaf certificate signed by that CA, valid for the host name or IP
address the client asked for, and keeps it in memory.

Key generation and signing are CPU work: L{LeafMinter.context_for} runs them
in the worker pool and caches the result per host.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.defer import Deferred


class CaError(Exception):
    """The CA files are missing, unreadable or not a CA."""


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Dragonfly"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(common_name: str = "Dragonfly dfdaemon CA", days: int = 3650) -> tuple[bytes, bytes]:
    """A new self-signed CA: (certificate PEM, private key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def write_ca(cert_path: str, key_path: str, common_name: str = "Dragonfly dfdaemon CA") -> None:
    """C{dfdaemon gen-ca}: write a new CA; refuses to overwrite existing files."""
    for path in (cert_path, key_path):
        if os.path.exists(path):
            raise CaError(f"{path} exists; not overwriting it")
    cert, key = make_ca(common_name)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    with open(cert_path, "wb") as f:
        f.write(cert)


#: the kinds of private key that sign X.509 certificates
_ISSUER_KEYS = (
    rsa.RSAPrivateKey, dsa.DSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey,
)


def _spki(key: Any) -> bytes:
    """A public key's SubjectPublicKeyInfo (DER): equal for the same key of any kind."""
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


class CertificateAuthority:
    """A CA loaded from its PEM files, minting leaf certificates."""

    def __init__(self, cert_pem: bytes, key_pem: bytes) -> None:
        try:
            self.cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except ValueError as e:
            raise CaError(f"not a PEM certificate and key: {e}") from None
        if not isinstance(key, _ISSUER_KEYS):
            raise CaError(f"a {type(key).__name__} cannot sign certificates")
        self.key = key
        try:
            ca = self.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise CaError("the certificate is not a CA (basicConstraints CA:TRUE is missing)")
        if _spki(self.cert.public_key()) != _spki(self.key.public_key()):
            raise CaError("the key does not belong to the certificate")
        self.cert_pem = cert_pem

    @classmethod
    def load(cls, cert_path: str, key_path: str) -> CertificateAuthority:
        try:
            with open(cert_path, "rb") as f:
                cert = f.read()
            with open(key_path, "rb") as f:
                key = f.read()
        except OSError as e:
            raise CaError(f"cannot read the CA: {e}") from None
        return cls(cert, key)

    def mint(self, host: str, *more: str, days: int = 30) -> tuple[bytes, bytes]:
        """A leaf certificate for C{host} and C{more} (names or IP addresses): (cert PEM, key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        alts: list[x509.GeneralName] = []
        for name in (host, *more):
            try:
                alts.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alts.append(x509.DNSName(name))
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(host[:64]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(min(now + datetime.timedelta(days=days), self.cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(alts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        return (
            cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem,
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        )


def server_options(cert_chain_pem: bytes, key_pem: bytes) -> Any:
    """Twisted TLS server options for a PEM chain (leaf first) and its key."""
    from twisted.internet import ssl

    certs = x509.load_pem_x509_certificates(cert_chain_pem)
    leaf = ssl.PrivateCertificate.loadPEM(certs[0].public_bytes(serialization.Encoding.PEM) + key_pem)
    chain = [ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)).original for c in certs[1:]]
    return ssl.CertificateOptions(
        privateKey=leaf.privateKey.original, certificate=leaf.original, extraCertChain=chain,
        acceptableProtocols=[b"http/1.1"],
    )


class LeafMinter:
    """Leaf TLS contexts per host, minted in the worker pool, cached."""

    MAX_HOSTS = 1024

    def __init__(self, ca: CertificateAuthority, pool: Any) -> None:
        self.ca = ca
        self._pool = pool
        self._cache: dict[str, Any] = {}
        self._pending: dict[str, list[Deferred]] = {}

    def context_for(self, host: str) -> Deferred:
        if host in self._cache:
            return Deferred.fromCoroutine(_value(self._cache[host]))
        waiting = self._pending.get(host)
        d: Deferred = Deferred()
        if waiting is not None:
            waiting.append(d)
            return d
        self._pending[host] = [d]

        def minted(pem: tuple[bytes, bytes]) -> None:
            options = server_options(*pem)
            if len(self._cache) >= self.MAX_HOSTS:
                self._cache.pop(next(iter(self._cache)))
            self._cache[host] = options
            for w in self._pending.pop(host):
                w.callback(options)

        def failed(f: Any) -> None:
            for w in self._pending.pop(host):
                w.errback(f)

        self._pool.run(self.ca.mint, host).addCallbacks(minted, failed)
        return d


async def _value(v: Any) -> Any:
    return v
