"""
A real OCI registry for the image tests: Debian's C{docker-registry} (the
CNCF distribution registry) on loopback, and test images made of random
layers, written as an OCI layout and pushed with C{skopeo}.

The registry logs every response as a JSON line; L{Registry.blob_gets}
counts the blob bodies it served from that log, so a test can assert that
each layer left the registry once however many hosts pulled it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from typing import Any

from attrs import define, field

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def have_tools() -> str | None:
    """None if the registry and skopeo are installed, else what is missing."""
    missing = [t for t in ("docker-registry", "skopeo", "htpasswd") if shutil.which(t) is None]
    if not missing:
        return None
    packages = " ".join({"htpasswd": "apache2-utils"}.get(t, t) for t in missing)
    return f"{', '.join(missing)} not installed: apt-get install {packages} (or: sudo scripts/install-deps.sh)"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@define
class Image:
    """An image written as an OCI layout: what a test checks pulls against."""

    layout: str
    tag: str
    manifest: bytes
    manifest_digest: str
    config_digest: str
    layers: list[str]  # digests of the compressed layer blobs, in order
    diff_ids: list[str]
    files: dict[str, str] = field(factory=dict)  # path in the image -> sha256 of its content

    def blob(self, digest: str) -> bytes:
        with open(os.path.join(self.layout, "blobs", "sha256", digest.split(":", 1)[1]), "rb") as f:
            return f.read()


def make_image(layout: str, layer_sizes: list[int], tag: str = "latest", seed: int = 0) -> Image:
    """
    Write an OCI layout with one random file per layer (incompressible,
    C{layer_sizes} bytes each), gzip'd, with a config whose diff ids are
    right, so containerd unpacks it.
    """
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    def put(data: bytes) -> str:
        digest = _sha(data)
        with open(os.path.join(blobs, digest.split(":")[1]), "wb") as f:
            f.write(data)
        return digest

    layers, diff_ids, descriptors, files = [], [], [], {}
    for n, size in enumerate(layer_sizes):
        content = _random_bytes(size, seed * 1000 + n)
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(f"layer{n}/data.bin")
            info.size = len(content)
            info.mtime = 1_700_000_000
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
        files[f"layer{n}/data.bin"] = hashlib.sha256(content).hexdigest()
        tar_bytes = raw.getvalue()
        diff_ids.append(_sha(tar_bytes))
        blob = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
        digest = put(blob)
        layers.append(digest)
        descriptors.append({"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": len(blob)})
    config = json.dumps(
        {
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["/layer0/data.bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        },
        sort_keys=True,
    ).encode()
    config_digest = put(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": descriptors,
        },
        sort_keys=True,
    ).encode()
    manifest_digest = put(manifest)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest),
                        "annotations": {"org.opencontainers.image.ref.name": tag},
                    }
                ],
            },
            f,
        )
    return Image(layout, tag, manifest, manifest_digest, config_digest, layers, diff_ids, files)


def _random_bytes(size: int, seed: int) -> bytes:
    # incompressible, and the same for the same seed (randbytes takes at most 256 MiB at once)
    rng = random.Random(seed)
    return b"".join(rng.randbytes(min(16 << 20, size - i)) for i in range(0, size, 16 << 20))


@define
class Registry:
    """
    A C{docker-registry} on C{host} (loopback), optionally behind htpasswd
    Basic auth (C{user}/C{password}) or a Bearer token service (C{tokens}), and TLS (a certificate for C{host}
    signed by a test CA whose certificate is C{ca_dir}/ca.crt).
    """

    root: str
    host: str = "127.0.0.1"
    user: str | None = None
    password: str | None = None
    tls: bool = False
    tokens: Any = None  # a L{dragonfly.testing.tokens.TokenService}: Bearer auth instead of htpasswd
    port: int = 0
    proc: Any = None
    ca_dir: str | None = None
    ca_cert: str | None = None
    log_path: str = ""

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.netloc}"

    def start(self) -> Registry:
        os.makedirs(self.root, exist_ok=True)
        self.port = free_port()
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": os.path.join(self.root, "data")}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "dragonfly-test"},
        }
        if self.user:
            htpasswd = os.path.join(self.root, "htpasswd")
            out = subprocess.run(
                ["htpasswd", "-Bbn", self.user, self.password or ""], check=True, capture_output=True, timeout=30
            )
            with open(htpasswd, "wb") as f:
                f.write(out.stdout)
            config["auth"] = {"htpasswd": {"realm": "dragonfly-test", "path": htpasswd}}
        if self.tokens is not None:
            config["auth"] = self.tokens.registry_auth()
        if self.tls:
            from ..daemon.ca import CertificateAuthority, make_ca

            ca_cert, ca_key = make_ca("Dragonfly test registry CA")
            # also for 127.0.0.1: skopeo pushes there (Go never proxies loopback
            # addresses, so proxy tests name the registry 127.1)
            cert, key = CertificateAuthority(ca_cert, ca_key).mint(self.host, "127.0.0.1")
            self.ca_dir = os.path.join(self.root, "certs")
            os.makedirs(self.ca_dir, exist_ok=True)
            self.ca_cert = os.path.join(self.ca_dir, "ca.crt")
            with open(self.ca_cert, "wb") as f:
                f.write(ca_cert)
            # the server's own files apart: skopeo takes any *.key in a cert dir for a client key
            for name, data in (("server.pem", cert), ("server.key", key)):
                with open(os.path.join(self.root, name), "wb") as f:
                    f.write(data)
            config["http"]["tls"] = {
                "certificate": os.path.join(self.root, "server.pem"), "key": os.path.join(self.root, "server.key"),
            }
        config_path = os.path.join(self.root, "config.yml")
        with open(config_path, "w") as f:
            json.dump(config, f)  # JSON is YAML
        self.log_path = os.path.join(self.root, "registry.log")
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", config_path], stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self._log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"docker-registry did not listen: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def push(self, image: Image, name: str, tag: str | None = None) -> str:
        """skopeo copy the OCI layout into this registry; answers the image reference."""
        ref = f"127.0.0.1:{self.port}/{name}:{tag or image.tag}"
        cmd = ["skopeo", "copy", "--quiet", "--preserve-digests", f"oci:{image.layout}:{image.tag}", f"docker://{ref}"]
        if self.tls:
            cmd[2:2] = ["--dest-cert-dir", self.ca_dir or ""]
        else:
            cmd[2:2] = ["--dest-tls-verify=false"]
        if self.user:
            cmd[2:2] = ["--dest-creds", f"{self.user}:{self.password}"]
        elif self.tokens is not None:
            cmd[2:2] = ["--dest-creds", f"{self.tokens.user}:{self.tokens.password}"]
        out = subprocess.run(cmd, capture_output=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"skopeo push failed: {out.stderr.decode(errors='replace')[-1500:]}")
        return f"{self.netloc}/{name}:{tag or image.tag}"

    def corrupt_blob(self, digest: str) -> None:
        """Flip a byte of a stored blob: the registry serves it with the same digest (it does not check)."""
        hexd = digest.split(":", 1)[1]
        path = os.path.join(self.root, "data", "docker", "registry", "v2", "blobs", "sha256", hexd[:2], hexd, "data")
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0xFF]))

    def responses(self) -> list[dict[str, Any]]:
        """Every response the registry logged: method, uri, status, bytes written."""
        out = []
        with open(self.log_path, "rb") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("msg") != "response completed":
                    continue
                out.append(
                    {
                        "method": entry.get("http.request.method"),
                        "uri": entry.get("http.request.uri", ""),
                        "status": entry.get("http.response.status"),
                        "written": entry.get("http.response.written", 0),
                    }
                )
        return out

    def blob_gets(self) -> dict[str, int]:
        """digest -> how many times the registry sent that blob's body (GET, 200)."""
        counts: dict[str, int] = {}
        for r in self.responses():
            if r["method"] == "GET" and r["status"] == 200 and "/blobs/sha256:" in r["uri"]:
                digest = r["uri"].rsplit("/", 1)[1].split("?")[0]
                counts[digest] = counts.get(digest, 0) + 1
        return counts
