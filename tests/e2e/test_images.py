"""
Images through the swarm, with real components: Debian's docker-registry on
loopback, images of random layers pushed by skopeo, containerd pulling with
a hosts.toml that names dfdaemon as its mirror, and skopeo through dfdaemon
as an HTTPS proxy that intercepts the registry's host.

Each emulated host is a dfpeer, a dfdaemon and a containerd of its own
(loopback, distinct ports and homes).  The registry's log says how often it
sent each blob's body.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest

from dragonfly.testing.containerd import Containerd, have_containerd, run_pulls, write_hosts_toml
from dragonfly.testing.registry import Registry, free_port, have_tools, make_image
from dragonfly.testing.swarm import Swarm, get_json, wait_for_file
from dragonfly.testing.tokens import TokenService

pytestmark = pytest.mark.e2e

MiB = 1 << 20
LAYERS = [6 * MiB, 5 * MiB, 4 * MiB, 3000]
#: every blob through the swarm, the 3 kB layer too (the default sends blobs below 256 KiB direct)
ALL_P2P = ("--direct-below", "0")

missing = have_tools() or have_containerd()
if missing:
    pytest.skip(missing, allow_module_level=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return make_image(str(tmp_path_factory.mktemp("oci")), LAYERS, tag="v1", seed=7)


def dfdaemon_status(url):
    return get_json(url + "/_dfdaemon/status")["counters"]


def hosts(swarm, n, workdir, *dfdaemon_args):
    """n emulated hosts: (dfpeer info, dfdaemon URL, containerd)."""
    out = []
    for i in range(n):
        peer = swarm.start_peer(f"host{i}")
        url = swarm.start_dfdaemon(f"dfdaemon{i}", peer["home"], *ALL_P2P, *dfdaemon_args)
        out.append((peer, url, Containerd(os.path.join(workdir, f"containerd{i}")).start()))
    return out


def check_pulled(ctr, image):
    """Every blob of the image in containerd's store, and every file unpacked, byte for byte."""
    for digest in image.layers + [image.config_digest]:
        data = subprocess.run(ctr.ctr("content", "get", digest), capture_output=True, check=True, timeout=60).stdout
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    snapshots = os.path.join(ctr.root, "root", "io.containerd.snapshotter.v1.native", "snapshots")
    found = {}
    for top in os.listdir(snapshots):
        for path, _want in image.files.items():
            full = os.path.join(snapshots, top, path)
            if os.path.exists(full):
                with open(full, "rb") as f:
                    found[path] = hashlib.sha256(f.read()).hexdigest()
    assert found == image.files


def pull_everywhere(swarm, registry, image, ref, workdir, user=None):
    machines = hosts(swarm, 3, workdir, "--registry", registry.url)
    try:
        commands = []
        for i, (_, url, ctr) in enumerate(machines):
            hosts_dir = os.path.join(workdir, f"hosts{i}")
            write_hosts_toml(hosts_dir, registry.netloc, url, registry.url)
            commands.append(ctr.pull_command(ref, hosts_dir, user))
        times = run_pulls(commands, os.path.join(workdir, "pulls"), timeout=180)
        for _, _, ctr in machines:
            check_pulled(ctr, image)
        blobs = registry.blob_gets()
        # each layer's body left the registry once, however many hosts pulled it
        for digest in image.layers:
            assert blobs.get(digest) == 1, blobs
        counters = [dfdaemon_status(url) for _, url, _ in machines]
        assert all(c["p2p"] >= len(image.layers) and c["fallbacks"] == 0 for c in counters), counters
        with urllib.request.urlopen(machines[0][1] + "/metrics", timeout=10) as r:
            text = r.read().decode()
        assert f'dragonfly_dfdaemon_blob_requests_total{{path="p2p"}} {float(counters[0]["p2p"])}' in text
        print(f"pull times {[round(t, 2) for t in times]} s; registry blob GETs {blobs}")
        return times
    finally:
        for _, _, ctr in machines:
            ctr.stop()


