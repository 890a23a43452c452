import os

import pytest

from dragonfly.testing.swarm import Swarm, write_random_file

MiB = 1 << 20


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Origin files: name -> sha256."""
    root = tmp_path_factory.mktemp("www")
    sizes = {"big.bin": 64 * MiB, "empty.bin": 0, "one.bin": 1, "odd.bin": 10 * MiB + 7}
    digests = {name: write_random_file(str(root / name), size) for name, size in sizes.items()}
    return str(root), digests


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, files):
    root, _ = files
    with Swarm(str(tmp_path_factory.mktemp("swarm"))) as s:
        s.start_origin(root)
        s.start_supernode()
        for i in range(5):
            s.start_peer(f"peer{i + 1}")
        yield s


def leftovers(directory):
    """Files dfget may have left behind in an output directory."""
    return sorted(n for n in os.listdir(directory) if "dfget" in n or n.endswith(".tmp"))
