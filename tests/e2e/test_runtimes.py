"""
Docker engines and podman pulling through dfdaemon, against the real
registry: three emulated hosts, each with its own dfpeer, dfdaemon and
runtime; the runtime's mirror configuration is written by C{dfdaemon setup};
every blob is checked by digest and the registry sends each blob once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from dragonfly.testing.docker import Dockerd, Podman, have_dockerd, have_podman
from dragonfly.testing.registry import Registry, have_tools, make_image
from dragonfly.testing.swarm import Swarm, get_json

pytestmark = pytest.mark.e2e

MiB = 1 << 20
LAYERS = [12 * MiB, 8 * MiB, 4 * MiB]  # a 3-layer image

missing = have_tools()
if missing:
    pytest.skip(missing, allow_module_level=True)

DFDAEMON = os.path.join(os.path.dirname(sys.executable), "dfdaemon")


def setup_runtime(*args):
    r = subprocess.run([DFDAEMON, "setup", *args], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


def counters(url):
    return get_json(url + "/_dfdaemon/status")["counters"]


def run_all(commands, env=None, envs=None):
    """Run the commands at once (C{envs}: one environment per command); each one's seconds from the common start."""
    started = time.monotonic()
    envs = envs or [env] * len(commands)
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=e) for c, e in zip(commands, envs)]
    times = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        times.append(time.monotonic() - started)
        assert p.returncode == 0, out.decode(errors="replace")[-2000:]
    return times


def check_blobs_once(registry, image):
    blobs = registry.blob_gets()
    for digest in image.layers:
        assert blobs.get(digest) == 1, blobs


# -- Docker engine ------------------------------------------------------------------------------------


@pytest.mark.skipif(have_dockerd() is not None, reason=str(have_dockerd()))
def test_three_docker_engines_pull_docker_hub_names_through_registry_mirrors(tmp_path, tmp_path_factory):
    """
    An image pushed as library/<name> stands in for Docker Hub: dfdaemon's
    --registry points at the local registry, daemon.json's registry-mirrors
    (written by dfdaemon setup docker) at dfdaemon.
    """
    alone = make_image(str(tmp_path_factory.mktemp("oci-a")), LAYERS, tag="v1", seed=31)
    image = make_image(str(tmp_path_factory.mktemp("oci-b")), LAYERS, tag="v1", seed=32)
    registry = Registry(str(tmp_path / "registry")).start()
    engines = []
    try:
        registry.push(alone, "library/alone")
        registry.push(image, "library/app")
        with Swarm(str(tmp_path / "swarm")) as swarm:
            swarm.start_supernode()
            urls = []
            for i in range(3):
                peer = swarm.start_peer(f"host{i}")
                url = swarm.start_dfdaemon(f"dfdaemon{i}", peer["home"], "--registry", registry.url)
                engine = Dockerd()
                engines.append(engine)
                out = setup_runtime("docker", "--target", engine.daemon_json, "--mirror", url)
                assert engine.daemon_json in out
                engine.start()
                urls.append(url)
            # one engine alone, then three at once (a different image of the same sizes)
            (t_alone,) = run_all([engines[0].docker("pull", "alone:v1")])
            times = run_all([e.docker("pull", "app:v1") for e in engines])
            for e in engines:
                got = e.inspect("app:v1")
                assert got["Id"] == image.config_digest
                assert got["RootFS"]["Layers"] == image.diff_ids
            assert engines[0].inspect("alone:v1")["Id"] == alone.config_digest
            check_blobs_once(registry, image)
            check_blobs_once(registry, alone)
            for url in urls:
                c = counters(url)
                assert c["p2p"] >= len(image.layers) and c["fallbacks"] == 0, c
            print(f"docker: one engine alone {t_alone:.2f} s; three at once {[round(t, 2) for t in times]} s "
                  f"(x{max(times) / t_alone:.2f})")
    finally:
        for e in engines:
            e.stop()
        registry.stop()


