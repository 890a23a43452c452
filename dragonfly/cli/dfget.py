"""
dfget: download a file through the Dragonfly swarm.

    dfget -u URL -o PATH [--node HOST:PORT,...] [--home DIR] [--header 'K: V']...
          [--digest sha256:HEX | --md5 HEX] [--identifier ID] [--filter KEYS]
          [--timeout 5m] [--notbs] [--showbar]

dfget asks the dfpeer daemon of C{--home} (found through C{HOME/peer.json}) to
download; when none runs it starts one that keeps serving what it fetched for
a while afterwards (C{--idle-exit}).  The bytes are copied to a temporary file
beside PATH and renamed into place only after the whole-file check, so on any
failure nothing is left at PATH.  When no daemon can be started and the
SuperNode is gone dfget fetches from the origin itself, unless C{--notbs}.

Exit codes: 0 done; 2 bad usage or input; 3 download failed (origin or swarm);
4 the content failed its digest check; 5 timed out; 6 local I/O error.
"""

from __future__ import annotations

# dfget should ask its dfpeer for the file a blink after it starts: it
# imports no Twisted and no treq, and loads what only some runs need (the
# origin fallback's urllib, hashing for --digest/--md5) where it is used.
# tests/unit/test_layering.py keeps Twisted out of this path.
import argparse
import json
import os
import sys
import time
from typing import Any, NoReturn

from ..core import localhttp
from ..core.defaults import DEFAULT_HOME, DEFAULT_NODE
from ..core.files import unlink_quietly
from ..core.ids import BadInput, check_url, parse_digest, parse_filter, parse_header
from ..core.nodes import parse_nodes
from ..core.units import human_bytes, parse_duration, parse_rate
from ..peer import launch

__all__ = ["DEFAULT_HOME", "DEFAULT_NODE", "Failure", "main", "start_daemon"]

EXIT_OK, EXIT_USAGE, EXIT_FAILED, EXIT_DIGEST, EXIT_TIMEOUT, EXIT_IO = 0, 2, 3, 4, 5, 6
CHUNK = 1 << 20


class Failure(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _help_width() -> int:
    """
    What argparse's help formatter would ask C{shutil.get_terminal_size}
    (C{COLUMNS}, else the terminal of stdout, else 80), less its margin of 2,
    without importing C{shutil}: argparse makes a formatter for every
    argument added (to check its metavar), and that import (shutil loads
    fnmatch, bz2, lzma) was most of the 8-9 ms dfget spent parsing its
    arguments, in every run.
    """
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 80
    return columns - 2


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_help_width())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dfget", description="Download a file through the Dragonfly P2P swarm.", formatter_class=_HelpFormatter
    )
    p.add_argument("-u", "--url", required=True, help="the origin URL (http or https)")
    p.add_argument("-o", "--output", "-O", required=True, help="where to write the file")
    p.add_argument("-n", "--node", "--supernode", dest="node", default=None, help="SuperNodes, host[:port][=weight],... (default: the running dfpeer's, else 127.0.0.1:8002)")
    p.add_argument("--home", default=os.environ.get("DFGET_HOME", DEFAULT_HOME), help="work home of the dfpeer to use")
    p.add_argument("--header", action="append", default=[], help="'Name: value' passed to the origin (repeatable)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--digest", help="expected content digest, sha256:<hex>; also names the swarm")
    group.add_argument("-m", "--md5", help="expected MD5 of the content (hex)")
    p.add_argument("-i", "--identifier", help="extra task identity (different content behind one URL)")
    p.add_argument("-f", "--filter", help="query keys left out of the task id, separated by &")
    p.add_argument("-e", "--timeout", default="30m", help="give up after this long (e.g. 300s, 5m)")
    p.add_argument("-s", "--locallimit", help="download rate for this file, e.g. 20M (N, NK, NM, NG bytes/s)")
    p.add_argument("--totallimit", help="download rate for the whole host (the dfpeer's), e.g. 50M")
    p.add_argument("--notbs", "--disable-back-to-source", action="store_true", dest="notbs", help="never download from the origin directly")
    p.add_argument("-b", "--showbar", action="store_true", help="show a progress bar (the default on a terminal)")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.add_argument("--idle-exit", default="300s", help="how long a dfpeer started by dfget keeps serving when idle")
    p.add_argument("--copy", action="store_true", help="always copy the file out of the dfpeer's store (default: a hard link when on the same filesystem)")
    p.add_argument("--verbose", action="store_true", help="say where the bytes came from")
    p.add_argument("--cluster-token-file", help="file holding the SuperNode's cluster token, for a dfpeer dfget starts")
    p.add_argument("--cacerts", help="PEM CA file for https:// SuperNodes, for a dfpeer dfget starts")
    return p


