"""
C{dfdaemon}: the command around C{twistd dfdaemon}.

    dfdaemon gen-ca [--cert ca.crt] [--key ca.key] [--cn NAME]
        make the CA that dfdaemon intercepts HTTPS with (--hijack)
    dfdaemon setup containerd|docker|podman [--registry URL ...] [--mirror URL] [--dry-run]
        point the runtime's mirror configuration at dfdaemon (L{dragonfly.daemon.setup})
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


#: where each runtime keeps the file (or directory) that setup edits
SETUP_TARGETS = {
    "containerd": "/etc/containerd/certs.d",
    "docker": "/etc/docker/daemon.json",
    "podman": "/etc/containers/registries.conf",
}


def setup(argv: list[str]) -> int:
    from ..daemon.setup import SetupError, apply, plan

    parser = argparse.ArgumentParser(
        prog="dfdaemon setup",
        description="Point a container runtime's registry mirror configuration at this host's dfdaemon: "
        "containerd's hosts.toml files, docker's daemon.json (registry-mirrors) or podman's registries.conf. "
        "Only the mirror entry is added; the original is kept as FILE.dfdaemon-backup; running it twice "
        "changes nothing. Restart docker afterwards; containerd and podman read the files at each pull.",
    )
    parser.add_argument("runtime", choices=sorted(SETUP_TARGETS))
    parser.add_argument(
        "--registry", action="append", default=[],
        help="a registry (URL or host[:port]) to mirror, repeatable (containerd, podman; docker mirrors Docker Hub only)",
    )
    parser.add_argument("--all-registries", action="store_true", help="containerd: also _default/hosts.toml, for every registry")
    parser.add_argument("--mirror", default="http://127.0.0.1:65001", help="dfdaemon's URL (default http://127.0.0.1:65001)")
    parser.add_argument(
        "--target", default=None,
        help="the file or directory to edit (default: " + ", ".join(f"{k} {v}" for k, v in SETUP_TARGETS.items()) + ")",
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would change; write nothing")
    args = parser.parse_args(argv)
    target = args.target or SETUP_TARGETS[args.runtime]
    try:
        changes = plan(args.runtime, target, args.registry, args.mirror, args.all_registries)
        apply(changes, args.dry_run, sys.stdout)
    except (SetupError, OSError) as e:
        print(f"dfdaemon setup: error: {e}", file=sys.stderr)
        return 1
    if args.runtime == "docker" and not args.dry_run and any(c.changed for c in changes):
        print("restart dockerd to use it (registry-mirrors apply to Docker Hub names; see docs/dfdaemon.md)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gen-ca"]:
        return gen_ca(argv[1:])
    if argv[:1] == ["setup"]:
        return setup(argv[1:])
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "-n", "--pidfile=", "dfdaemon", *argv]
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