@pytest.mark.skipif(have_dockerd() is not None, reason=str(have_dockerd()))
def test_docker_engine_through_https_proxy_with_interception(tmp_path, tmp_path_factory):
    """A private registry (TLS, named 127.1 so Go proxies it) through dockerd's HTTPS_PROXY and dfdaemon's CA."""
    image = make_image(str(tmp_path_factory.mktemp("oci")), LAYERS, tag="v1", seed=33)
    registry = Registry(str(tmp_path / "registry"), host="127.1", tls=True).start()
    certs_d = None
    engines = []
    try:
        ref = registry.push(image, "team/app")
        ca_cert, ca_key = tmp_path / "ca.crt", tmp_path / "ca.key"
        subprocess.run([DFDAEMON, "gen-ca", "--cert", str(ca_cert), "--key", str(ca_key)], check=True,
                       capture_output=True, timeout=60)
        # the engine trusts dfdaemon's CA for this registry (the only place dockerd reads registry CAs from)
        certs_d = f"/etc/docker/certs.d/{registry.netloc}"
        os.makedirs(certs_d, exist_ok=False)
        shutil.copy(ca_cert, os.path.join(certs_d, "ca.crt"))
        with Swarm(str(tmp_path / "swarm")) as swarm:
            swarm.start_supernode("--origin-ca", registry.ca_cert)
            urls = []
            for i in range(3):
                peer = swarm.start_peer(f"host{i}")
                url = swarm.start_dfdaemon(
                    f"dfdaemon{i}", peer["home"], "--hijack", r"^127\.1$", "--ca-cert", str(ca_cert),
                    "--ca-key", str(ca_key), "--registry-ca", registry.ca_cert,
                )
                urls.append(url)
                engines.append(Dockerd(env={"HTTPS_PROXY": url, "HTTP_PROXY": url}).start())
            run_all([e.docker("pull", ref) for e in engines])
            for e in engines:
                got = e.inspect(ref)
                assert got["Id"] == image.config_digest and got["RootFS"]["Layers"] == image.diff_ids
            check_blobs_once(registry, image)
            for url in urls:
                c = counters(url)
                assert c["intercepted"] >= 1 and c["p2p"] >= len(image.layers) and c["fallbacks"] == 0, c
    finally:
        for e in engines:
            e.stop()
        if certs_d is not None:
            shutil.rmtree(certs_d, ignore_errors=True)
        registry.stop()


# -- podman -----------------------------------------------------------------------------------------------


@pytest.mark.skipif(have_podman() is not None, reason=str(have_podman()))
def test_three_podman_hosts_pull_through_a_registry_mirror(tmp_path, tmp_path_factory):
    image = make_image(str(tmp_path_factory.mktemp("oci")), LAYERS, tag="v1", seed=34)
    registry = Registry(str(tmp_path / "registry")).start()
    hosts = []
    try:
        ref = registry.push(image, "team/app")
        with Swarm(str(tmp_path / "swarm")) as swarm:
            swarm.start_supernode()
            urls = []
            for i in range(3):
                peer = swarm.start_peer(f"host{i}")
                url = swarm.start_dfdaemon(f"dfdaemon{i}", peer["home"], "--registry", registry.url)
                urls.append(url)
                pm = Podman()
                hosts.append(pm)
                setup_runtime("podman", "--target", pm.registries_conf, "--registry", registry.netloc, "--mirror", url)
                # the registry itself is plain HTTP too (the mirror is insecure = true already)
                with open(pm.registries_conf) as f:
                    text = f.read()
                with open(pm.registries_conf, "w") as f:
                    f.write(text.replace(f'location = "{registry.netloc}"\n', f'location = "{registry.netloc}"\ninsecure = true\n'))
            run_all([pm.podman("pull", "-q", ref) for pm in hosts], envs=[pm.env() for pm in hosts])
            for pm in hosts:
                got = pm.inspect(ref)
                assert "sha256:" + got["Id"] == image.config_digest or got["Id"] == image.config_digest
                assert got["RootFS"]["Layers"] == image.diff_ids
            check_blobs_once(registry, image)
            for url in urls:
                c = counters(url)
                assert c["p2p"] >= len(image.layers) and c["fallbacks"] == 0, c
    finally:
        for pm in hosts:
            pm.stop()
        registry.stop()
