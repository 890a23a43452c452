import subprocess
import sys
import os

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins


def test_three_plugins_are_discovered():
    names = {p.tapname for p in getPlugins(IServiceMaker)}
    assert {"supernode", "dfpeer", "dfdaemon"} <= names


def test_dfdaemon_says_it_is_not_built():
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    result = subprocess.run([twistd, "-n", "--pidfile=", "dfdaemon"], capture_output=True, timeout=60)
    assert result.returncode != 0
    assert b"not built yet" in result.stdout + result.stderr
