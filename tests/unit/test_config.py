"""
C{--config FILE} for the daemons (L{dragonfly.core.config}): keys are long
option names, values go through the options' own coercers, the command line
beats the file and the file beats the defaults, and every mistake in the file
is one clear L{usage.UsageError} naming the key and the file.
"""

import os
import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.python import usage

from dragonfly.core.config import ConfigFileOptions, load_config
from dragonfly.core.ids import BadInput
from dragonfly.core.units import parse_rate


class Demo(ConfigFileOptions):
    """Every kind of option usage.Options knows, with a postOptions that validates."""

    optParameters = [
        ["port", "p", 8002, "A port.", int],
        ["ratio", None, 1.0, "A float.", float],
        ["name", "n", "x", "A string."],
        ["origin-limit", None, "0", "A rate, e.g. 20M."],
        ["max_parents", None, 8, "An underscored long name.", int],
    ]
    optFlags = [["verbose", "v", "A flag."], ["dry-run", None, "Another flag."]]

    def __init__(self):
        super().__init__()
        self["header"] = []

    def opt_header(self, value):
        """A repeatable option with its own method (like dfget --header)."""
        if ":" not in value:
            raise usage.UsageError(f"--header {value!r} is not 'K: V'")
        self["header"].append(value)

    def opt_quiet(self):
        """A flag with its own method."""
        self["quiet"] = True

    def postOptions(self):
        try:
            self["origin-limit"] = parse_rate(self["origin-limit"])
        except BadInput as e:
            raise usage.UsageError(f"--origin-limit: {e}") from None
        if self["port"] < 0:
            raise usage.UsageError("--port must not be negative")


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def parse(argv, cls=Demo):
    o = cls()
    o.parseOptions(argv)
    return o


def error(argv, cls=Demo):
    with pytest.raises(usage.UsageError) as e:
        parse(argv, cls)
    return str(e.value)


def test_file_values_go_through_the_coercers(tmp_path):
    path = write(tmp_path, "port: 9000\nratio: 0.5\nname: hello\norigin-limit: 20M\nverbose: true\n"
                           "header: ['A: 1', 'B: 2']\nquiet: true\n")
    o = parse(["--config", path])
    assert (o["port"], o["ratio"], o["name"], o["origin-limit"]) == (9000, 0.5, "hello", 20 << 20)
    assert o["verbose"] == 1 and o["dry-run"] == 0
    assert o["header"] == ["A: 1", "B: 2"]
    assert o["quiet"] is True
    assert o.config_path == path
    assert set(o.from_file) == {"port", "ratio", "name", "origin-limit", "verbose", "header", "quiet"}


def test_both_spellings_of_a_key(tmp_path):
    assert parse(["--config", write(tmp_path, "origin_limit: 1K\n")])["origin-limit"] == 1024
    assert parse(["--config", write(tmp_path, "max-parents: 3\n")])["max_parents"] == 3
    assert parse(["--config", write(tmp_path, "dry_run: true\n")])["dry-run"] == 1


def test_a_false_flag_sets_nothing(tmp_path):
    o = parse(["--config", write(tmp_path, "verbose: false\nquiet: false\n")])
    assert o["verbose"] == 0 and "quiet" not in o


def test_flags_override_the_file_and_the_file_the_defaults(tmp_path):
    path = write(tmp_path, "port: 9000\nname: file\nheader: 'F: 1'\n")
    o = parse(["--port", "9100", "--config", path, "-n", "cli", "--header", "C: 1"])
    assert (o["port"], o["name"], o["header"]) == (9100, "cli", ["C: 1"])
    assert o["ratio"] == 1.0  # neither: the default
    o = parse(["--config", path])
    assert (o["port"], o["name"], o["header"]) == (9000, "file", ["F: 1"])
    # an abbreviated long option (getopt allows it) still counts as given
    assert parse(["--conf", path, "--po", "1"])["port"] == 1


def test_empty_file_sets_nothing(tmp_path):
    o = parse(["--config", write(tmp_path, "# nothing yet\n")])
    assert o["port"] == 8002 and o.from_file == {}


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "port: 1\nfoo: 2\n")
    assert error(["--config", path]) == f"unknown key 'foo' in {path}"
    # a short option letter is not a key
    assert "unknown key 'p'" in error(["--config", write(tmp_path, "p: 1\n")])