def fail(message: str, code: int) -> NoReturn:
    raise Failure(code, message)


def validate(args: argparse.Namespace) -> dict[str, Any]:
    try:
        check_url(args.url)
        headers = dict(parse_header(h) for h in args.header)
        digest = None
        if args.digest:
            algo, hexd = parse_digest(args.digest)
            if algo != "sha256":
                raise BadInput("--digest takes sha256:<hex>")
            digest = f"sha256:{hexd}"
        md5 = None
        if args.md5:
            _, md5 = parse_digest("md5:" + args.md5)
        timeout = parse_duration(args.timeout)
        idle = parse_duration(args.idle_exit)
        nodes = parse_nodes(args.node) if args.node else None
        local_limit = parse_rate(args.locallimit) if args.locallimit else 0
        total_limit = parse_rate(args.totallimit) if args.totallimit else 0
    except (BadInput, ValueError) as e:
        fail(str(e), EXIT_USAGE)
    for name, path in (("--cluster-token-file", args.cluster_token_file), ("--cacerts", args.cacerts)):
        if path is not None and not os.path.isfile(path):
            fail(f"{name} {path} is not a readable file", EXIT_USAGE)
    output = os.path.abspath(args.output)
    if os.path.isdir(output):
        fail(f"output {output} is a directory", EXIT_USAGE)
    if not os.path.isdir(os.path.dirname(output)):
        fail(f"output directory {os.path.dirname(output)} does not exist", EXIT_USAGE)
    return {
        "url": args.url, "headers": headers, "digest": digest, "md5": md5, "identifier": args.identifier,
        "filter": parse_filter(args.filter), "timeout": timeout, "idle": idle, "nodes": nodes,
        "output": output, "notbs": args.notbs, "home": os.path.abspath(args.home), "copy": args.copy,
        "localLimit": local_limit, "totalLimit": total_limit,
        "daemonArgs": (["--cluster-token-file", os.path.abspath(args.cluster_token_file)] if args.cluster_token_file else [])
        + (["--supernode-ca", os.path.abspath(args.cacerts)] if args.cacerts else []),
    }


# -- talking to the dfpeer ---------------------------------------------------------


def _call(
    api: str, method: str, path: str, body: Any = None, timeout: float = 10.0, connect_timeout: float | None = None
) -> dict[str, Any]:
    """
    One call to the dfpeer's local API (loopback): its JSON answer, or
    L{Failure} when it refuses; L{localhttp.NotListening} when nothing listens.
    """
    data = json.dumps(body).encode() if body is not None else None
    status, raw = localhttp.request(api, method, path, data, timeout, connect_timeout)
    try:
        answer = json.loads(raw or b"{}")
    except ValueError:
        raise ConnectionError(f"the dfpeer at {api} sent no JSON") from None
    if status >= 400:
        err = answer.get("error", {}) if isinstance(answer, dict) else {}
        code = EXIT_USAGE if status == 400 else EXIT_FAILED
        raise Failure(code, err.get("message") or f"dfpeer answered {status}")
    return answer


def start_daemon(home: str, nodes: list[str] | None, idle: float, extra: list[str] | None = None) -> str:
    """Start a dfpeer for C{home} in the background and wait for its local API."""
    try:
        return launch.run_blocking(launch.start(home, launch.BlockingIO(), nodes, idle, extra))
    except launch.LaunchError as e:
        raise Failure(EXIT_FAILED, e.message) from None


# -- progress ------------------------------------------------------------------------


