"""
The swarm simulator: the real scheduler and piece picker on a fluid network.

    python -m dragonfly.sim --peers N [--supernodes K [--kill-supernode AT]] [--seed S] [--json]

See L{dragonfly.sim.swarm} for the model and docs/scale.md for results.
"""
