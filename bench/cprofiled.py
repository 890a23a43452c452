"""
twistd under cProfile, switched on and off by signals (C{bench.swarm --profile-tools cprofile}).

    python -m bench.cprofiled OUT.pstats TWISTD-ARGS...

Runs twistd with TWISTD-ARGS.  SIGUSR1 starts profiling the reactor thread
with its CPU time (C{time.thread_time}: time the thread waits for a CPU or
in C{epoll_wait} is not counted), SIGUSR2 stops it and writes the stats to
OUT.pstats (read them with C{python -m pstats}, or L{bench.profile}).  Call
counts are exact, times are not: cProfile's own cost per call lands in
the thread's CPU time, so functions that make many small calls look far
costlier than they are (the picker's fill looked like a fifth of the
reactor's CPU and measured 28 us a call with C{time.thread_time}).  Use it
to count events, and perf or an A/B round (C{--ab-env}) to weigh them.
"""

from __future__ import annotations

import cProfile
import signal
import sys
import time
from typing import Any


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    prof = cProfile.Profile(time.thread_time)

    def start(*_: Any) -> None:
        prof.enable()

    def stop(*_: Any) -> None:
        prof.disable()
        prof.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *argv]
    run()


if __name__ == "__main__":
    main()
