"""
Real container runtimes for the e2e tests: a Docker engine of its own
(Debian's C{docker.io}) and podman (Debian's C{podman}), each with every
directory under a temporary root and nothing left running afterwards.

dockerd runs without a network of its own (C{--iptables=false
--bridge=none}), on the vfs storage driver, with its own data-root,
exec-root, pidfile and unix socket, and the containerd it starts for itself
under its exec-root.  podman needs no daemon: C{--root}/C{--runroot} hold
its storage and C{--registries-conf} its mirrors.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

from attrs import define, field

INSTALL = "apt-get install {pkg}   (or: sudo scripts/install-deps.sh)"


def have_dockerd() -> str | None:
    """None if a Docker engine can run here, else why not (naming the install command)."""
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        return "dockerd not installed (Debian package docker.io): " + INSTALL.format(pkg="docker.io")
    if os.geteuid() != 0:
        return "dockerd needs root"
    return None


def have_podman() -> str | None:
    if shutil.which("podman") is None:
        return "podman not installed (Debian package podman): " + INSTALL.format(pkg="podman")
    if os.geteuid() != 0:
        return "podman here runs as root (its storage under a temporary --root)"
    return None


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")}
    env.update(extra or {})
    return env


@define
class Dockerd:
    """
    One Docker engine.  C{daemon_json}: its config file (written by the test,
    e.g. by C{dfdaemon setup docker}); C{env}: extra environment (C{HTTPS_PROXY}).
    """

    root: str = field(factory=lambda: tempfile.mkdtemp(prefix="dfdk-"))  # short: a unix socket path
    env: dict[str, str] = field(factory=dict)
    proc: Any = None

    @property
    def socket(self) -> str:
        return os.path.join(self.root, "docker.sock")

    @property
    def daemon_json(self) -> str:
        return os.path.join(self.root, "daemon.json")

    def start(self) -> Dockerd:
        if not os.path.exists(self.daemon_json):
            with open(self.daemon_json, "w") as f:
                f.write("{}\n")
        log = open(os.path.join(self.root, "dockerd.log"), "wb")
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", os.path.join(self.root, "data"), "--exec-root", os.path.join(self.root, "exec"),
             "--pidfile", os.path.join(self.root, "dockerd.pid"), "-H", f"unix://{self.socket}",
             "--config-file", self.daemon_json, "--iptables=false", "--ip6tables=false", "--bridge=none",
             "--storage-driver=vfs"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env=_clean_env(self.env),
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited: {self.log_tail()}")
            if os.path.exists(self.socket):
                if subprocess.run(self.docker("version"), capture_output=True, timeout=20).returncode == 0:
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"dockerd did not come up: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.root, "dockerd.log"), "rb") as f:
                return f.read()[-3000:].decode(errors="replace")
        except OSError:
            return ""

    def docker(self, *args: str) -> list[str]:
        return ["docker", "-H", f"unix://{self.socket}", *args]

    def inspect(self, ref: str) -> dict[str, Any]:
        out = subprocess.run(self.docker("image", "inspect", ref), capture_output=True, check=True, timeout=60)
        return json.loads(out.stdout)[0]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # dockerd's own containerd (a child in its session) goes with it
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


@define
class Podman:
    """podman with its storage under C{root} and mirrors from C{registries_conf}."""

    root: str = field(factory=lambda: tempfile.mkdtemp(prefix="dfpm-"))

    @property
    def registries_conf(self) -> str:
        return os.path.join(self.root, "registries.conf")

    def podman(self, *args: str) -> list[str]:
        return [
            "podman", "--root", os.path.join(self.root, "storage"), "--runroot", os.path.join(self.root, "run"),
            "--storage-driver", "vfs", "--registries-conf", self.registries_conf, "--events-backend", "file",
            "--cgroup-manager", "cgroupfs", "--tmpdir", os.path.join(self.root, "tmp"), *args,
        ]

    def env(self) -> dict[str, str]:
        # podman makes its --tmpdir when it first needs it; an image copy stats TMPDIR before that
        tmp = os.path.join(self.root, "tmp")
        os.makedirs(tmp, exist_ok=True)
        return _clean_env({"TMPDIR": tmp})

    def inspect(self, ref: str) -> dict[str, Any]:
        out = subprocess.run(self.podman("image", "inspect", ref), capture_output=True, check=True, timeout=60, env=self.env())
        return json.loads(out.stdout)[0]

    def stop(self) -> None:
        # vfs layers are plain directories; nothing is mounted or left running
        subprocess.run(self.podman("system", "reset", "--force"), capture_output=True, timeout=60, env=self.env())
        shutil.rmtree(self.root, ignore_errors=True)