def test_three_containerd_hosts_pull_through_the_swarm(tmp_path, image):
    registry = Registry(str(tmp_path / "registry")).start()
    try:
        ref = registry.push(image, "team/app")
        with Swarm(str(tmp_path / "swarm")) as swarm:
            swarm.start_supernode()
            pull_everywhere(swarm, registry, image, ref, str(tmp_path))
    finally:
        registry.stop()


@pytest.mark.parametrize("auth", ["Basic", "Bearer"])
def test_registry_with_auth(tmp_path, image, auth):
    """htpasswd Basic auth, or Bearer tokens from the registry's token service: the clients authenticate as usual."""
    tokens = TokenService(str(tmp_path / "tokens"), "alice", "s3cret").start() if auth == "Bearer" else None
    if tokens is None:
        registry = Registry(str(tmp_path / "registry"), user="alice", password="s3cret").start()
    else:
        registry = Registry(str(tmp_path / "registry"), tokens=tokens).start()
    try:
        ref = registry.push(image, "team/private")
        with Swarm(str(tmp_path / "swarm")) as swarm:
            swarm.start_supernode()
            pull_everywhere(swarm, registry, image, ref, str(tmp_path), user="alice:s3cret")
            # no credentials: the registry's 401 comes back as it is, and nothing is pulled
            machine = hosts(swarm, 1, str(tmp_path / "anon"), "--registry", registry.url)[0]
            try:
                _, url, ctr = machine
                write_hosts_toml(str(tmp_path / "anon-hosts"), registry.netloc, url, registry.url)
                r = subprocess.run(ctr.pull_command(ref, str(tmp_path / "anon-hosts")), capture_output=True, timeout=60)
                assert r.returncode != 0
                blob = f"{url}/v2/team/private/blobs/{image.layers[0]}"
                with pytest.raises(urllib.error.HTTPError) as e:
                    urllib.request.urlopen(blob, timeout=30)
                assert e.value.code == 401
                assert e.value.headers.get("WWW-Authenticate", "").startswith(auth)
                assert dfdaemon_status(url)["denied"] >= 1
            finally:
                machine[2].stop()
            if tokens is not None:
                # every token the service issued (to skopeo, ctr) was for this repository only
                assert all(a["name"] == "team/private" for t in tokens.issued for a in t["access"])
    finally:
        registry.stop()
        if tokens is not None:
            tokens.stop()


def test_skopeo_through_the_https_proxy_with_interception(tmp_path, image):
    # Go never proxies loopback addresses, so the registry is named 127.1
    registry = Registry(str(tmp_path / "registry"), host="127.1", tls=True).start()
    try:
        ref = registry.push(image, "team/app")
        ca_dir = tmp_path / "dfdaemon-ca"
        ca_dir.mkdir()
        subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "dfdaemon"), "gen-ca",
             "--cert", str(ca_dir / "ca.crt"), "--key", str(tmp_path / "ca.key")],
            check=True, capture_output=True, timeout=60,
        )
        with Swarm(str(tmp_path / "swarm")) as swarm:
            swarm.start_supernode("--origin-ca", registry.ca_cert)
            peer = swarm.start_peer("host0")
            url = swarm.start_dfdaemon(
                "dfdaemon0", peer["home"], *ALL_P2P, "--hijack", r"^127\.1$", "--ca-cert", str(ca_dir / "ca.crt"),
                "--ca-key", str(tmp_path / "ca.key"), "--registry-ca", registry.ca_cert,
            )
            env = dict(os.environ, HTTPS_PROXY=url, HTTP_PROXY=url, NO_PROXY="")
            out = tmp_path / "copy"
            r = subprocess.run(
                ["skopeo", "copy", "--src-cert-dir", str(ca_dir), f"docker://{ref}", f"oci:{out}:v1"],
                env=env, capture_output=True, timeout=180,
            )
            assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
            for digest in image.layers:
                with open(out / "blobs" / "sha256" / digest.split(":")[1], "rb") as f:
                    assert "sha256:" + hashlib.sha256(f.read()).hexdigest() == digest
                assert registry.blob_gets().get(digest) == 1
            counters = dfdaemon_status(url)
            assert counters["intercepted"] >= 1 and counters["p2p"] >= len(image.layers), counters
            # the same client without our CA refuses the minted certificate
            r = subprocess.run(
                ["skopeo", "inspect", "--raw", f"docker://{ref}"], env=env, capture_output=True, timeout=60
            )
            assert r.returncode != 0
            assert b"certificate" in r.stderr
            # a host no --hijack rule names is a plain tunnel: the client talks
            # TLS with the registry itself (its own certificate, its CA)
            plain = swarm.start_dfdaemon("dfdaemon1", peer["home"] + "-tunnel", "--no-start-peer")
            tunnel_env = dict(os.environ, HTTPS_PROXY=plain, HTTP_PROXY=plain, NO_PROXY="")
            r = subprocess.run(
                ["skopeo", "inspect", "--raw", "--cert-dir", registry.ca_dir, f"docker://{ref}"],
                env=tunnel_env, capture_output=True, timeout=60,
            )
            assert r.returncode == 0, r.stderr.decode(errors="replace")[-1500:]
            assert json.loads(r.stdout) == json.loads(image.manifest)
            counters = dfdaemon_status(plain)
            assert counters["tunnels"] >= 1 and counters["intercepted"] == 0, counters
    finally:
        registry.stop()


