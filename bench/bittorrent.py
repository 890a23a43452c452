"""
The BitTorrent baseline of the benchmarks: C{aria2c} peers, an
C{opentracker} tracker, C{mktorrent} for the .torrent (Debian packages
aria2, opentracker and mktorrent).

Debian's opentracker is built with a whitelist: it tracks only the info
hashes listed in its C{-w} file, which is read after it chroots into C{-d}.
So the tracker gets a directory of its own holding the whitelist, and runs
as C{nobody} (its C{-u}) when the benchmark runs as root.

Every aria2c runs with DHT, local peer discovery and peer exchange off (the
tracker is the only way peers meet, as in a closed swarm), no IPv6, no file
pre-allocation, and C{--stop-with-process} of the benchmark: it exits on its
own if the benchmark dies.

C{leech} is what a host runs at the start line of the swarm benchmark
(C{python -m bench.gate ... --call bench.bittorrent:leech -- ...}): it starts
aria2c, returns as soon as aria2c reports the download complete and verified
(its C{--on-bt-download-complete} hook), and leaves aria2c seeding, as a
dfpeer keeps serving after dfget is done.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import select
import shutil
import subprocess
import sys
import urllib.parse
from typing import Any

TOOLS = ("aria2c", "opentracker", "mktorrent")
HOOK_ENV = "DFB_BT_DONE"


def missing_tools() -> list[str]:
    """The BitTorrent tools this machine lacks (apt-get install aria2 opentracker mktorrent)."""
    return [t for t in TOOLS if shutil.which(t) is None]


def unavailable() -> str | None:
    """Why the BitTorrent baseline cannot run here, or None."""
    missing = missing_tools()
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install aria2 opentracker mktorrent)"
    return None


# -- bencoding ---------------------------------------------------------------------


def bdecode(data: bytes) -> Any:
    """Decode one bencoded value that fills C{data} (ValueError when it does not)."""
    try:
        value, end = _decode(data, 0)
    except RecursionError:
        raise ValueError("bencoded value nested too deep") from None
    if end != len(data):
        raise ValueError(f"{len(data) - end} bytes after the bencoded value")
    return value


def _decode(data: bytes, i: int) -> tuple[Any, int]:
    if i >= len(data):
        raise ValueError("bencoded value cut short")
    c = data[i:i + 1]
    if c == b"i":
        end = data.index(b"e", i)
        text = data[i + 1:end]
        if not text or text != str(int(text)).encode():
            raise ValueError(f"bad integer {text!r}")
        return int(text), end + 1
    if c in (b"l", b"d"):
        items: list[Any] = []
        i += 1
        while data[i:i + 1] != b"e":
            item, i = _decode(data, i)
            items.append(item)
        if c == b"l":
            return items, i + 1
        if len(items) % 2 or not all(isinstance(k, bytes) for k in items[::2]):
            raise ValueError("a dictionary needs byte-string keys, each with a value")
        return dict(zip(items[::2], items[1::2])), i + 1
    if c.isdigit():
        colon = data.index(b":", i)
        length = int(data[i:colon])
        end = colon + 1 + length
        if end > len(data):
            raise ValueError("byte string cut short")
        return data[colon + 1:end], end
    raise ValueError(f"unexpected {c!r} at {i}")


def info_hash(torrent: bytes) -> bytes:
    """The SHA-1 of the bencoded C{info} dictionary, exactly as it appears in the file."""
    if torrent[:1] != b"d":
        raise ValueError("a .torrent is a bencoded dictionary")
    i = 1
    while torrent[i:i + 1] != b"e":
        key, i = _decode(torrent, i)
        start = i
        _, i = _decode(torrent, i)
        if key == b"info":
            return hashlib.sha1(torrent[start:i]).digest()
    raise ValueError("no info dictionary")


# -- making the torrent ------------------------------------------------------------


def piece_exponent(size: int) -> int:
    """
    log2 of the piece length: about 1500 pieces, from 256 KiB (mktorrent's
    default) to 16 MiB, as common clients choose (1 MiB for 1 GiB).
    """
    return max(18, min(24, math.ceil(math.log2(max(size, 1) / 1500))))


def make_torrent(payload: str, announce: str, out: str, exponent: int | None = None) -> bytes:
    """Write C{out} for the file C{payload} with mktorrent; return its info hash."""
    exponent = piece_exponent(os.path.getsize(payload)) if exponent is None else exponent
    if os.path.exists(out):
        os.unlink(out)
    result = subprocess.run(
        ["mktorrent", "-a", announce, "-l", str(exponent), "-d", "-o", out, payload],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"mktorrent failed: {result.stderr.strip()[-300:]}")
    with open(out, "rb") as f:
        return info_hash(f.read())


# -- the tracker -------------------------------------------------------------------


def tracker_argv(ip: str, port: int, udp_port: int, home: str, hashes: list[bytes]) -> list[str]:
    """
    opentracker on C{ip}:C{port} (and C{udp_port}), tracking only C{hashes}.
    C{home} becomes its chroot (as root) and holds the whitelist.
    """
    os.makedirs(home, exist_ok=True)
    os.chmod(home, 0o755)
    with open(os.path.join(home, "whitelist"), "w") as f:
        f.writelines(h.hex() + "\n" for h in hashes)
    os.chmod(os.path.join(home, "whitelist"), 0o644)
    argv = ["opentracker", "-i", ip, "-p", str(port), "-P", str(udp_port)]
    if os.geteuid() == 0:
        return argv + ["-d", home, "-u", "nobody", "-w", "/whitelist"]
    return argv + ["-d", home, "-w", os.path.join(home, "whitelist")]


def scrape_url(announce: str, ih: bytes) -> str:
    return announce.replace("/announce", "/scrape") + "?info_hash=" + urllib.parse.quote(ih)


def seeders(scrape_reply: bytes, ih: bytes) -> int:
    """How many complete peers (seeders) the tracker's scrape reply lists for C{ih}."""
    files = bdecode(scrape_reply).get(b"files", {})
    return int(files.get(ih, {}).get(b"complete", 0))