class Bar:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.monotonic()
        self.width = 30

    def show(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = human_bytes(done / elapsed) + "/s"
        if total:
            frac = min(done / total, 1.0)
            filled = int(frac * self.width)
            bar = "=" * filled + (">" if filled < self.width else "") + " " * (self.width - filled - 1)
            line = f"\r[{bar[:self.width]}] {frac * 100:5.1f}% {human_bytes(done)}/{human_bytes(total)} {rate}"
        else:
            line = f"\r{human_bytes(done)} {rate}"
        sys.stderr.write(line)
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


# -- writing the output ----------------------------------------------------------------


def _tmp_path(output: str) -> str:
    d, name = os.path.split(output)
    return os.path.join(d, f".{name}.dfget-{os.getpid()}.tmp")


def _check(sha: str, md5: str | None, length: int, opts: dict[str, Any], expect_length: int | None, expect_sha: str | None) -> None:
    if expect_length is not None and length != expect_length:
        fail(f"got {length} bytes, expected {expect_length}", EXIT_DIGEST)
    if expect_sha and sha != expect_sha:
        fail(f"content has sha256:{sha}, the supernode published sha256:{expect_sha}", EXIT_DIGEST)
    if opts["digest"] and sha != opts["digest"].split(":", 1)[1]:
        fail(f"content has sha256:{sha}, expected {opts['digest']}", EXIT_DIGEST)
    if opts["md5"] and md5 != opts["md5"]:
        fail(f"content has md5 {md5}, expected {opts['md5']}", EXIT_DIGEST)


def _copy_hashing(src: Any, dst: Any, opts: dict[str, Any], progress: Any = None, deadline: float | None = None) -> tuple[int, str, str | None]:
    """Copy C{src} to C{dst} in 1 MiB chunks; return the length, SHA-256 and MD5 (if asked)."""
    import hashlib

    sha, md5 = hashlib.sha256(), hashlib.md5() if opts["md5"] else None
    length = 0
    while chunk := src.read(CHUNK):
        if deadline is not None and time.monotonic() > deadline:
            fail("timed out", EXIT_TIMEOUT)
        sha.update(chunk)
        if md5 is not None:
            md5.update(chunk)
        dst.write(chunk)
        length += len(chunk)
        if progress is not None:
            progress(length)
    return length, sha.hexdigest(), md5.hexdigest() if md5 else None


def _kernel_copy(src: Any, dst: Any) -> int:
    """Copy a whole file inside the kernel (copy_file_range; a reflink where the filesystem can)."""
    import errno
    import shutil

    length = 0
    try:
        while n := os.copy_file_range(src.fileno(), dst.fileno(), 1 << 30):
            length += n
        return length
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL) or length:
            raise
    shutil.copyfileobj(src, dst, CHUNK)
    return dst.tell()


def _link_or_copy(src_path: str, tmp: str, src: Any, dst: Any, copy: bool) -> int:
    """
    A hard link to the dfpeer's finished (read-only) file where both are on
    one filesystem: no second copy of the data to write.  Else, or with
    C{--copy}, a copy made in the kernel.
    """
    if not copy:
        try:
            os.unlink(tmp)
            os.link(src_path, tmp)
            return os.fstat(src.fileno()).st_size
        except OSError:
            # another filesystem, or links not allowed: copy instead
            with open(tmp, "wb") as fresh:
                return _kernel_copy(src, fresh)
    return _kernel_copy(src, dst)


def install(
    src_path: str, opts: dict[str, Any], expect_length: int | None, expect_sha: str | None, verified: bool = False
) -> int:
    """
    Copy the finished task into a temp file, check it whole, rename it to the output.

    When the dfpeer checked every piece against the SuperNode's SHA-256
    (C{verified}) the content is already proven piece by piece: the copy is
    made in the kernel and checked by length, unless the user asked for a
    digest of their own, which is then computed over the copy.  Otherwise
    (a download that went back to the origin) the copy is hashed and compared
    with what the dfpeer computed.
    """
    tmp = _tmp_path(opts["output"])
    try:
        with open(src_path, "rb") as src, open(tmp, "wb") as dst:
            if verified and not opts["digest"] and not opts["md5"]:
                length = _link_or_copy(src_path, tmp, src, dst, opts.get("copy", False))
                sha, md5, expect_sha = "", None, None
            else:
                length, sha, md5 = _copy_hashing(src, dst, opts)
        _check(sha, md5, length, opts, expect_length, expect_sha)
        os.replace(tmp, opts["output"])
        # renaming a link onto another link of the same file does nothing
        # (POSIX): the output already is that file, so drop the temp name
        unlink_quietly(tmp)
    except OSError as e:
        unlink_quietly(tmp)
        fail(f"cannot write {opts['output']}: {e.strerror or e}", EXIT_IO)
    except BaseException:
        unlink_quietly(tmp)
        raise
    return length


