"""
The SuperNode dashboard in a real headless Chromium (driven over the DevTools
protocol, L{dragonfly.testing.browser}) against a real swarm: an origin, a
SuperNode and four dfpeers downloading one file, slowed with
C{dfget --locallimit} so that the page is watched while pieces move.
"""

from __future__ import annotations

import os
import time

import pytest

from dragonfly.testing.browser import Chromium, find_chromium, group_alive
from dragonfly.testing.swarm import Swarm, get_json, sha256_file, write_random_file

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 24 * MiB
PIECE = 256 * 1024
COUNT = SIZE // PIECE  # 96 pieces
PEERS = 4

# the swarm table as the page shows it: one entry per row of the task card
ROWS_JS = """
[...document.querySelectorAll('#tasks .task tbody tr')].map((r) => ({
  peer: r.dataset.peerId,
  seed: r.classList.contains('seed'),
  count: r.querySelector('td.count').textContent,
  cells: r.querySelectorAll('.bitmap .cell').length,
  on: r.querySelectorAll('.bitmap .cell.on').length,
  done: r.querySelector('.done-mark') !== null,
}))
"""

# pixels of the traffic chart in the peer-to-peer green (#21a37a, drawn at 85 %)
GREEN_PIXELS_JS = """
(() => {
  const c = document.getElementById('chart');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 0 && d[i + 1] > d[i] + 60 && d[i + 1] > d[i + 2] + 20) n++;
  }
  return n;
})()
"""


def _held(page) -> int:
    return sum(r["on"] for r in page.evaluate(ROWS_JS) if not r["seed"])


def test_dashboard_shows_a_live_swarm(tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium is not installed (Debian package 'chromium')")
    root = tmp_path / "www"
    root.mkdir()
    want = write_random_file(str(root / "dash.bin"), SIZE)
    with Swarm(str(tmp_path / "swarm")) as swarm:
        names = swarm.start_all(str(root), PEERS, "--piece-size", "256K")
        url = swarm.origin_url + "/dash.bin"
        with Chromium(binary) as browser:
            pgid = browser.proc.pid
            page = browser.new_page(1280, 900)
            # / redirects to the dashboard
            page.navigate(swarm.supernode_api + "/")
            assert page.evaluate("location.pathname") == "/ui"
            assert page.evaluate("document.title") == "Dragonfly SuperNode"
            page.wait_for("document.getElementById('status').dataset.state === 'live'")
            page.wait_for(f"document.querySelectorAll('#peers tr').length === {PEERS}")
            shown = page.evaluate("[...document.querySelectorAll('#peers tr')].map((r) => r.dataset.peerId).sort()")
            assert shown == sorted(swarm.peers[n]["peerId"] for n in names)

            # 24 MiB at 3 MiB/s: about 8 s for each peer
            outs = {n: str(tmp_path / f"{n}.out") for n in names}
            procs = {n: swarm.dfget(url, outs[n], n, "--locallimit", "3M") for n in names}

            # the task and its swarm appear: the seed's row and one row per
            # peer, each with one bitmap cell per piece
            page.wait_for(
                f"(() => {{ const rows = {ROWS_JS}; return rows.length === {PEERS + 1}"
                f" && rows.every((r) => r.cells === {COUNT}); }})()",
                timeout=15,
            )
            assert page.evaluate("document.querySelector('#tasks .task h3').textContent") == "dash.bin"
            rows = page.evaluate(ROWS_JS)
            assert rows[0]["seed"] and rows[0]["peer"] == "supernode"
            assert sorted(r["peer"] for r in rows[1:]) == sorted(swarm.peers[n]["peerId"] for n in names)

            # it updates without a reload: more cells filled a moment later
            page.evaluate("window.notReloaded = true")
            first = _held(page)
            assert first < PEERS * COUNT, "the downloads were over before the first look"
            page.wait_for(f"(() => {{ const rows = {ROWS_JS}; return rows.filter((r) => !r.seed)"
                          f".reduce((n, r) => n + r.on, 0) > {first}; }})()", timeout=10)
            assert page.evaluate("window.notReloaded") is True
            # the numbers agree with the cells (both drawn from the same answer)
            for r in page.evaluate(ROWS_JS):
                done, total = (int(x) for x in r["count"].split(" / "))
                assert total == COUNT and done == r["on"], r

            for name, proc in procs.items():
                _, err = proc.communicate(timeout=60)
                assert proc.returncode == 0, err.decode()
                assert sha256_file(outs[name]) == want

            # every row ends full, with its check mark
            page.wait_for(
                f"(() => {{ const rows = {ROWS_JS}; return rows.length === {PEERS + 1} && rows.every("
                f"(r) => r.on === {COUNT} && r.count === '{COUNT} / {COUNT}' && r.done); }})()",
                timeout=10,
            )

            # the traffic: the SuperNode's counters match the peers' own, and
            # the chart and the summary show the peer-to-peer share
            task_id = swarm.peer_tasks(names[0])[0]["taskId"]
            received = {"supernode": 0, "remote_peer": 0}
            for name in names:
                (task,) = [t for t in swarm.peer_tasks(name) if t["taskId"] == task_id]
                for kind in received:
                    received[kind] += task["traffic"][kind]
            assert received["remote_peer"] > 0
            deadline = time.monotonic() + 5
            while True:
                data = get_json(swarm.supernode_api + "/api/v1/dashboard")
                if data["totals"]["peerBytes"] == received["remote_peer"] or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert data["totals"] == {
                "originBytes": SIZE, "seedBytes": received["supernode"], "peerBytes": received["remote_peer"],
            }
            assert data["tasks"][0]["peerBytes"] == received["remote_peer"]
            assert len(data["traffic"]) >= 5
            page.wait_for(f"{GREEN_PIXELS_JS} > 500", timeout=5)
            shown = page.evaluate("document.getElementById('sum-peer').textContent")
            assert shown.endswith("MiB") and float(shown.split()[0]) > 0

            page.screenshot(str(tmp_path / "dashboard.png"))
            # nothing went wrong in the page, and it loaded nothing from elsewhere
            errors = page.events("Runtime.exceptionThrown") + [
                e for e in page.events("Log.entryAdded") if e["params"]["entry"]["level"] == "error"
            ]
            assert errors == []
            urls = {e["params"]["request"]["url"] for e in page.events("Network.requestWillBeSent")}
            assert urls and all(u.startswith(swarm.supernode_api + "/") for u in urls), urls
            assert swarm.supernode_api + "/api/v1/dashboard" in urls
            assert os.path.getsize(tmp_path / "dashboard.png") > 10000
        # Chromium and every process it started are gone
        assert group_alive(pgid) == []
