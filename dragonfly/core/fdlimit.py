"""
Open files against connection limits.

A block port's connection limit only protects a daemon if the connections
it allows, with everything else it opens (piece files, the API's
connections, neighbours, the pool's files), fit under its open-file limit
(C{RLIMIT_NOFILE}).  Many systems start processes with a soft limit of 1024
against a block-port default of 1024 connections: a flood of idle
connections then took every descriptor, and the dfpeer's own downloads
failed with C{EMFILE} (C{bench.flood --peer-nofile 1024}).  L{fit_open_files}
raises the soft limit towards what is needed (up to the hard limit) and,
when that is not enough, lowers the connection limit so the rest still fits.
"""

from __future__ import annotations

import resource

from twisted.logger import Logger

log = Logger()

#: descriptors kept for what is not a block connection from outside: piece
#: files, our own connections to neighbours and SuperNodes, the pool, logs
RESERVE = 256


def fit_open_files(connections: int, reserve: int = RESERVE, what: str = "block") -> int:
    """
    Make room for C{connections} accepted connections plus C{reserve} other
    descriptors: raise the soft C{RLIMIT_NOFILE} when it is lower (up to the
    hard limit); answer how many connections fit (C{connections}, or fewer
    when the hard limit is too low, with a warning).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + reserve
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError) as e:
            log.warn("cannot raise the open-file limit from {soft} to {want}: {why}", soft=soft, want=new, why=str(e))
    if soft == resource.RLIM_INFINITY or soft >= want:
        return connections
    fit = max(1, min(connections, soft - reserve))
    log.warn(
        "open-file limit {soft} leaves room for {fit} {what} connections, not {connections}: "
        "{what} connections limited to {fit} (raise ulimit -n)",
        soft=soft, fit=fit, connections=connections, what=what,
    )
    return fit


def fit_open_files_shared(limits: dict[str, int], reserve: int = RESERVE) -> dict[str, int]:
    """
    L{fit_open_files} for several listening ports at once (the SuperNode's
    seed block port and its API): room for every limit of C{limits} (a name
    -> connections) plus C{reserve}; when the hard limit is too low, each
    limit scaled down in proportion (at least 1 each).
    """
    total = sum(limits.values())
    fit = fit_open_files(total, reserve, what=" and ".join(limits))
    if fit >= total:
        return dict(limits)
    return {name: max(1, n * fit // total) for name, n in limits.items()}
