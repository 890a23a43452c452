import os

import dragonfly

SPEC = os.path.join(os.path.dirname(dragonfly.__file__), "openapi.yaml")