NAMES = {"port", "ratio", "name", "origin-limit", "max_parents", "verbose", "dry-run", "header", "quiet",
         "config", "help", "version"}


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.text(min_size=0, max_size=20).filter(
    lambda k: not ({k, k.replace("_", "-"), k.replace("-", "_")} & NAMES)))
def test_random_keys_are_rejected(tmp_path, key):
    path = write(tmp_path, yaml.safe_dump({key: 1}))
    assert load_config(path) == {key: 1}  # the key survives YAML as written
    assert error(["--config", path]) == f"unknown key '{key}' in {path}"


@pytest.mark.parametrize("text, words", [
    ("port: [1, 2]\n", ["'port'", "string or a number", "a list"]),
    ("port: {a: 1}\n", ["'port'", "a mapping"]),
    ("port: true\n", ["'port'", "a boolean"]),
    ("port:\n", ["'port'", "an empty value"]),
    ("port: eighty\n", ["'port'", "bad value 'eighty'", "invalid literal for int()"]),
    ("ratio: 1.5.2\n", ["'ratio'", "bad value '1.5.2'"]),
    ("verbose: 1\n", ["'verbose'", "is a flag", "true or false", "a number"]),
    ("verbose: 'yes please'\n", ["'verbose'", "is a flag", "a string"]),
    ("header: []\n", ["'header'", "empty list"]),
    ("header: [{a: 1}]\n", ["'header'", "or a list of them", "a mapping"]),
    ("header: 'no colon'\n", ["'header'", "bad value 'no colon'", "is not 'K: V'"]),
])
def test_wrong_types_name_the_key_and_the_file(tmp_path, text, words):
    path = write(tmp_path, text)
    message = error(["--config", path])
    assert path in message
    for word in words:
        assert word in message, message


def test_validation_in_postoptions_names_the_file(tmp_path):
    path = write(tmp_path, "origin-limit: fast\n")
    message = error(["--config", path])
    assert message.startswith("--origin-limit: rate 'fast' is not of the form 20M")
    assert message.endswith(f"(set by 'origin-limit' in {path})")
    # the same mistake on the command line is not blamed on the file
    assert "set by" not in error(["--config", write(tmp_path, "port: 1\n"), "--origin-limit", "fast"])


def test_a_value_the_command_line_overrides_is_still_checked(tmp_path):
    path = write(tmp_path, "port: eighty\n")
    assert "'port'" in error(["--config", path, "--port", "1"])


@pytest.mark.parametrize("text, words", [
    ("port: [1\n", ["bad YAML", "line 2"]),
    ("port: 1\n  bad: indent\n", ["bad YAML"]),
    ("- port\n- 1\n", ["must hold a mapping", "not a list"]),
    ("just a string\n", ["must hold a mapping", "not a string"]),
    ("1: 2\n", ["key 1", "not an option name"]),
    ("port: 1\nport: 2\n", ["bad YAML", "'port' appears twice", "line 2"]),
    ("origin-limit: 1M\norigin_limit: 2M\n", ["'origin-limit' and 'origin_limit'", "both set origin-limit"]),
    ("config: other.yaml\n", ["'config'", "cannot be set in a config file"]),
    ("help: true\n", ["'help'", "cannot be set in a config file"]),
])
def test_bad_files(tmp_path, text, words):
    path = write(tmp_path, text)
    message = error(["--config", path])
    assert path in message
    for word in words:
        assert word in message, message


def test_unreadable_files(tmp_path):
    missing = str(tmp_path / "missing.yaml")
    assert error(["--config", missing]) == f"cannot read config file {missing}: No such file or directory"
    assert "cannot read config file" in error(["--config", str(tmp_path)])
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"port: \xff\xfe\n")
    assert "bad YAML" in error(["--config", str(binary)])


def test_help_does_not_read_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(["--config", str(tmp_path / "missing.yaml"), "--help"])
    assert "--config=" in capsys.readouterr().out


# -- precedence, as a property ------------------------------------------------

