import os
import subprocess
import sys

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins


def test_three_plugins_are_discovered():
    names = {p.tapname for p in getPlugins(IServiceMaker)}
    assert {"supernode", "dfpeer", "dfdaemon"} <= names


@pytest.mark.parametrize(
    "args, message",
    [
        (["--registry", "ftp://registry.example"], b"--registry must be an http(s) URL"),
        (["--hijack", "registry"], b"--hijack needs --ca-cert and --ca-key"),
        (["--rule", "blobs/(unclosed"], b"bad regex"),
    ],
)
def test_dfdaemon_refuses_bad_options(args, message, tmp_path):
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    result = subprocess.run(
        [twistd, "-n", "--pidfile=", "dfdaemon", "--home", str(tmp_path), *args], capture_output=True, timeout=60
    )
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not os.path.exists(tmp_path / "dfdaemon.json")