# -- aria2c ------------------------------------------------------------------------


def aria2_argv(torrent: str, directory: str, ip: str, port: int, seed: bool = False,
               exit_when_done: bool = False, stop_with: int | None = None, extra: list[str] | None = None) -> list[str]:
    """
    An aria2c that seeds C{torrent} from C{directory} (C{seed}: the file is
    there already, not re-hashed), or downloads it there and then seeds on
    until stopped (or exits at once with C{exit_when_done}).
    """
    argv = [
        "aria2c", "--enable-dht=false", "--enable-dht6=false", "--bt-enable-lpd=false",
        "--enable-peer-exchange=false", "--disable-ipv6=true", f"--listen-port={port}",
        "--dir", directory, "--file-allocation=none", "--console-log-level=warn", "--summary-interval=0",
        "--check-certificate=false", "--auto-save-interval=0", "--bt-save-metadata=false",
        "--allow-overwrite=true", "--quiet=false", "--show-console-readout=false",
    ]
    if ip not in ("127.0.0.1", "0.0.0.0"):
        argv += [f"--bt-external-ip={ip}"]
    if stop_with is not None:
        argv += [f"--stop-with-process={stop_with}"]
    if seed:
        argv += ["--bt-seed-unverified=true", "--seed-ratio=0.0", "--check-integrity=false"]
    elif exit_when_done:
        argv += ["--seed-time=0"]
    else:
        argv += ["--seed-ratio=0.0"]  # seed on after the download, until stopped
    return argv + list(extra or []) + [torrent]


def leech(argv: list[str]) -> int:
    """
    C{leech --done FIFO --pidfile FILE --log FILE -- aria2c ...}: start
    aria2c (with a hook that writes to FIFO when the download is complete),
    return 0 as soon as it does, leaving aria2c running; aria2c's exit code
    if it ends first.
    """
    p = argparse.ArgumentParser(prog="bench.bittorrent:leech")
    p.add_argument("--done", required=True)
    p.add_argument("--pidfile", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no aria2c command")
    hook = args.done + ".hook"
    with open(hook, "w") as f:
        f.write(f'#!/bin/sh\nprintf d > "${HOOK_ENV}"\n')
    os.chmod(hook, 0o755)
    with contextlib.suppress(FileExistsError):  # left from an earlier try
        os.mkfifo(args.done)
    fifo = os.open(args.done, os.O_RDONLY | os.O_NONBLOCK)
    with open(args.log, "ab") as log:
        proc = subprocess.Popen([command[0], f"--on-bt-download-complete={hook}", *command[1:]],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, HOOK_ENV: args.done}, start_new_session=True)
    with open(args.pidfile, "w") as f:
        f.write(f"{proc.pid}\n")
    # keep a writer open ourselves so the FIFO never reads as EOF before the hook writes
    keep = os.open(args.done, os.O_WRONLY | os.O_NONBLOCK)
    try:
        while True:
            readable, _, _ = select.select([fifo], [], [], 0.5)
            if readable and os.read(fifo, 1):
                return 0
            if proc.poll() is not None:
                return proc.returncode or 1  # ended without completing
    finally:
        os.close(keep)
        os.close(fifo)


if __name__ == "__main__":  # python -m bench.bittorrent leech ... (by hand)
    if sys.argv[1:2] == ["leech"]:
        sys.exit(leech(sys.argv[2:]))
    sys.exit(__doc__)
