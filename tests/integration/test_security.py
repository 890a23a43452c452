"""
Security with real processes on loopback: no path from the network reaches
the filesystem outside a home, a peer serves only the pieces it holds from
its own store, the origin allow/deny policy, admin and cluster tokens, and
TLS for the SuperNode API.
"""

import datetime
import hashlib
import http.client
import json
import os
import socket
import ssl
import time

import pytest

from dragonfly.core.ids import task_id
from dragonfly.protocol import frames as F
from dragonfly.testing.swarm import Swarm, sha256_file, wait_for_file, write_random_file

from .conftest import leftovers

pytestmark = pytest.mark.integration

MiB = 1 << 20
TRAVERSALS = [
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fsecret",
    "....%2F%2F....%2F%2Fsecret",
    "%2Fetc%2Fpasswd",
    "a" * 60 + "%2F..",
    "..%5C..%5Csecret",
]


def call(base, method, path, body=None, token=None, raw=None, context=None):
    """One request with the path sent exactly as given (no client-side normalising)."""
    host, port = base.split("://", 1)[1].rsplit(":", 1)
    if base.startswith("https"):
        conn = http.client.HTTPSConnection(host, int(port), timeout=10, context=context)
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    assert resp.getheader("content-type") == "application/json", (resp.status, payload)
    return resp.status, json.loads(payload)


def snapshot(directory):
    """Every file under C{directory} with its size and mtime."""
    out = {}
    for dirpath, _, names in os.walk(directory):
        for n in names:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    digests = {n: write_random_file(str(root / n), s) for n, s in (("a.bin", 3 * MiB), ("b.bin", 2 * MiB + 1))}
    base = tmp_path_factory.mktemp("sec")
    # a file beside the homes that nothing may read or change
    secret = base / "secret"
    secret.write_bytes(b"do not serve me\n")
    with Swarm(str(base / "swarm")) as s:
        s.start_all(str(root), 2)
        yield s, str(root), digests, str(secret)


def test_no_path_traversal_through_the_supernode_or_local_api(world, tmp_path):
    swarm, _, digests, secret = world
    out = tmp_path / "a.bin"
    proc = swarm.dfget(swarm.origin_url + "/a.bin", str(out), "p0")
    assert proc.wait(60) == 0
    before = snapshot(swarm.workdir)
    secret_before = open(secret, "rb").read()
    sn, api = swarm.supernode_api, swarm.peers["p0"]["api"]
    for bad in TRAVERSALS:
        for method, path in (("GET", f"/api/v1/tasks/{bad}"), ("DELETE", f"/api/v1/tasks/{bad}"),
                             ("POST", f"/api/v1/tasks/{bad}/sync"), ("POST", f"/api/v1/peers/{bad}/heartbeat"),
                             ("DELETE", f"/api/v1/peers/{bad}"), ("DELETE", f"/api/v1/tasks/{bad}/peers/p")):
            status, body = call(sn, method, path, {"peerId": "x"})
            assert 400 <= status < 500, (method, path, status, body)
        status, body = call(api, "GET", f"/api/v1/downloads/{bad}")
        assert 400 <= status < 500, (bad, status, body)
    # ids and names inside bodies
    for peer_id in ("../../secret", "/etc/passwd", "a/b", "..\\x", ".."):
        status, body = call(sn, "POST", "/api/v1/peers", {"peerId": peer_id, "ip": "127.0.0.1", "port": 1})
        if peer_id == "..":
            # a legal id (no separator): harmless, it never names a file
            assert status == 200
            call(sn, "DELETE", "/api/v1/peers/..")
        else:
            assert status == 400 and body["error"]["code"] == "BAD_PEER_ID", (peer_id, body)
    for url in ("file:///etc/passwd", f"file://{secret}", "ftp://127.0.0.1/x", "/etc/passwd", "../../secret"):
        status, body = call(sn, "POST", "/api/v1/tasks", {"peerId": "x", "url": url})
        assert status == 400 and body["error"]["code"] == "BAD_INPUT", (url, body)
        status, body = call(api, "POST", "/api/v1/downloads", {"url": url})
        assert status == 400 and body["error"]["code"] == "BAD_INPUT", (url, body)
    # a URL path with ../ is the origin's business: it only changes the task id (a hash)
    status, body = call(api, "POST", "/api/v1/downloads", {"url": swarm.origin_url + "/../../secret", "identifier": "../../x"})
    assert status == 200
    assert len(body["taskId"]) == 64
    time.sleep(1.0)
    assert open(secret, "rb").read() == secret_before
    # nothing was written outside the homes, and inside only the data of that task
    after = snapshot(swarm.workdir)
    assert {p for p in after if p not in before and not p.endswith(".log")} <= {
        p for p in after if "/repo/" in p or "/data/" in p
    }
    for p in after:
        assert os.path.realpath(p).startswith(swarm.workdir + os.sep)
    assert sha256_file(str(out)) == digests["a.bin"]


