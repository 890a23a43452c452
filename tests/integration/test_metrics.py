"""
Real processes: after a swarm download, the dfpeers' and the SuperNode's
/metrics account for every byte, and the JSON logs follow the task id.
"""

import json
import os
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dragonfly.core.ids import task_id
from dragonfly.testing.swarm import Swarm, sha256_file, write_random_file

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 24 * MiB + 5
TYPES = ("back_to_source", "supernode", "remote_peer")


def value(m, name, **labels):
    return m.get((name, frozenset(labels.items())), 0.0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def json_events(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith("{")]


def test_metrics_account_for_a_swarm_download(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    digest = write_random_file(str(root / "f.bin"), SIZE)
    with Swarm(str(tmp_path / "swarm"), twistd_args=("--logger=dragonfly.core.logs.json_stdout",)) as swarm:
        swarm.start_origin(str(root))
        swarm.start_supernode()
        names = ["p0", "p1", "p2"]
        swarm.start_peer("p0")
        swarm.start_peer("p1")
        scrape_port = free_port()
        swarm.start_peer("p2", "--metrics", f"tcp:{scrape_port}:interface=127.0.0.1")
        url = swarm.origin_url + "/f.bin"
        before = {n: swarm.metrics(n) for n in names}
        for n in names:
            assert sum(value(before[n], "dragonfly_dfpeer_download_traffic_bytes_total", type=t) for t in TYPES) == 0
        procs = {n: swarm.dfget(url, str(tmp_path / f"{n}.out"), n) for n in names}
        for n, proc in procs.items():
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err.decode()
            assert sha256_file(str(tmp_path / f"{n}.out")) == digest
        served_by_seed = 0
        uploaded = 0
        for n in names:
            m = swarm.metrics(n)
            traffic = {t: value(m, "dragonfly_dfpeer_download_traffic_bytes_total", type=t) for t in TYPES}
            assert sum(traffic.values()) == SIZE, (n, traffic)
            assert traffic["back_to_source"] == 0
            served_by_seed += traffic["supernode"]
            uploaded += value(m, "dragonfly_dfpeer_upload_bytes_total")
            assert value(m, "dragonfly_dfpeer_downloads_total", result="success") == 1
            assert value(m, "dragonfly_dfpeer_download_duration_seconds_count") == 1
            assert value(m, "dragonfly_dfpeer_tasks", status="success") == 1
            assert value(m, "dragonfly_dfpeer_http_requests_total", handler="start", code="200") >= 1
        # p2's scrape port shows what its local API shows
        with urllib.request.urlopen(f"http://127.0.0.1:{scrape_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        scraped = {
            (s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples
        }
        p2 = swarm.metrics("p2")
        assert value(scraped, "dragonfly_dfpeer_upload_bytes_total") == value(p2, "dragonfly_dfpeer_upload_bytes_total")
        assert value(scraped, "dragonfly_dfpeer_download_duration_seconds_count") == 1
        # every piece one peer got from another was uploaded by that other
        received_from_peers = 3 * SIZE - served_by_seed
        sn = swarm.metrics()
        assert value(sn, "dragonfly_supernode_origin_bytes_total") == SIZE
        assert swarm.origin_stats()["requests"]["/f.bin"] == 1
        assert value(sn, "dragonfly_supernode_cdn_cache_misses_total") == 1
        assert value(sn, "dragonfly_supernode_cdn_cache_hits_total") == 2
        assert value(sn, "dragonfly_supernode_tasks", cdnstatus="success") == 1
        assert value(sn, "dragonfly_supernode_peers") == 3
        # the seed sent at least what the peers kept from it (plus any duplicates)
        assert value(sn, "dragonfly_supernode_seed_bytes_total") >= served_by_seed
        assert uploaded >= received_from_peers
        assert value(sn, "dragonfly_supernode_schedule_duration_seconds_count") >= 3
        assert value(sn, "dragonfly_supernode_http_requests_total", handler="sync", code="200") >= 3
        print(f"\nseed {served_by_seed / SIZE:.2f} copies, peers {received_from_peers / SIZE:.2f} copies")

        # one task id followed through the SuperNode's and every peer's JSON log
        tid = task_id(url)
        sn_events = [e for e in json_events(os.path.join(swarm.workdir, "supernode.log")) if e.get("taskId") == tid]
        assert any(e.get("bytes") == SIZE and "origin fetch complete" in e["text"] for e in sn_events)
        assert {e.get("peerId") for e in sn_events} >= {swarm.peers[n]["peerId"] for n in names}
        for n in names:
            events = [e for e in json_events(os.path.join(swarm.workdir, f"{n}.log")) if e.get("taskId") == tid]
            (done,) = [e for e in events if e["text"].startswith(f"task {tid[:12]}: complete")]
            assert done["bytes"] == SIZE and done["peerId"] == swarm.peers[n]["peerId"]
