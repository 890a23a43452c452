"""
C{twistd <program> --help} documents every option: each Options class in
C{dragonfly/*/tap.py} gives every parameter and flag a help text.
"""

import glob
import importlib
import os

import pytest
from twisted.python import reflect, usage

import dragonfly

TAPS = sorted(
    "dragonfly." + os.path.relpath(path, os.path.dirname(dragonfly.__file__))[:-3].replace(os.sep, ".")
    for path in glob.glob(os.path.join(os.path.dirname(dragonfly.__file__), "*", "tap.py"))
)
# the daemons whose options docs/configuration.md documents in full
DOCUMENTED = ["dragonfly.supernode.tap", "dragonfly.peer.tap", "dragonfly.daemon.tap"]


def options_of(module_name):
    module = importlib.import_module(module_name)
    return module.Options


def entries(cls):
    params, flags = [], []
    reflect.accumulateClassList(cls, "optParameters", params)
    reflect.accumulateClassList(cls, "optFlags", flags)
    return params, flags


def test_every_tap_is_found():
    assert {"dragonfly.supernode.tap", "dragonfly.peer.tap", "dragonfly.daemon.tap"} <= set(TAPS)


@pytest.mark.parametrize("module_name", TAPS)
def test_every_option_has_help(module_name):
    cls = options_of(module_name)
    assert issubclass(cls, usage.Options)
    params, flags = entries(cls)
    assert params or flags
    docs = [(p[0], p[3] if len(p) > 3 else None) for p in params]
    docs += [(f[0], f[2] if len(f) > 2 else None) for f in flags]
    for name, doc in docs:
        assert doc and doc.strip(), f"{module_name}: --{name} has no help text"
    # and the help output shows every one of them
    text = str(cls())
    for entry in params:
        assert f"--{entry[0]}=" in text
    for entry in flags:
        assert f"--{entry[0]} " in text


@pytest.mark.parametrize("module_name", DOCUMENTED)
def test_defaults_are_shown(module_name):
    """A default --help cannot print (None) is said in the help text itself."""
    params, _ = entries(options_of(module_name))
    for name, _short, default, doc, *_ in params:
        if default is None:
            assert "default" in doc, f"--{name} does not say what it defaults to"


@pytest.mark.parametrize("module_name", DOCUMENTED)
def test_every_option_is_in_the_configuration_doc(module_name):
    path = os.path.join(os.path.dirname(os.path.dirname(dragonfly.__file__)), "docs", "configuration.md")
    with open(path) as f:
        doc = f.read()
    params, flags = entries(options_of(module_name))
    for entry in params + flags:
        assert f"`--{entry[0]}`" in doc, f"--{entry[0]} of {module_name} is missing from docs/configuration.md"