def _block_conn(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _read_frames(sock, want, timeout=10.0):
    dec = F.FrameDecoder()
    frames = []
    deadline = time.monotonic() + timeout
    sock.settimeout(1.0)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            continue
        if not data:
            break
        frames.extend(dec.feed(data))
        if want(frames):
            break
    return frames


def test_a_peer_serves_only_held_pieces_from_its_own_store(world, tmp_path):
    swarm, root, digests, secret = world
    # p1 holds b.bin; p0 holds a.bin only (the previous test)
    out = tmp_path / "b.bin"
    assert swarm.dfget(swarm.origin_url + "/b.bin", str(out), "p1").wait(60) == 0
    tid_a = task_id(swarm.origin_url + "/a.bin")
    tid_b = task_id(swarm.origin_url + "/b.bin")
    port0 = swarm.peers["p0"]["blockPort"]
    # a task p0 does not hold (p1 does): refused with an ERROR frame, then closed
    for tid in (bytes.fromhex(tid_b), b"../../../../../../../secret\0\0\0\0\0", hashlib.sha256(b"x").digest()):
        s = _block_conn(port0)
        s.sendall(F.encode_hello(tid, "prober"))
        frames = _read_frames(s, lambda fs: any(isinstance(f, F.ErrorMsg) for f in fs))
        errors = [f for f in frames if isinstance(f, F.ErrorMsg)]
        assert errors and errors[0].code == 404, frames
        assert not any(isinstance(f, F.PieceStart) for f in frames)
        s.close()
    # the task it holds: served, only the pieces it has, from its own file
    s = _block_conn(port0)
    s.sendall(F.encode_hello(bytes.fromhex(tid_a), "prober"))
    frames = _read_frames(s, lambda fs: any(isinstance(f, F.BitfieldMsg) for f in fs))
    [bf] = [f for f in frames if isinstance(f, F.BitfieldMsg)]
    count = bf.bitmap.count
    assert len(bf.bitmap) == count
    s.sendall(F.encode_request(count) + F.encode_request(2**31) + F.encode_request(0))
    frames = _read_frames(s, lambda fs: any(isinstance(f, F.PieceEnd) for f in fs) and len(
        [f for f in fs if isinstance(f, F.Reject)]) >= 2)
    rejects = sorted(f.index for f in frames if isinstance(f, F.Reject))
    assert rejects == [count, 2**31], frames
    body = b"".join(bytes(f.data) for f in frames if isinstance(f, F.PieceData))
    with open(os.path.join(root, "a.bin"), "rb") as f:
        assert body == f.read(len(body)) and len(body) > 0
    s.close()


def _supernode(swarm, name, *args):
    """A second SuperNode with its own home, on any ports; its API base URL."""
    home = os.path.join(swarm.workdir, name)
    os.makedirs(home, exist_ok=True)
    proc = swarm._spawn(name, [os.path.join(os.path.dirname(os.sys.executable), "twistd"), "-n", "--pidfile=",
                               "supernode", "--port", "0", "--block-port", "0", "--listen", "127.0.0.1",
                               "--home", home, *args])
    info = wait_for_file(os.path.join(home, "supernode.json"), 30, proc)
    return info["port"]


def test_origin_deny_and_allow_lists(world, tmp_path):
    swarm, _, digests, _ = world
    origin_port = swarm.origin_url.rsplit(":", 1)[1]
    deny = _supernode(swarm, "sn-deny", "--origin-deny", "127.0.0.0/8,::1/128")
    allow = _supernode(swarm, "sn-allow", "--origin-allow", "10.0.0.0/8,mirror.example")
    for port in (deny, allow):
        base = f"http://127.0.0.1:{port}"
        assert call(base, "POST", "/api/v1/peers", {"peerId": "p", "ip": "127.0.0.1", "port": 1})[0] == 200
        # by address, and by a name that resolves into the denied network
        for url in (swarm.origin_url + "/a.bin", f"http://localhost:{origin_port}/a.bin"):
            status, body = call(base, "POST", "/api/v1/tasks", {"peerId": "p", "url": url})
            assert status == 403, body
            assert body["error"]["code"] == "ORIGIN_DENIED"
            assert "127.0.0.1" in body["error"]["message"]
        status, body = call(base, "GET", "/api/v1/tasks")
        assert body["tasks"] == []
    # a peer of the denying SuperNode: dfget says why, in one line, and leaves nothing
    swarm_addr = swarm.supernode_addr
    swarm.supernode_addr = f"127.0.0.1:{deny}"
    try:
        swarm.start_peer("denied")
    finally:
        swarm.supernode_addr = swarm_addr
    out = tmp_path / "a.bin"
    proc = swarm.dfget(swarm.origin_url + "/a.bin", str(out), "denied", "--node", f"127.0.0.1:{deny}")
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 3, err
    assert err.startswith("dfget: error:") and "denied" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and leftovers(str(tmp_path)) == []


def test_admin_and_cluster_tokens(world, tmp_path):
    swarm, _, digests, _ = world
    admin, cluster = "admin-" + "a" * 20, "cluster-" + "c" * 20
    token_file = tmp_path / "cluster.token"
    token_file.write_text(cluster + "\n")
    port = _supernode(swarm, "sn-tokens", "--admin-token", admin, "--cluster-token-file", str(token_file))
    base = f"http://127.0.0.1:{port}"
    peer = {"peerId": "p", "ip": "127.0.0.1", "port": 1}
    # no token, a wrong one, a near miss: 401 JSON
    for token in (None, "wrong-token", cluster[:-1], cluster + "x"):
        status, body = call(base, "POST", "/api/v1/peers", peer, token=token)
        assert status == 401 and body["error"]["code"] == "UNAUTHORIZED", (token, body)
    assert call(base, "GET", "/api/v1/tasks")[0] == 401
    assert call(base, "GET", "/healthz")[0] == 200
    assert call(base, "POST", "/api/v1/peers", peer, token=cluster)[0] == 200
    # a dfpeer with the token registers and downloads; one without cannot
    saved = swarm.supernode_addr
    swarm.supernode_addr = f"127.0.0.1:{port}"
    try:
        swarm.start_peer("with-token", "--cluster-token", cluster)
        swarm.start_peer("no-token")
    finally:
        swarm.supernode_addr = saved
    out = tmp_path / "a.bin"
    proc = swarm.dfget(swarm.origin_url + "/a.bin", str(out), "with-token", "--node", f"127.0.0.1:{port}")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert sha256_file(str(out)) == digests["a.bin"]
    out2 = tmp_path / "b.bin"
    proc = swarm.dfget(swarm.origin_url + "/b.bin", str(out2), "no-token", "--node", f"127.0.0.1:{port}", "--notbs")
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 3, err
    assert "token" in err and len(err.strip().splitlines()) == 1
    assert not out2.exists()
    status, body = call(base, "GET", "/api/v1/tasks", token=cluster)
    [task] = body["tasks"]
    tid = task["taskId"]
    repo = os.path.join(swarm.workdir, "sn-tokens", "repo")
    assert sorted(os.listdir(repo)) == [tid + ".data", tid + ".meta"]
    # deleting a task is an admin operation: the cluster token is not enough
    for token in (None, cluster, "x" * 30):
        status, body = call(base, "DELETE", f"/api/v1/tasks/{tid}", token=token)
        assert status == 401 and body["error"]["code"] == "UNAUTHORIZED", body
    assert os.path.exists(os.path.join(repo, tid + ".data"))
    status, body = call(base, "DELETE", f"/api/v1/tasks/{tid}", token=admin)
    assert status == 200 and body["removed"] is True
    assert os.listdir(repo) == []
    assert call(base, "GET", "/api/v1/tasks", token=admin)[1]["tasks"] == []
    assert call(base, "DELETE", f"/api/v1/tasks/{tid}", token=admin)[0] == 404


def _make_ca(tmp_path, name):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, str(path)


def _server_cert(tmp_path, ca_key, ca_cert):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_path, cert_path = tmp_path / "server.key", tmp_path / "server.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(key_path), str(cert_path)


def test_tls_supernode_api(world, tmp_path):
    swarm, _, digests, _ = world
    ca_key, ca_cert, ca_pem = _make_ca(tmp_path, "test-ca")
    _, _, other_pem = _make_ca(tmp_path, "other-ca")
    key, cert = _server_cert(tmp_path, ca_key, ca_cert)
    port = _supernode(swarm, "sn-tls", "--api-listen", f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1")
    base = f"https://localhost:{port}"
    # plain HTTP is not answered as the API
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError, AssertionError)):
        call(f"http://127.0.0.1:{port}", "GET", "/healthz")
    saved = swarm.supernode_addr
    swarm.supernode_addr = base
    try:
        swarm.start_peer("tls-good", "--supernode-ca", ca_pem)
        swarm.start_peer("tls-wrong-ca", "--supernode-ca", other_pem)
    finally:
        swarm.supernode_addr = saved
    ctx = ssl.create_default_context(cafile=ca_pem)
    deadline = time.monotonic() + 20
    peers = []
    while time.monotonic() < deadline:
        peers = [p["peerId"] for p in call(base, "GET", "/api/v1/peers", context=ctx)[1]["peers"]]
        if swarm.peers["tls-good"]["peerId"] in peers:
            break
        time.sleep(0.2)
    assert swarm.peers["tls-good"]["peerId"] in peers
    # the peer with the wrong CA refused the certificate: it never registered
    time.sleep(1.0)
    peers = [p["peerId"] for p in call(base, "GET", "/api/v1/peers", context=ctx)[1]["peers"]]
    assert swarm.peers["tls-wrong-ca"]["peerId"] not in peers
    assert call(swarm.peers["tls-wrong-ca"]["api"], "GET", "/healthz")[1]["registered"] is False
    assert call(swarm.peers["tls-good"]["api"], "GET", "/healthz")[1]["registered"] is True
    # and a download through the TLS-registered peer works
    out = tmp_path / "b.bin"
    proc = swarm.dfget(swarm.origin_url + "/b.bin", str(out), "tls-good", "--node", base)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert sha256_file(str(out)) == digests["b.bin"]
    # dfget with no dfpeer running starts one that trusts --cacerts
    out2 = tmp_path / "a.bin"
    proc = swarm.dfget(swarm.origin_url + "/a.bin", str(out2), None, "--home", str(tmp_path / "home"),
                       "--node", base, "--cacerts", ca_pem, "--notbs", "--idle-exit", "3")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert sha256_file(str(out2)) == digests["a.bin"]
