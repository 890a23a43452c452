"""
Defaults shared by the programs: where a host's dfpeer keeps its work home
(dfget, dfdaemon and dfpeer must agree on it to find each other) and the
SuperNode a peer talks to when none is given.
"""

from __future__ import annotations

import os

#: the work home of a host's dfpeer: HOME/peer.json, HOME/data
DEFAULT_HOME = os.path.expanduser("~/.small-dragonfly")
#: the SuperNode's home: its CDN cache in HOME/repo
DEFAULT_SUPERNODE_HOME = os.path.expanduser("~/.dragonfly-supernode")
#: the SuperNode a dfpeer registers with when none is given
DEFAULT_NODE = "127.0.0.1:8002"
