"""
Configuration files for the daemons: C{--config FILE}, a YAML mapping whose
keys are the program's long option names.

    # supernode.yaml
    port: 8002
    home: /var/lib/dragonfly/supernode
    origin-limit: 100M      # or origin_limit: the same key

A program adopts it by deriving its options from L{ConfigFileOptions}
instead of C{usage.Options}; nothing else changes::

    class Options(ConfigFileOptions):
        optParameters = [...]          # as before
        optFlags = [...]

        def postOptions(self): ...     # sees file values exactly like flags

Rules:

  - Keys are long option names, spelled with C{-} or C{_} (C{origin-limit},
    C{origin_limit}); a key that is no option is an error naming the key
    and the file; so is the same option twice, or C{config}/C{help}/
    C{version} (meaningless in a file).
  - Values go through the same path as the command line: each is turned
    into the text one would type (C{8002}, C{20M}, C{1.5}) and handed to the
    option's coercer or C{opt_} method, so C{origin-limit: 20M} works and
    C{postOptions} validates file values like flags.  Options that take a
    value accept a string or a number; options with an C{opt_} method that
    may be repeated (C{--header}) also accept a list, one call per item.
    Flags take C{true} or C{false}.  Anything else is an error naming the
    key.
  - Precedence: a flag on the command line beats the file, the file beats
    the built-in default.  An option given on the command line is not read
    from the file at all (a repeatable option is not merged).
  - An unreadable file, bad YAML, a file that is not a mapping and
    duplicate keys are errors.  An empty file sets nothing.
  - There is no default location: only C{--config} names a file.

Every error is a L{usage.UsageError}, which twistd prints as one line.
"""

from __future__ import annotations

import getopt
import os
import re
import sys
from collections.abc import Collection
from typing import Any, cast

from twisted.python import usage

# options that make no sense in a file
NOT_IN_FILE = frozenset({"config", "help", "version"})


