"""
Settings for every tier.

Hypothesis: no per-example deadline. The properties are about results, not
time, and on a busy two-core machine one example of a state machine can
take longer than the default 200 ms without anything being wrong.
"""

from hypothesis import settings

settings.register_profile("dragonfly", deadline=None)
settings.load_profile("dragonfly")
