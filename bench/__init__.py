"""
The benchmarks (C{make bench}).

C{bench.datapath}: one host's data path on loopback (nginx origin, curl,
SuperNode -> peer -> peer, aria2c -> aria2c), with the CPU and memory of
every process (L{bench.measure}).  C{bench.swarm}: Dragonfly against
BitTorrent (L{bench.bittorrent}) and plain HTTP on emulated hosts;
C{bench.netem} builds the hosts (one network namespace each, on a shaped
Linux bridge) and C{bench.gate} holds every download at a common start line.
"""
