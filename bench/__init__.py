"""
The swarm benchmark: Dragonfly against plain HTTP on emulated hosts.

C{bench.netem} builds the hosts (one network namespace each, on a shaped
Linux bridge); C{bench.swarm} is the CLI (C{make bench}); C{bench.gate}
holds every download at a common start line.
"""
