"""
A private containerd for the image tests: its own root, state and socket
under a temp dir (it runs as root), pulling with C{ctr image pull
--hosts-dir DIR} where C{DIR/<registry>/hosts.toml} names a mirror.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import Any

from attrs import define


def have_containerd() -> str | None:
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        return "containerd not installed: apt-get install containerd (or: sudo scripts/install-deps.sh)"
    if os.geteuid() != 0:
        return "containerd needs root"
    return None


def write_hosts_toml(hosts_dir: str, registry: str, mirror: str, server: str, ca: str | None = None) -> str:
    """
    C{hosts_dir/<registry>/hosts.toml}: pull and resolve through C{mirror}
    (an http(s) URL), C{server} being the registry itself.
    """
    d = os.path.join(hosts_dir, registry)
    os.makedirs(d, exist_ok=True)
    lines = [f'server = "{server}"', "", f'[host."{mirror}"]', '  capabilities = ["pull", "resolve"]']
    if ca:
        lines.append(f'  ca = "{ca}"')
    path = os.path.join(d, "hosts.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def run_pulls(commands: list[list[str]], logdir: str, timeout: float = 600.0) -> list[float]:
    """
    Run C{commands} (C{ctr image pull}s) at once and return the seconds each
    took, each measured to its own exit.  Each one's output goes to a file in
    C{logdir}, not a pipe: C{ctr} redraws its progress table ten times a
    second (about 12 KiB/s), so a pull of more than a few seconds whose pipe
    nobody reads fills it (64 KiB) and stops before unpacking until it is
    read.  Raises C{RuntimeError} with the tail of a failed one's output.
    """
    os.makedirs(logdir, exist_ok=True)
    outs = [os.path.join(logdir, f"pull-{i}.out") for i in range(len(commands))]
    started = time.monotonic()
    procs = []
    for cmd, out in zip(commands, outs, strict=True):
        with open(out, "wb") as f:
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT))
    times: list[float | None] = [None] * len(procs)
    try:
        while None in times:
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"pulls still running after {timeout} s: "
                                   f"{[p.args for p, t in zip(procs, times, strict=True) if t is None]}")
            for i, p in enumerate(procs):
                if times[i] is None and p.poll() is not None:
                    times[i] = time.monotonic() - started
            time.sleep(0.01)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0:
            with open(out, "rb") as f:
                raise RuntimeError(f"{p.args!r}: exit {p.returncode}: {f.read()[-2000:].decode(errors='replace')}")
    return [t for t in times if t is not None]


@define
class Containerd:
    root: str
    proc: Any = None

    @property
    def socket(self) -> str:
        return os.path.join(self.root, "containerd.sock")

    def start(self) -> Containerd:
        os.makedirs(self.root, exist_ok=True)
        config = os.path.join(self.root, "config.toml")
        with open(config, "w") as f:
            f.write(
                f"""version = 2
root = "{self.root}/root"
state = "{self.root}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.root}/opt"
"""
            )
        log = open(os.path.join(self.root, "containerd.log"), "wb")
        self.proc = subprocess.Popen(
            ["containerd", "--config", config], stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited: {self.log_tail()}")
            if os.path.exists(self.socket):
                r = subprocess.run(self.ctr("version"), capture_output=True, timeout=10)
                if r.returncode == 0:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"containerd did not come up: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.root, "containerd.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def ctr(self, *args: str) -> list[str]:
        return ["ctr", "-a", self.socket, "-n", "dftest", *args]

    def pull_command(self, ref: str, hosts_dir: str, user: str | None = None) -> list[str]:
        cmd = self.ctr("image", "pull", "--snapshotter", "native", "--hosts-dir", hosts_dir)
        if user:
            cmd += ["--user", user]
        return cmd + [ref]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # the native snapshotter leaves read-only trees; nothing is mounted
        shutil.rmtree(self.root, ignore_errors=True)
