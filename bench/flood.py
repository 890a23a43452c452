"""
A dfpeer's block port flooded while a real download runs through it.

    python -m bench.flood [--idle 2000] [--garbage 1000] [--size-mib 64] [--rate 16M] [--rounds 3]

On loopback: a counting origin, a SuperNode and two dfpeers, A (flooded) and
B.  Each round, a dfget through A and one through B download the same new
URL at once (A and B trade pieces: B connects to A's block port, through the
flood), each paced by C{--rate} (dfget C{--locallimit}), so an undisturbed
round takes about size/rate.  First C{--rounds} undisturbed rounds, then a
flooder process (its own C{ulimit -n} raised) holds C{--idle} connections to
A's block port that never send a byte and C{--garbage} more that send
random bytes, from C{--sources} addresses of 127.0.0.0/8 (fewer per address
than the dfpeer's per-address limit, so its total limit is what sheds them):
every connection the dfpeer closes is opened again a second later, so the
flood lasts; then C{--rounds} rounds under it.  Then the flooder stops: it
opens nothing more and sends nothing more, but keeps what is still open, so
the dfpeer must shed those itself (its handshake timeout).

Measured: the dfget times through A (and B) undisturbed and flooded, their
ratio (target: flooded within 1.2 x), A's open file count (C{/proc/PID/fd})
before, at its peak during the flood and after it stopped, with the seconds
until it was back to its baseline (target: within the handshake timeout,
10 s by default), and the first frame each flood connection was answered
with (ERROR 400 for garbage, 408 for silence, 429 over a limit).  The
dfpeer runs with C{--peer-nofile} as its open-file limit; its connection
limit must keep it below.  Prints JSON; C{--doc} writes a table between the
flood markers.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from dragonfly.testing.swarm import wait_for_file

from .docblock import write_block
from .measure import load_average, process_cpu_seconds
from .swarm import BIN, REPO

MiB = 1 << 20


def say(message: str) -> None:
    print(f"flood: {message}", file=sys.stderr, flush=True)


# -- the flooder (a process of its own: python -m bench.flood --flooder ...) ---------------


class Flooder:
    """
    Holds C{idle} silent and C{garbage} garbage-sending connections to
    C{port}, each opened again C{reopen} seconds after the far side closed
    it; counts the first ERROR code of each answer.  SIGUSR1: stop opening
    and sending, keep what is open.  SIGTERM: report and exit.
    """

    def __init__(self, host: str, port: int, idle: int, garbage: int, sources: list[str], reopen: float) -> None:
        self.host, self.port = host, port
        self.idle, self.garbage = idle, garbage
        self.sources = sources
        self.reopen = reopen
        self.stopped = False
        self.open = 0
        self.peak = 0
        self.connects = 0
        self.connect_errors = 0
        self.codes: dict[str, int] = {}
        self.held_max = 0.0
        self.rng = random.Random(7)

    async def slot(self, n: int, sends: bool) -> None:
        source = self.sources[n % len(self.sources)]
        while not self.stopped:
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port, local_addr=(source, 0))
            except OSError:
                self.connect_errors += 1
                await asyncio.sleep(self.reopen)
                continue
            self.connects += 1
            opened = time.monotonic()
            self.open += 1
            self.peak = max(self.peak, self.open)
            try:
                if sends:
                    # an unknown frame type, then noise: the port must answer ERROR 400 and close
                    writer.write(b"\x2a\x00\x00\x00\x40" + self.rng.randbytes(64))
                # whatever the port answers, until it closes the connection
                code = _first_error(await reader.read())
                self.codes[code] = self.codes.get(code, 0) + 1
                if code == "408":
                    # how long a silent connection was held, from our connect
                    self.held_max = max(self.held_max, time.monotonic() - opened)
            except OSError:
                self.codes["reset"] = self.codes.get("reset", 0) + 1
            finally:
                self.open -= 1
                writer.close()
            await asyncio.sleep(self.reopen)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, self.stop)
        loop.add_signal_handler(signal.SIGTERM, done.set)
        tasks = []
        total = self.idle + self.garbage
        for i in range(total):
            # the garbage slots spread evenly among the silent ones
            sends = (i * self.garbage) // total != ((i + 1) * self.garbage) // total
            tasks.append(asyncio.ensure_future(self.slot(i, sends)))
            if i % 100 == 99:
                await asyncio.sleep(0.01)  # a ramp of about a second, not one burst of SYNs
        reporter = asyncio.ensure_future(self.report_loop())
        await done.wait()
        reporter.cancel()
        self.report()
        os._exit(0)  # the held sockets close with the process

    def stop(self) -> None:
        """Open nothing more, send nothing more: what is open stays open, silent."""
        self.stopped = True

    async def report_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.report()

    def report(self) -> None:
        print(json.dumps({"open": self.open, "peak": self.peak, "connects": self.connects,
                          "connectErrors": self.connect_errors, "codes": self.codes,
                          "silentHeldMax": round(self.held_max, 2)}), flush=True)


def _first_error(data: bytes) -> str:
    """The code of an ERROR frame at the start of C{data} (type 0x0b, big-endian code), or what it was."""
    from dragonfly.protocol import frames as F

    if not data:
        return "closed"
    try:
        for event in F.FrameDecoder().feed(data):
            if isinstance(event, F.ErrorMsg):
                return str(event.code)
    except Exception:  # noqa: BLE001 -- a reply we cannot parse is counted as such
        return "unparsed"
    return "other"


def flooder_main(args: argparse.Namespace) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.idle + args.garbage + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(want, soft), hard), hard))
    sources = [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(args.sources)]
    f = Flooder("127.0.0.1", args.flooder, args.idle, args.garbage, sources, args.reopen)
    asyncio.run(f.run())
    return 0


# -- the benchmark ------------------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_file_limit(pid: int) -> int | None:
    """The soft open-file limit C{pid} runs with (the dfpeer raises its own to fit its connection limit)."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return None