def _read_all(url, path, headers=None):
    """GET path; (status, Content-Length, bytes read, complete?)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    length = resp.getheader("Content-Length")
    got = b""
    try:
        while True:
            chunk = resp.read1(1 << 16)
            if not chunk:
                break
            got += chunk
        complete = True
    except (http.client.IncompleteRead, ConnectionError) as e:
        complete = False
        got += getattr(e, "partial", b"")
    conn.close()
    complete = complete and length is not None and len(got) == int(length)
    return resp.status, length, got, complete


def test_a_corrupt_blob_is_never_delivered_complete(tmp_path, image):
    registry = Registry(str(tmp_path / "registry")).start()
    try:
        registry.push(image, "team/app")
        bad = image.layers[0]
        registry.corrupt_blob(bad)
        with Swarm(str(tmp_path / "swarm")) as swarm:
            swarm.start_supernode()
            peer = swarm.start_peer("host0")
            url = swarm.start_dfdaemon("dfdaemon0", peer["home"], "--registry", registry.url)
            path = f"/v2/team/app/blobs/{bad}"
            # through the swarm, then (the task failed) the direct fallback: both cut short
            for attempt in range(2):
                status, length, got, complete = _read_all(url, path)
                assert not (status == 200 and complete), (attempt, status, length, len(got))
                assert "sha256:" + hashlib.sha256(got).hexdigest() != bad
            # a good blob still flows
            good = image.layers[1]
            status, length, got, complete = _read_all(url, f"/v2/team/app/blobs/{good}")
            assert status == 200 and complete
            assert "sha256:" + hashlib.sha256(got).hexdigest() == good
            counters = dfdaemon_status(url)
            assert counters["p2p_cut"] + counters["fallbacks"] >= 2, counters
    finally:
        registry.stop()


def test_the_response_streams_before_the_swarm_finishes(tmp_path, tmp_path_factory):
    big = make_image(str(tmp_path_factory.mktemp("oci-big")), [24 * MiB], tag="v1", seed=11)
    registry = Registry(str(tmp_path / "registry")).start()
    try:
        registry.push(big, "team/big")
        with Swarm(str(tmp_path / "swarm")) as swarm:
            # the origin fetch at 8 MiB/s: about 3 s for the layer
            swarm.start_supernode("--origin-limit", "8M")
            peer = swarm.start_peer("host0")
            url = swarm.start_dfdaemon("dfdaemon0", peer["home"], "--registry", registry.url)
            parts = urlsplit(url)
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
            started = time.monotonic()
            conn.request("GET", f"/v2/team/big/blobs/{big.layers[0]}")
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.getheader("Docker-Content-Digest") == big.layers[0]
            assert resp.getheader("Content-Type") == "application/octet-stream"  # the registry's
            assert resp.getheader("Cache-Control") == "max-age=31536000"  # a blob by digest never changes
            first = resp.read1(1 << 16)
            first_at = time.monotonic() - started
            body = first + resp.read()
            total = time.monotonic() - started
            assert int(resp.getheader("Content-Length")) == len(body)
            assert "sha256:" + hashlib.sha256(body).hexdigest() == big.layers[0]
            print(f"first bytes after {first_at:.2f} s, all {len(body)} after {total:.2f} s")
            assert total > 2.0
            assert first_at < total / 2
    finally:
        registry.stop()


def _get(url, path, headers=None):
    status, length, body, complete = _read_all(url, path, headers)
    assert status == 200 and complete, (status, length, len(body))
    return body


def test_without_a_swarm_blobs_go_direct_and_say_so(tmp_path, image):
    registry = Registry(str(tmp_path / "registry")).start()
    try:
        registry.push(image, "team/app")
        with Swarm(str(tmp_path / "swarm")) as swarm:
            # a dfpeer whose SuperNode does not answer: the swarm fails before the first byte
            swarm.supernode_addr = f"127.0.0.1:{free_port()}"
            peer = swarm.start_peer("host0")
            url = swarm.start_dfdaemon("dfdaemon0", peer["home"], "--registry", registry.url)
            body = _get(url, f"/v2/team/app/blobs/{image.layers[1]}")
            assert "sha256:" + hashlib.sha256(body).hexdigest() == image.layers[1]
            counters = dfdaemon_status(url)
            assert counters["fallbacks"] == 1 and counters["p2p"] == 0, counters
            with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
                assert 'dragonfly_dfdaemon_blob_requests_total{path="fallback"} 1.0' in r.read().decode()
    finally:
        registry.stop()


def test_a_small_blob_goes_to_the_registry_and_a_big_one_through_the_swarm(tmp_path, image):
    """The default --direct-below (256 KiB): the 3 kB layer straight from the registry, a 4 MiB one through the swarm."""
    small, big = image.layers[3], image.layers[2]
    registry = Registry(str(tmp_path / "registry")).start()
    try:
        registry.push(image, "team/app")
        with Swarm(str(tmp_path / "swarm")) as swarm:
            swarm.start_supernode()
            urls = []
            for i in range(2):
                peer = swarm.start_peer(f"host{i}")
                urls.append(swarm.start_dfdaemon(f"dfdaemon{i}", peer["home"], "--registry", registry.url))
            for url in urls:
                for digest in (small, big):
                    body = _get(url, f"/v2/team/app/blobs/{digest}")
                    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
            # the small blob once per host from the registry, the big one once for both
            assert registry.blob_gets() == {small: 2, big: 1}
            for url in urls:
                c = dfdaemon_status(url)
                assert c["small"] == 1 and c["p2p"] == 1 and c["fallbacks"] == 0, c
            with urllib.request.urlopen(urls[0] + "/metrics", timeout=10) as r:
                assert 'dragonfly_dfdaemon_blob_requests_total{path="small"} 1.0' in r.read().decode()
    finally:
        registry.stop()


def test_dfdaemon_starts_a_dfpeer_for_its_home_when_none_runs(tmp_path, image):
    registry = Registry(str(tmp_path / "registry")).start()
    home = tmp_path / "home"
    home.mkdir()
    try:
        registry.push(image, "team/app")
        with Swarm(str(tmp_path / "swarm")) as swarm:
            swarm.start_supernode()
            url = swarm.start_dfdaemon("dfdaemon0", str(home), "--registry", registry.url)
            try:
                # started with dfdaemon, before any request: the first pull does not pay its start-up
                wait_for_file(str(home / "peer.json"), 30)
                assert dfdaemon_status(url)["p2p"] == 0
                body = _get(url, f"/v2/team/app/blobs/{image.layers[0]}")
                assert "sha256:" + hashlib.sha256(body).hexdigest() == image.layers[0]
                info = json.load(open(home / "peer.json"))
                assert dfdaemon_status(url)["p2p"] == 1
                tasks = get_json(info["api"] + "/api/v1/tasks")["tasks"]
                assert [t["status"] for t in tasks] == ["success"]
            finally:
                pid_file = home / "dfpeer.pid"
                if pid_file.exists():
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
    finally:
        registry.stop()


def test_http_proxy_mode_sends_absolute_uri_blob_requests_through_the_swarm(tmp_path, image):
    registry = Registry(str(tmp_path / "registry")).start()
    try:
        registry.push(image, "team/app")
        with Swarm(str(tmp_path / "swarm")) as swarm:
            swarm.start_supernode()
            peer = swarm.start_peer("host0")
            url = swarm.start_dfdaemon("dfdaemon0", peer["home"])  # no --registry: a proxy only
            # an HTTP_PROXY client: absolute URIs, the same rules as the mirror
            blob = f"{registry.url}/v2/team/app/blobs/{image.layers[2]}"
            body = _get(url, blob)
            assert "sha256:" + hashlib.sha256(body).hexdigest() == image.layers[2]
            manifest = _get(
                url, f"{registry.url}/v2/team/app/manifests/v1",
                {"Accept": "application/vnd.oci.image.manifest.v1+json"},
            )
            assert json.loads(manifest) == json.loads(image.manifest)
            counters = dfdaemon_status(url)
            assert counters["p2p"] == 1 and counters["direct"] >= 1, counters
            assert registry.blob_gets() == {image.layers[2]: 1}
    finally:
        registry.stop()


def test_one_dfdaemon_mirrors_two_registries_for_default_hosts_toml(tmp_path, image, tmp_path_factory):
    """
    containerd with only _default/hosts.toml (written by dfdaemon setup
    containerd --all-registries) pulls from two registries, one behind
    htpasswd Basic auth and one behind Bearer tokens, through one dfdaemon
    per host with both as --registry: containerd's ns= picks the registry.
    """
    other = make_image(str(tmp_path_factory.mktemp("oci-other")), [3 * MiB, 2 * MiB], tag="v2", seed=8)
    tokens = TokenService(str(tmp_path / "tokens"), "alice", "s3cret").start()
    basic = Registry(str(tmp_path / "basic"), user="alice", password="s3cret").start()
    bearer = Registry(str(tmp_path / "bearer"), tokens=tokens).start()
    machines = []
    try:
        ref_basic = basic.push(image, "team/basic")
        ref_bearer = bearer.push(other, "team/bearer")
        with Swarm(str(tmp_path / "swarm")) as swarm:
            swarm.start_supernode()
            machines = hosts(swarm, 3, str(tmp_path), "--registry", basic.url, "--registry", bearer.url)
            commands = []
            for i, (_, url, ctr) in enumerate(machines):
                hosts_dir = str(tmp_path / f"hosts{i}")
                r = subprocess.run(
                    [os.path.join(os.path.dirname(sys.executable), "dfdaemon"), "setup", "containerd",
                     "--all-registries", "--target", hosts_dir, "--mirror", url],
                    capture_output=True, timeout=60,
                )
                assert r.returncode == 0, r.stderr.decode()
                assert os.listdir(hosts_dir) == ["_default"]
                for ref in (ref_basic, ref_bearer):
                    commands.append(ctr.pull_command(ref, hosts_dir, "alice:s3cret") + ["--plain-http"])
            run_pulls(commands, str(tmp_path / "pulls"), timeout=180)
            for _, _, ctr in machines:
                for img in (image, other):
                    for digest in img.layers + [img.config_digest]:
                        data = subprocess.run(ctr.ctr("content", "get", digest), capture_output=True, check=True, timeout=60).stdout
                        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
            for registry, img in ((basic, image), (bearer, other)):
                blobs = registry.blob_gets()
                for digest in img.layers:
                    assert blobs.get(digest) == 1, blobs
            for _, url, _ in machines:
                c = dfdaemon_status(url)
                assert c["p2p"] >= len(image.layers) + len(other.layers) and c["fallbacks"] == 0, c
            # a registry no --registry names: a JSON 403, and nothing fetched
            _, url, _ = machines[0]
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"{url}/v2/team/basic/manifests/v1?ns=127.0.0.1:1", timeout=30)
            assert e.value.code == 403 and json.loads(e.value.read())["error"]["code"] == "REGISTRY_NOT_LISTED"
    finally:
        for _, _, ctr in machines:
            ctr.stop()
        basic.stop()
        bearer.stop()
        tokens.stop()
