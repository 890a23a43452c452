"""
C{dfdaemon}: the command around C{twistd dfdaemon}.

    dfdaemon gen-ca [--cert ca.crt] [--key ca.key] [--cn NAME]
        make the CA that dfdaemon intercepts HTTPS with (--hijack)
    dfdaemon [twistd dfdaemon options]
        run dfdaemon in the foreground (the same as 'twistd -n dfdaemon ...')
"""

from __future__ import annotations

import argparse
import os
import sys

from ..daemon.ca import CaError, write_ca


def gen_ca(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dfdaemon gen-ca",
        description="Write a new CA certificate and key for dfdaemon's HTTPS interception "
        "(--hijack). Make the container runtime trust the certificate: see docs/dfdaemon.md.",
    )
    parser.add_argument("--cert", default="ca.crt", help="where to write the CA certificate (PEM; default ca.crt)")
    parser.add_argument("--key", default="ca.key", help="where to write its private key (PEM, mode 0600; default ca.key)")
    parser.add_argument("--cn", default="Dragonfly dfdaemon CA", help="the CA's common name")
    args = parser.parse_args(argv)
    try:
        write_ca(args.cert, args.key, args.cn)
    except (CaError, OSError) as e:
        print(f"dfdaemon gen-ca: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {os.path.abspath(args.cert)} and {os.path.abspath(args.key)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gen-ca"]:
        return gen_ca(argv[1:])
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "-n", "--pidfile=", "dfdaemon", *argv]
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