def fd_kinds(pid: int) -> dict[str, int]:
    """C{pid}'s descriptors by kind: socket, pipe, anon_inode:..., or a file's directory."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = link.split("[", 1)[0].rstrip(":") if not link.startswith("/") else os.path.dirname(link).rsplit("/", 1)[-1]
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def flood_sockets(pid: int) -> int:
    """How many of C{pid}'s descriptors are TCP connections with a flood address (127.1.0.0/16) at the far end."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    n = 0
    with open(f"/proc/{pid}/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            remote, inode = fields[2], fields[9]
            # little-endian hex IPv4: 127.1.x.y is "....017F" with the second byte 01
            if inode in inodes and remote[6:8] == "7F" and remote[4:6] == "01":
                n += 1
    return n


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        self.args, self.workdir = args, workdir
        self.www = os.path.join(workdir, "www")
        self.logs = os.path.join(workdir, "logs")
        self.out = os.path.join(workdir, "out")
        for d in (self.www, self.logs, self.out):
            os.makedirs(d)
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def spawn(self, tag: str, argv: list[str], nofile: int | None = None) -> subprocess.Popen:
        def limit() -> None:
            if self.args.priority:
                os.nice(-self.args.priority)
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, max(nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))

        with open(os.path.join(self.logs, f"{tag}.log"), "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=self.env,
                                    preexec_fn=limit)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        data = random.Random(1).randbytes(self.args.size_mib * MiB)
        with open(os.path.join(self.www, "f.bin"), "wb") as f:
            f.write(data)
        self.sha = hashlib.sha256(data).hexdigest()
        info = os.path.join(self.workdir, "origin.json")
        self.spawn("origin", [sys.executable, "-m", "dragonfly.testing.origin", "--root", self.www, "--port", "0",
                              "--interface", "127.0.0.1", "--info", info])
        self.origin = wait_for_file(info, 30, self.procs[-1])
        home = os.path.join(self.workdir, "supernode")
        os.makedirs(home)
        sn = self.spawn("supernode", [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "supernode", "--port", "0",
                                      "--block-port", "0", "--listen", "127.0.0.1", "--advertise-ip", "127.0.0.1",
                                      "--home", home])
        self.sn = wait_for_file(os.path.join(home, "supernode.json"), 60, sn)
        self.node = f"127.0.0.1:{self.sn['port']}"
        self.peers: dict[str, dict[str, Any]] = {}

        def limits(name: str) -> list[str]:
            if name != "A" or not self.args.max_connections:
                return []
            return ["--block-max-connections", str(self.args.max_connections)]

        for name in ("A", "B"):
            home = os.path.join(self.workdir, f"peer{name}")
            os.makedirs(home)
            proc = self.spawn(f"peer{name}", [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "dfpeer",
                                              "--supernode", self.node, "--home", home, "--ip", "127.0.0.1",
                                              "--listen", "127.0.0.1", *limits(name)],
                              nofile=self.args.peer_nofile if name == "A" else None)
            info = wait_for_file(os.path.join(home, "peer.json"), 60, proc)
            self.peers[name] = {"home": home, "proc": proc, "info": info}

    def round(self, tag: str) -> dict[str, float]:
        url = f"{self.origin_url()}/f.bin?r={tag}"
        procs = {}
        start = time.monotonic()
        for name, peer in self.peers.items():
            out = os.path.join(self.out, f"{tag}-{name}")
            procs[name] = (out, self.spawn(f"dfget{name}", [
                os.path.join(BIN, "dfget"), "-u", url, "-o", out, "--home", peer["home"], "--node", self.node,
                "--no-progress", "--timeout", "300s", "--locallimit", self.args.rate,
            ]))
        times: dict[str, float] = {}
        while len(times) < len(procs):
            for name, (out, proc) in procs.items():
                if name not in times and proc.poll() is not None:
                    times[name] = time.monotonic() - start
                    if proc.returncode != 0:
                        raise RuntimeError(f"dfget through {name} exited {proc.returncode} (see {self.logs})")
                    with open(out, "rb") as f:
                        if hashlib.sha256(f.read()).hexdigest() != self.sha:
                            raise RuntimeError(f"dfget through {name}: wrong bytes")
                    os.unlink(out)
            time.sleep(0.02)
        say(f"round {tag}: " + ", ".join(f"{k} {v:.2f}s" for k, v in sorted(times.items())))
        return times

    def origin_url(self) -> str:
        return f"http://127.0.0.1:{self.origin['port']}"

    def run(self) -> dict[str, Any]:
        self.start()
        a = self.peers["A"]
        pid = a["proc"].pid
        block_port = a["info"]["blockPort"]
        cpu0, wall0 = process_cpu_seconds(pid), time.monotonic()
        calm = [self.round(f"calm-{i}") for i in range(self.args.rounds)]
        calm_cpu = (process_cpu_seconds(pid) - cpu0) / (time.monotonic() - wall0)
        time.sleep(1.0)
        baseline, baseline_kinds = fd_count(pid), fd_kinds(pid)
        say(f"dfpeer A (pid {pid}) has {baseline} open files; flooding its block port {block_port}")
        flooder = subprocess.Popen(
            [sys.executable, "-m", "bench.flood", "--flooder", str(block_port), "--idle", str(self.args.idle),
             "--garbage", str(self.args.garbage), "--sources", str(self.args.sources), "--reopen", str(self.args.reopen)],
            cwd=REPO, env=self.env, stdout=subprocess.PIPE, text=True,
        )
        self.procs.append(flooder)
        samples: list[tuple[float, int]] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.args.ramp:
            samples.append((time.monotonic() - t0, fd_count(pid)))
            time.sleep(0.1)
        flooded = []
        cpu0, wall0, fcpu0 = process_cpu_seconds(pid), time.monotonic(), process_cpu_seconds(flooder.pid)
        for i in range(self.args.rounds):
            sampler = _Sampler(pid)
            flooded.append(self.round(f"flood-{i}"))
            samples.extend(sampler.stop())
        wall = time.monotonic() - wall0
        flood_cpu = (process_cpu_seconds(pid) - cpu0) / wall
        flooder_cpu = (process_cpu_seconds(flooder.pid) - fcpu0) / wall
        during = max(n for _, n in samples)
        flooder.send_signal(signal.SIGUSR1)  # stop: nothing new opened or sent, what is open stays
        stopped = time.monotonic()
        back = None
        after: list[tuple[float, int]] = []
        at_stop = flood_sockets(pid)
        while time.monotonic() - stopped < self.args.handshake_timeout + 10:
            n, flood = fd_count(pid), flood_sockets(pid)
            after.append((round(time.monotonic() - stopped, 2), n, flood))
            if flood == 0:
                # the last flood connection is gone: what else is open is the dfpeer's own
                # (the last round's neighbour connections, which its idle timeout closes)
                back = time.monotonic() - stopped
                break
            time.sleep(0.1)
        after_kinds = fd_kinds(pid)
        flooder.send_signal(signal.SIGTERM)
        reports = [json.loads(line) for line in flooder.stdout.read().splitlines() if line.startswith("{")]
        flooder.wait()
        # undisturbed again: the machine's load drifts, so the reference is the rounds before and after
        calm += [self.round(f"calm-after-{i}") for i in range(self.args.rounds)]
        refused = _count(os.path.join(self.logs, "peerA.log"), "refusing a block connection")
        a_calm = [t["A"] for t in calm]
        a_flood = [t["A"] for t in flooded]
        return {
            "idle": self.args.idle, "garbage": self.args.garbage, "sources": self.args.sources, "reopen": self.args.reopen,
            "sizeMiB": self.args.size_mib, "rate": self.args.rate, "rounds": self.args.rounds,
            "priority": self.args.priority, "peerNofile": self.args.peer_nofile,
            "peerNofileEffective": open_file_limit(pid), "maxConnections": self.args.max_connections or 1024,
            "calm": calm, "flooded": flooded,
            "ratioMedianA": round(statistics.median(a_flood) / statistics.median(a_calm), 2),
            "ratioWorstA": round(max(a_flood) / max(a_calm), 2),
            "ratioMedianB": round(statistics.median(t["B"] for t in flooded) / statistics.median(t["B"] for t in calm), 2),
            # dfpeer A's CPU share (1.0: one core) in the rounds, and the flooder's own
            "cpuA": {"calm": round(calm_cpu, 2), "flooded": round(flood_cpu, 2)}, "cpuFlooder": round(flooder_cpu, 2),
            "loadAverage": load_average(),
            "fdBaseline": baseline, "fdPeak": during, "fdAfterStop": after[-1][1] if after else None,
            "floodSocketsAtStop": at_stop, "floodSocketsAfter": after[-1][2] if after else None,
            "secondsToNoFloodSocket": round(back, 2) if back is not None else None,
            "fdAfterStopMinusBaseline": (after[-1][1] - baseline) if after else None,
            "fdKindsBaseline": baseline_kinds, "fdKindsAfter": after_kinds,
            "flooder": reports[-1] if reports else None,
            "refusalsLogged": refused,
        }

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class _Sampler:
    """Samples a process's open file count every 0.2 s in a thread, until stopped."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self.running = True
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        t0 = time.monotonic()
        while self.running:
            self.samples.append((time.monotonic() - t0, fd_count(self.pid)))
            time.sleep(0.2)

    def stop(self) -> list[tuple[float, int]]:
        self.running = False
        self.thread.join()
        return self.samples


def _count(path: str, needle: str) -> int:
    try:
        with open(path, errors="replace") as f:
            return sum(1 for line in f if needle in line)
    except OSError:
        return 0


def table(r: dict[str, Any]) -> str:
    calm_a = [t["A"] for t in r["calm"]]
    flood_a = [t["A"] for t in r["flooded"]]
    calm_b = [t["B"] for t in r["calm"]]
    flood_b = [t["B"] for t in r["flooded"]]
    codes = (r.get("flooder") or {}).get("codes") or {}
    fmt = ", ".join
    lines = [
        (f"`python -m bench.flood --idle {r['idle']} --garbage {r['garbage']}"
         + (f" --priority {r['priority']}" if r.get("priority") else "")
         + f"`: {r['sizeMiB']} MiB through dfpeer A "
         f"and B at once, each at {r['rate']}/s (`--locallimit`), {r['rounds']} rounds each way; the flood from "
         f"{r['sources']} addresses of 127.0.0.0/8, a connection the dfpeer closed opened again after {r['reopen']} s; "
         f"dfpeer A started with an open-file limit of {r['peerNofile']}, its connection limit {r['maxConnections']}; "
         f"load average {r['loadAverage']:.1f} on 2 cores"
         + (f"; all but the flooder at nice -{r['priority']}" if r.get("priority") else "") + "."),
        "",
        "| | undisturbed | flooded | target |",
        "|---|---|---|---|",
        f"| dfget through A (s; undisturbed: before the flood, then after it) | {fmt(f'{t:.2f}' for t in calm_a)} | {fmt(f'{t:.2f}' for t in flood_a)} | "
        f"median within 1.2 x (here {r['ratioMedianA']} x; slowest over slowest {r['ratioWorstA']} x) |",
        f"| dfget through B (s) | {fmt(f'{t:.2f}' for t in calm_b)} | {fmt(f'{t:.2f}' for t in flood_b)} | "
        f"(median {r['ratioMedianB']} x) |",
        f"| dfpeer A's CPU (1.0 = one core) | {r['cpuA']['calm']} | {r['cpuA']['flooded']} "
        f"(the flooder itself: {r['cpuFlooder']}) | |",
        f"| A's open files | {r['fdBaseline']} | peak {r['fdPeak']} | below its limit "
        f"({r.get('peerNofileEffective')}: started with {r['peerNofile']}) |",
        f"| after the flood stopped (its {r['floodSocketsAtStop']} open connections left open, silent) | | "
        f"no flood connection open after {r['secondsToNoFloodSocket']} s; then {r['fdAfterStop']} open files "
        f"({r['fdAfterStopMinusBaseline']:+d}: the last round's own connections and files) | "
        "back to baseline within the handshake timeout (10 s) |",
        f"| flood connections answered (first frame) | | {fmt(f'{k}: {v}' for k, v in sorted(codes.items()))} | "
        "400 garbage, 408 silent, 429 over a limit |",
        f"| longest a silent connection was held (its connect to its ERROR 408) | | "
        f"{(r.get('flooder') or {}).get('silentHeldMax')} s | the handshake timeout, 10 s |",
    ]
    return "\n".join(lines)


def write_doc(path: str, text: str) -> None:
    write_block(path, "flood", text, "Block port flood")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--idle", type=int, default=2000, help="connections that never send a byte")
    p.add_argument("--garbage", type=int, default=1000, help="connections that send garbage")
    p.add_argument("--sources", type=int, default=50, help="source addresses the flood comes from")
    p.add_argument("--reopen", type=float, default=1.0, help="seconds before a closed flood connection is opened again")
    p.add_argument("--ramp", type=float, default=3.0, help="seconds of flood before the first flooded round")
    p.add_argument("--size-mib", type=int, default=64)
    p.add_argument("--rate", default="16M", help="dfget --locallimit of each download")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peer-nofile", type=int, default=4096, help="dfpeer A's open-file limit (RLIMIT_NOFILE)")
    p.add_argument("--max-connections", type=int, default=0,
                   help="dfpeer A's --block-max-connections (0: its default, 1024)")
    p.add_argument("--handshake-timeout", type=float, default=10.0, help="the dfpeer's (its default)")
    p.add_argument("--priority", type=int, default=0,
                   help="run the origin, SuperNode, dfpeers and dfgets this much above normal (nice -N, root): "
                        "on a shared machine, keeps other work's load out of the times; the flooder stays at normal")
    p.add_argument("--doc", default="", help="write the table here (docs/reliability.md)")
    p.add_argument("--json", default="", help="write the numbers here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument("--flooder", type=int, default=0, help=argparse.SUPPRESS)  # internal: flood this port
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.flooder:
        return flooder_main(args)
    workdir = tempfile.mkdtemp(prefix="dfflood-")
    bench = Bench(args, workdir)
    try:
        result = bench.run()
    finally:
        bench.close()
        if args.keep:
            say(f"logs in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.doc:
        write_doc(args.doc, table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
