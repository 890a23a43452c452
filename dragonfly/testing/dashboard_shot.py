"""
Take a screenshot of the SuperNode dashboard during a real swarm download
(how C{docs/dashboard.png} is made).

Starts an origin, a SuperNode and five dfpeers on loopback; the peers fetch
a 48 MiB file at 12 MiB/s each, and a while later a 128 MiB file at rates of
8 to 16 MiB/s, starting a moment apart; a few seconds after every peer has
joined the second download headless Chromium photographs
C{http://SUPERNODE/ui}.

    python -m dragonfly.testing.dashboard_shot OUT.png [--delay 5] [--width 1280]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from .browser import Chromium, find_chromium
from .swarm import Swarm, get_json, write_random_file

MiB = 1 << 20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dragonfly.testing.dashboard_shot", description=__doc__.split("\n\n")[1])
    p.add_argument("output", help="the PNG to write")
    p.add_argument("--delay", type=float, default=4.0, help="seconds after every peer joined the second download (default 4)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--peers", type=int, default=5)
    args = p.parse_args(argv)
    if find_chromium() is None:
        print("chromium is not installed", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="dragonfly-shot-")
    try:
        www = os.path.join(workdir, "www")
        os.makedirs(www)
        write_random_file(os.path.join(www, "base-layer.tar.gz"), 48 * MiB)
        write_random_file(os.path.join(www, "model-weights.bin"), 128 * MiB)
        with Swarm(workdir) as swarm, Chromium() as browser:
            names = swarm.start_all(www, args.peers)
            page = browser.new_page(args.width, 900)
            page.navigate(swarm.supernode_api + "/")
            first = [
                swarm.dfget(swarm.origin_url + "/base-layer.tar.gz", os.path.join(workdir, f"{n}.1"), n, "--locallimit", "12M")
                for n in names
            ]
            for proc in first:
                proc.communicate(timeout=120)
            time.sleep(6)
            second = []
            for i, n in enumerate(names):
                rate = f"{8 + 2 * (i % 5)}M"
                out = os.path.join(workdir, f"{n}.2")
                second.append(swarm.dfget(swarm.origin_url + "/model-weights.bin", out, n, "--locallimit", rate))
                time.sleep(0.5)
            # every peer in the second swarm, then a few seconds of traffic
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                tasks = get_json(swarm.supernode_api + "/api/v1/dashboard")["tasks"]
                if tasks and len(tasks[0]["members"]) == len(names):
                    break
                time.sleep(0.2)
            time.sleep(args.delay)
            page.screenshot(args.output)
            for proc in second:
                proc.kill()
                proc.wait()
        print(f"wrote {args.output}")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