def direct_download(opts: dict[str, Any], bar: Bar, deadline: float) -> int:
    """Fetch from the origin with no daemon at all (the last resort)."""
    import urllib.error
    import urllib.request

    tmp = _tmp_path(opts["output"])
    req = urllib.request.Request(opts["url"], headers=opts["headers"])
    try:
        with urllib.request.urlopen(req, timeout=max(deadline - time.monotonic(), 1)) as resp, open(tmp, "wb") as dst:
            total = resp.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            length, sha, md5 = _copy_hashing(resp, dst, opts, lambda n: bar.show(n, total), deadline)
        _check(sha, md5, length, opts, total, None)
        os.replace(tmp, opts["output"])
        return length
    except urllib.error.HTTPError as e:
        unlink_quietly(tmp)
        fail(f"origin returned {e.code} {e.reason} for {opts['url']}", EXIT_FAILED)
    except (urllib.error.URLError, OSError) as e:
        unlink_quietly(tmp)
        reason = getattr(e, "reason", None) or e
        fail(f"origin {opts['url']} unreachable: {reason}", EXIT_FAILED)
    except BaseException:
        unlink_quietly(tmp)
        raise


def _trace(what: str) -> None:
    if os.environ.get("DRAGONFLY_TRACE"):
        print(f"dfget trace {what} at {time.time():.3f}", file=sys.stderr)


def run(opts: dict[str, Any], bar: Bar, verbose: bool) -> int:
    _trace("start")
    deadline = time.monotonic() + opts["timeout"]
    body = {k: opts[k] for k in ("url", "headers", "digest", "identifier", "filter", "notbs", "localLimit", "totalLimit")}
    # the request itself tells whether the dfpeer of peer.json runs: no
    # separate health check before it (a round trip more before any byte)
    api = launch.read_api(opts["home"])
    started = None
    if api is not None:
        _trace("asking")
        try:
            started = _call(api, "POST", "/api/v1/downloads", body, connect_timeout=launch.HEALTH_TIMEOUT)
        except localhttp.NotListening:
            api = None  # a stale peer.json
        except (OSError, ValueError) as e:
            # it went away while answering (killed, restarting): start one
            print(f"dfget: the dfpeer of {opts['home']} did not answer ({e}); starting one", file=sys.stderr)
            api = None
    if started is None:
        try:
            api = start_daemon(opts["home"], opts["nodes"], opts["idle"], opts.get("daemonArgs"))
        except (Failure, OSError) as e:
            if opts["notbs"]:
                fail(f"no dfpeer: {getattr(e, 'message', e)}; not going to the origin (--notbs)", EXIT_FAILED)
            print(f"dfget: no dfpeer ({getattr(e, 'message', e)}); downloading from the origin", file=sys.stderr)
            return direct_download(opts, bar, deadline)
        _trace("asking")
        try:
            started = _call(api, "POST", "/api/v1/downloads", body)
        except (OSError, ValueError) as e:
            fail(f"lost the dfpeer: {getattr(e, 'reason', e)}", EXIT_FAILED)
    assert api is not None  # the dfpeer that answered
    task_id = started["taskId"]
    _trace("posted")
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            fail(f"timed out after {opts['timeout']:.0f}s", EXIT_TIMEOUT)
        try:
            # the answer comes at once when the download ends; a shorter wait only feeds the bar
            wait = min(0.5 if bar.enabled else 10.0, left)
            view = _call(api, "GET", f"/api/v1/downloads/{task_id}?wait={wait:.2f}", timeout=left + 5)
        except Failure:
            raise
        except (OSError, ValueError) as e:
            fail(f"lost the dfpeer: {getattr(e, 'reason', e)}", EXIT_FAILED)
        bar.show(view.get("completedBytes", 0), view.get("contentLength"))
        if view["status"] == "success":
            break
        if view["status"] == "failed":
            err = view.get("error") or {}
            code = EXIT_DIGEST if err.get("code") == "DIGEST_MISMATCH" else EXIT_FAILED
            fail(err.get("message") or "download failed", code)
    _trace("done")
    length = install(
        view["dataPath"], opts, view.get("contentLength"), view.get("sha256"), bool(view.get("piecesVerified"))
    )
    _trace("installed")
    bar.show(length, length)
    if verbose:
        bar.close()
        t = view["traffic"]
        print(
            f"dfget: {length} bytes in {view['elapsed']:.2f}s; from origin {t['back_to_source']}, "
            f"supernode {t['supernode']}, peers {t['remote_peer']}",
            file=sys.stderr,
        )
    return length


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bar = Bar(False)
    try:
        opts = validate(args)
        bar = Bar(not args.no_progress and (args.showbar or sys.stderr.isatty()))
        run(opts, bar, args.verbose)
    except Failure as e:
        bar.close()
        print(f"dfget: error: {e.message}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        bar.close()
        print("dfget: interrupted", file=sys.stderr)
        return 130
    bar.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
