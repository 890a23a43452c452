"""
Several SuperNodes, one cluster, with real processes on loopback: three
SuperNodes, five dfpeers given all three (C{--supernode a,b,c}), three files
downloaded by every peer at once.  The owner of one file's task (by the
rendezvous ranking every peer computes) is killed with SIGKILL in the middle
of the downloads: every output must still be right, and the origin copies
per file are measured: the SuperNodes share a piece key
(C{--piece-key-file}), so the next node of the ranking takes the task over
from the swarm and every file costs one origin copy.  Then the owner is
started again: a new download of that task registers with it again.
"""

import os
import signal
import socket
import time

import pytest

from dragonfly.core import rendezvous
from dragonfly.core.ids import task_id
from dragonfly.testing.swarm import (
    Swarm,
    _bin,
    get_json,
    sha256_file,
    wait_for_file,
    write_random_file,
)

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 24 * MiB
FILES = ["f0.bin", "f1.bin", "f2.bin"]
PEERS = 5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout, step=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def start_origin(swarm, root, name):
    info = os.path.join(swarm.workdir, f"{name}.json")
    proc = swarm._spawn(name, [os.sys.executable, "-m", "dragonfly.testing.origin", "--root", root, "--info", info])
    return f"http://127.0.0.1:{wait_for_file(info, 20, proc)['port']}"


def piece_key_file(swarm):
    """The cluster's piece key, shared by the SuperNodes (never by the peers)."""
    path = os.path.join(swarm.workdir, "piece.key")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(os.urandom(32).hex() + "\n")
    return path


def start_supernode(swarm, name, port, block):
    home = os.path.join(swarm.workdir, name)
    os.makedirs(home, exist_ok=True)
    info_path = os.path.join(home, "supernode.json")
    if os.path.exists(info_path):
        os.unlink(info_path)
    proc = swarm._spawn(
        name,
        [_bin("twistd"), "-n", "--pidfile=", "supernode", "--port", str(port), "--block-port", str(block),
         "--listen", "127.0.0.1", "--home", home, "--piece-key-file", piece_key_file(swarm)],
    )
    wait_for_file(info_path, 30, proc)
    return proc


def task_peers(node, tid):
    try:
        return sorted(get_json(f"http://{node}/api/v1/tasks/{tid}", timeout=5)["peers"])
    except (OSError, ValueError):  # down, or 404 (urllib's HTTPError is an OSError)
        return None


def task_availability(node, tid):
    try:
        return get_json(f"http://{node}/api/v1/tasks/{tid}", timeout=5)["availability"]
    except (OSError, ValueError, KeyError):
        return None


def test_kill_the_owner_of_a_task_mid_download(tmp_path):
    with Swarm(str(tmp_path / "swarm")) as swarm:
        origins, digests = {}, {}
        for i, name in enumerate(FILES):
            root = tmp_path / f"www{i}"
            root.mkdir()
            digests[name] = write_random_file(str(root / name), SIZE)
            origins[name] = start_origin(swarm, str(root), f"origin{i}")
        urls = {name: f"{origins[name]}/{name}" for name in FILES}
        tids = {name: task_id(url) for name, url in urls.items()}
        for _ in range(100):
            # ports such that the victim does not own every task: some must stay put
            ports = [(free_port(), free_port()) for _ in range(3)]
            nodes = [f"127.0.0.1:{p}" for p, _ in ports]
            ring = rendezvous.parse_nodes(",".join(nodes))
            if len({rendezvous.owner(ring, tid) for tid in tids.values()}) > 1:
                break
        procs = {f"sn{i}": start_supernode(swarm, f"sn{i}", p, b) for i, (p, b) in enumerate(ports)}
        swarm.supernode_addr = ",".join(nodes)  # what start_peer and dfget pass as --supernode / --node
        names = [f"p{i}" for i in range(PEERS)]
        for n in names:
            swarm.start_peer(n)

        ring = rendezvous.parse_nodes(swarm.supernode_addr)
        owners = {name: rendezvous.owner(ring, tids[name]).address for name in FILES}
        victim = owners["f0.bin"]
        victim_name = f"sn{nodes.index(victim)}"
        heir = rendezvous.rank(ring, tids["f0.bin"])[1].address
        print(f"\nowners: {owners}; killing {victim} ({victim_name}), f0.bin moves to {heir}")

        started = time.monotonic()
        gets = {
            (n, name): swarm.dfget(urls[name], str(tmp_path / f"{n}-{name}"), n, "--locallimit", "4M")
            for n in names for name in FILES
        }
        # every peer registered f0.bin with its owner, and the downloads are under way
        assert wait_until(lambda: len(task_peers(victim, tids["f0.bin"]) or ()) == PEERS, 30)
        # the owner dies once its seed has handed every piece to some peer (the
        # swarm holds the whole file between them) while the peers are part way:
        # the next node must then take the task over without an origin byte
        assert wait_until(lambda: min(task_availability(victim, tids["f0.bin"]) or [0]) >= 1, 60, 0.05)
        held = task_availability(victim, tids["f0.bin"])
        procs[victim_name].send_signal(signal.SIGKILL)
        procs[victim_name].wait()
        killed = time.monotonic() - started
        done_at_kill = sum(os.path.exists(tmp_path / f"{n}-f0.bin") for n in names)
        print(f"killed {victim} at {killed:.1f}s: copies of each piece in the swarm {held}; f0.bin outputs done {done_at_kill}")

        for (n, name), proc in gets.items():
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, (n, name, err)
            assert sha256_file(str(tmp_path / f"{n}-{name}")) == digests[name], (n, name)
        took = time.monotonic() - started
        copies = {name: get_json(origins[name] + "/_stats")["bytesSent"] / SIZE for name in FILES}
        print(f"killed at {killed:.1f}s, all {len(gets)} downloads right after {took:.1f}s; "
              f"origin copies per file: {copies}")
        # the swarm of f0.bin moved whole to the next node of its ranking
        assert task_peers(heir, tids["f0.bin"]) == sorted(swarm.peers[n]["peerId"] for n in names)
        # the other tasks stayed on their owners (those the victim owned moved too)
        assert any(owners[name] != victim for name in FILES)
        for name in FILES[1:]:
            if owners[name] != victim:
                assert task_peers(owners[name], tids[name]) == sorted(swarm.peers[n]["peerId"] for n in names)
        # every file cost one origin copy, the moved ones too: the next node of
        # the ranking took their tasks over from the swarm (the piece key) and
        # asked the origin only for pieces no peer held
        for name in FILES:
            assert copies[name] <= 1.05, (name, copies)

        # the owner comes back (same ports, same home): a new download of f0.bin registers with it
        procs[victim_name] = start_supernode(swarm, victim_name, *ports[nodes.index(victim)])
        swarm.start_peer("late")
        proc = swarm.dfget(urls["f0.bin"], str(tmp_path / "late-f0.bin"), "late")
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert sha256_file(str(tmp_path / "late-f0.bin")) == digests["f0.bin"]
        assert swarm.peers["late"]["peerId"] in (task_peers(victim, tids["f0.bin"]) or ())
        # and the finished peers, which probe it, announce their copies there
        everyone = sorted(swarm.peers[n]["peerId"] for n in [*names, "late"])
        back = wait_until(lambda: task_peers(victim, tids["f0.bin"]) == everyone, 30)
        copies_after = get_json(origins["f0.bin"] + "/_stats")["bytesSent"] / SIZE
        print(f"after the restart: f0.bin swarm on its owner again: {back}; origin copies of f0.bin {copies_after:.2f}")
        assert back
