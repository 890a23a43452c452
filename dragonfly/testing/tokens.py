"""
A registry token service for the image tests: the Bearer flow of Docker
registries (a 401 with C{WWW-Authenticate: Bearer realm=...,service=...,scope=...},
then C{GET realm?service=...&scope=...} with Basic credentials for a JWT).

It signs ES256 JWTs with a self-signed certificate that the registry trusts
(C{auth.token.rootcertbundle}), carried in the token's C{x5c} header.  It
runs in a thread of the test process (stdlib HTTP server): test tooling only.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ..daemon.ca import make_ca

SERVICE = "dragonfly-test-registry"
ISSUER = "dragonfly-test-tokens"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    def __init__(self, root: str, user: str, password: str) -> None:
        os.makedirs(root, exist_ok=True)
        cert_pem, key_pem = make_ca("Dragonfly test token signer")
        self.cert_path = os.path.join(root, "token-signer.crt")
        with open(self.cert_path, "wb") as f:
            f.write(cert_pem)
        self._cert_der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
        key = serialization.load_pem_private_key(key_pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)  # make_ca's key signs ES256
        self._key = key
        self.user, self.password = user, password
        self.issued: list[dict[str, Any]] = []
        self.refused = 0
        self._server: ThreadingHTTPServer | None = None

    @property
    def realm(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def registry_auth(self) -> dict[str, Any]:
        """The C{auth} section of the registry's config."""
        return {"token": {"realm": self.realm, "service": SERVICE, "issuer": ISSUER, "rootcertbundle": self.cert_path}}

    def token(self, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and name:
                access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a in ("pull", "push")]})
        now = int(time.time())
        claims = {
            "iss": ISSUER, "sub": self.user, "aud": SERVICE, "exp": now + 600, "nbf": now - 60, "iat": now,
            "jti": _b64(os.urandom(12)), "access": access,
        }
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self._cert_der).decode()]}
        signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
        r, s = decode_dss_signature(self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        self.issued.append(claims)
        return signing_input + "." + _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def start(self) -> TokenService:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                # OAuth2 password grant (containerd tries it first)
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                ok = form.get("username") == [service.user] and form.get("password") == [service.password]
                self._answer(ok and urlsplit(self.path).path == "/token", [s for v in form.get("scope", []) for s in v.split(" ")])

            def do_GET(self) -> None:  # noqa: N802 (stdlib's name)
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                want = "Basic " + base64.b64encode(f"{service.user}:{service.password}".encode()).decode()
                ok = parts.path == "/token" and self.headers.get("Authorization") == want
                self._answer(ok, [s for v in query.get("scope", []) for s in v.split(" ")])

            def _answer(self, ok: bool, scopes: list[str]) -> None:
                if not ok:
                    service.refused += 1
                    body = b'{"errors": [{"code": "UNAUTHORIZED"}]}'
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="dragonfly-test-tokens"')
                else:
                    token = service.token(scopes)
                    body = json.dumps({"token": token, "access_token": token, "expires_in": 600}).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
