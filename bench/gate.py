"""
A start line for the downloads of one round.

    python -m bench.gate READY_FD GO_FD [--call MODULE:FUNCTION] -- ARGV...

Started once per host (inside its namespace) before the round begins.  It
gets ready (with C{--call} it imports MODULE first, so interpreter start-up
and imports are paid before the start), writes one byte to READY_FD, and
blocks reading one byte from GO_FD.  The benchmark writes one byte per host
to the other end of GO_FD at once: every download starts at the same moment,
however long each process took to start on an oversubscribed machine.

Then it runs the command: C{FUNCTION(ARGV)} in this process with C{--call}
(its return value is the exit status; C{dfget}'s console script does exactly
this), else it C{exec}s ARGV (C{curl}, C{wget}).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit(__doc__.split("\n\n")[1])
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="bench.gate")
    p.add_argument("ready_fd", type=int)
    p.add_argument("go_fd", type=int)
    p.add_argument("--call", help="MODULE:FUNCTION to call with ARGV instead of exec")
    args = p.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command and not args.call:
        p.error("no command")
    func = None
    if args.call:
        module, _, name = args.call.partition(":")
        func = getattr(importlib.import_module(module), name)
    os.write(args.ready_fd, b".")
    os.close(args.ready_fd)
    if os.read(args.go_fd, 1) != b"g":
        return 125  # the benchmark went away: do not start
    os.close(args.go_fd)
    if func is not None:
        return int(func(command) or 0)
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