def _loader() -> Any:
    """
    A SafeLoader subclass that refuses a key given twice in one mapping.
    Made on first use: yaml is imported only when a config file is given
    (it costs a daemon about 1 MiB of memory otherwise).
    """
    import yaml

    def mapping(loader: Any, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        loader.flatten_mapping(node)
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice", key_node.start_mark
                    )
                seen[key] = True
            except TypeError:
                pass  # an unhashable key: construct_mapping reports it
        return cast(dict[Any, Any], loader.construct_mapping(node, deep=deep))

    class Loader(yaml.SafeLoader):
        """SafeLoader that refuses a key given twice in one mapping."""

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def load_config(path: str) -> dict[str, Any]:
    """
    Read the YAML mapping in C{path}.  Raises L{usage.UsageError} for an
    unreadable file, bad YAML, a document that is not a mapping or a key
    that is not a string.
    """
    import yaml

    try:
        with open(path, "rb") as f:
            data = yaml.load(f, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except OSError as e:
        raise usage.UsageError(f"cannot read config file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        text = " ".join(str(e).split())
        raise usage.UsageError(f"bad YAML in config file {path}: {text}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise usage.UsageError(
            f"config file {path} must hold a mapping of option names to values, not {_kind(data)}"
        )
    for key in data:
        if not isinstance(key, str):
            raise usage.UsageError(f"key {key!r} in {path} is not an option name ({_kind(key)})")
    return data


def _kind(value: Any) -> str:
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _as_text(value: Any) -> str | None:
    """The text one would type for a scalar YAML value (None: not a scalar we take)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return repr(value)
    return None


class ConfigFileOptions(usage.Options):
    """
    C{usage.Options} with C{--config FILE}: see the module docstring.

    After parsing, C{self.config_path} is the file read (or None) and
    C{self.from_file} maps each option set by it to the key that set it.
    """

    optParameters: list[list[Any]] = [
        ["config", None, None,
         "YAML file of settings whose keys are the long option names; "
         "options given on the command line override it (default: none)."],
    ]

    config_path: str | None = None
    #: keys whose values are structures no flag can take (dfdaemon's rule
    #: lists): key -> the name of a method called with (value, path)
    structured_keys: dict[str, str] = {}

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.from_file: dict[str, str] = {}
        self._takes_value = {o[:-1] for o in self.longOpt if o.endswith("=")}
        self._flags = {o for o in self.longOpt if not o.endswith("=")}

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse C{options} (C{sys.argv[1:]} by default) over the settings of the config file."""
        if options is None:
            options = sys.argv[1:]
        options = list(options)
        if len(options) > 1 and options[-2] == "--_shell-completion":
            super().parseOptions(options)  # type: ignore[no-untyped-call]
            return
        given, path = self._scan(options)
        if path is not None and not given & {"help", "version"}:
            self.config_path = os.path.abspath(path)
            self.apply_file(self.config_path, given)
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            raise self._blame_file(e) from None

    def _scan(self, options: list[str]) -> tuple[set[str], str | None]:
        """The options given on the command line (canonical names) and the --config value."""
        try:
            opts, _ = getopt.getopt(options, self.shortOpt, self.longOpt)
        except getopt.error:
            return set(), None  # parseOptions reports it
        given: set[str] = set()
        path = None
        for opt, arg in opts:
            name = opt[2:] if opt.startswith("--") else opt[1:]
            canonical = self.synonyms.get(name) or self.synonyms.get(name.replace("-", "_"))
            if canonical is None:
                continue
            given.add(canonical)
            if canonical == "config":
                path = arg
        return given, path

    def option_name(self, key: str) -> str | None:
        """The long option a file key names (C{origin_limit} -> C{origin-limit}), or None."""
        for candidate in (key, key.replace("_", "-"), key.replace("-", "_")):
            if candidate in self._takes_value or candidate in self._flags:
                return candidate
        return None

    def apply_file(self, path: str, given: Collection[str] = ()) -> None:
        """Set every option of the file at C{path} that is not in C{given}."""
        settings = load_config(path)
        names: dict[str, str] = {}
        for key in settings:
            if key in self.structured_keys:
                continue
            name = self.option_name(key)
            if name is None:
                raise usage.UsageError(f"unknown key '{key}' in {path}")
            if name in NOT_IN_FILE:
                raise usage.UsageError(f"key '{key}' in {path}: {name} cannot be set in a config file")
            if name in names:
                raise usage.UsageError(f"keys '{names[name]}' and '{key}' in {path} both set {name}")
            names[name] = key
        for name, key in names.items():
            # a value is checked even when the command line overrides it,
            # so a broken file is found now, not on the next start
            values = self._check(name, key, settings[key], path)
            if name in given:
                continue
            self._set(name, key, values, path)
            self.from_file[name] = key
        for key, method in self.structured_keys.items():
            if key in settings:
                getattr(self, method)(settings[key], path)

    def _check(self, name: str, key: str, value: Any, path: str) -> list[Any]:
        """The values to dispatch for one key: flags' bools, else coerced or raw texts."""
        dispatch = self._dispatch[name]
        if name in self._flags:
            if not isinstance(value, bool):
                raise usage.UsageError(f"'{key}' in {path} is a flag: it takes true or false, not {_kind(value)}")
            return [value]
        coerced = isinstance(dispatch, usage.CoerceParameter)
        items = value if isinstance(value, list) and not coerced else [value]
        if not items:
            raise usage.UsageError(f"'{key}' in {path} is an empty list")
        values = []
        for item in items:
            text = _as_text(item)
            if text is None:
                raise usage.UsageError(
                    f"'{key}' in {path} takes a string or a number"
                    + ("" if coerced else " (or a list of them)")
                    + f", not {_kind(item)}"
                )
            if coerced:
                # the option's own coercer, as for the command line (with a
                # clearer message than CoerceParameter's)
                try:
                    text = dispatch.coerce(text)
                except ValueError as e:
                    raise usage.UsageError(f"'{key}' in {path}: bad value {item!r}: {e}") from None
            values.append(text)
        return values

    def _set(self, name: str, key: str, values: list[Any], path: str) -> None:
        dispatch = self._dispatch[name]
        if name in self._flags:
            if values[0]:
                dispatch(name, None)
        elif isinstance(dispatch, usage.CoerceParameter):
            self.opts[name] = values[0]
        else:
            for text in values:
                try:
                    dispatch(name, text)  # the option's opt_ method
                except (ValueError, usage.UsageError) as e:
                    raise usage.UsageError(f"'{key}' in {path}: bad value {text!r}: {e}") from None

    def _blame_file(self, error: usage.UsageError) -> usage.UsageError:
        """Say which file set an option that postOptions found wrong."""
        text = str(error)
        for name, key in self.from_file.items():
            if re.search(rf"--{re.escape(name)}(?![\w-])", text):
                return usage.UsageError(f"{text} (set by '{key}' in {self.config_path})")
        return error