VALUES = {
    "port": st.integers(0, 65535).map(lambda n: (n, str(n), n)),
    "ratio": st.floats(0, 1e6, allow_nan=False).map(lambda f: (f, repr(f), f)),
    "name": st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=10).map(
        lambda s: (s, s, s)),
    "origin-limit": st.sampled_from(["0", "1", "512K", "20M", "1G", "1.5M"]).map(lambda s: (s, s, parse_rate(s))),
}


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_command_line_beats_file_beats_default(tmp_path, data):
    """Each option, given in the file, on the command line, both or neither, ends as the rule says."""
    file_settings, argv, expected = {}, [], {}
    for name, values in VALUES.items():
        where = data.draw(st.sampled_from(["neither", "file", "flag", "both"]), label=name)
        in_file, yaml_value, in_file_expected = data.draw(values)
        _, flag_text, flag_expected = data.draw(values)
        if where in ("file", "both"):
            key = data.draw(st.sampled_from([name, name.replace("-", "_")]))
            file_settings[key] = in_file
            expected[name] = in_file_expected
        if where in ("flag", "both"):
            argv += [f"--{name}", flag_text]
            expected[name] = flag_expected
    for flag in ("verbose", "dry-run"):
        where = data.draw(st.sampled_from(["neither", "file-true", "file-false", "flag", "flag+file-false"]))
        if where.endswith("file-true"):
            file_settings[flag] = True
        elif where.endswith("file-false"):
            file_settings[flag] = False
        if where.startswith("flag"):
            argv.append(f"--{flag}")
        expected[flag] = 1 if where in ("file-true", "flag", "flag+file-false") else 0
    path = write(tmp_path, yaml.safe_dump(file_settings))
    config = ["--config", path]
    o = parse(config + argv if data.draw(st.booleans(), label="--config first") else argv + config)
    defaults = parse([])
    for name in [*VALUES, "verbose", "dry-run"]:
        assert o[name] == expected.get(name, defaults[name]), name


# -- the real daemons -----------------------------------------------------------

def test_supernode_reads_its_options_from_a_file(tmp_path):
    from dragonfly.supernode.tap import Options

    path = write(tmp_path, "listen: 127.0.0.1\norigin_limit: 20M\npiece-size: 2M\nmax-parents: 4\nport: 9002\n")
    o = parse(["--config", path, "--port", "9003"], Options)
    assert (o["origin-limit"], o["piece-size"], o["max-parents"], o["port"]) == (20 << 20, 2 << 20, 4, 9003)
    assert o["advertise-ip"] == "127.0.0.1"
    assert error(["--config", write(tmp_path, "port: 70000\n")], Options).startswith("'port' in ")
    message = error(["--config", write(tmp_path, "listen: 127.0.0.1\nseed-window: 0\n")], Options)
    assert message.startswith("--seed-window must be at least 1 (set by 'seed-window' in ")


def test_dfpeer_reads_its_options_from_a_file(tmp_path):
    from dragonfly.peer.tap import Options

    path = write(tmp_path, f"supernode: 10.0.0.1,10.0.0.2:9\nip: 127.0.0.1\nhome: {tmp_path}/h\n"
                           "upload_limit: 8M\ntotal-limit: 50M\nin-flight: 4M\npipeline: 2\n")
    o = parse(["--config", path, "--upload-limit", "1M"], Options)
    assert o["nodes"] == ["10.0.0.1:8002", "10.0.0.2:9"]
    assert (o["upload-limit"], o["total-limit"], o["in-flight"], o["pipeline"]) == (1 << 20, 50 << 20, 4 << 20, 2)
    assert o["home"] == f"{tmp_path}/h"
    assert "unknown key 'upload-rate'" in error(["--config", write(tmp_path, "upload-rate: 1M\n")], Options)


def test_twistd_prints_the_error_and_fails(tmp_path):
    path = write(tmp_path, "origin-limit: 1M\nfoo: bar\n")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    result = subprocess.run([twistd, "-n", "--pidfile=", "supernode", "--config", path],
                            capture_output=True, timeout=60, cwd=str(tmp_path))
    assert result.returncode != 0
    assert f"unknown key 'foo' in {path}".encode() in result.stdout + result.stderr
