"""
C{dfdaemon setup containerd|docker|podman}: point a container runtime's
mirror configuration at this host's dfdaemon (what Dragonfly's dfinit does).

  - containerd: C{<certs.d>/<registry host>/hosts.toml} per registry (and
    C{_default/hosts.toml} with C{--all-registries}), dfdaemon first among
    the hosts, C{server} the registry;
  - docker: C{registry-mirrors} in C{daemon.json} (the engine uses mirrors
    for Docker Hub names only; see docs/dfdaemon.md for other registries);
  - podman: a C{[[registry.mirror]]} for each registry in
    C{registries.conf}.

Rules: the file is parsed first and a file that does not parse is an error
naming it, left untouched; only the mirror entry is added (every other key,
table, comment and mirror stays as it was; dfdaemon goes first); a file
that already names dfdaemon is left as it is, so running it twice changes
nothing; before the first change the original is copied to
C{FILE.dfdaemon-backup} (never overwritten later); what changed is printed,
and C{--dry-run} prints it without writing.

The edits are pure functions over the files' text (L{containerd_hosts},
L{docker_daemon_json}, L{podman_registries}), unit-tested without a
runtime.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import tomllib
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from attrs import frozen

BACKUP_SUFFIX = ".dfdaemon-backup"
DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")


class SetupError(Exception):
    """A configuration that cannot be changed safely; nothing was written."""


@frozen
class Change:
    path: str
    old: str | None  # None: the file does not exist yet
    new: str

    @property
    def changed(self) -> bool:
        return self.old != self.new

    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                (self.old or "").splitlines(keepends=True), self.new.splitlines(keepends=True),
                fromfile=self.path if self.old is not None else "/dev/null", tofile=self.path,
            )
        )


def _toml(text: str, path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SetupError(f"{path}: not valid TOML ({e}); left untouched") from None


def _q(value: str) -> str:
    return json.dumps(value)  # a TOML basic string is a JSON string for these characters


# -- containerd ------------------------------------------------------------------------------

_HOST_TABLE = re.compile(r"^\s*\[\s*host\s*\.", re.M)


def containerd_hosts(old: str | None, server: str | None, mirror: str, path: str = "hosts.toml") -> str:
    """
    C{hosts.toml} with dfdaemon (C{mirror}, an http URL) as its first host.
    A new file gets C{server} (None for C{_default}: containerd then uses
    the registry named in the pull).
    """
    block = f'[host.{_q(mirror)}]\n  capabilities = ["pull", "resolve"]\n'
    if old is None:
        head = f"server = {_q(server)}\n\n" if server else ""
        return "# written by dfdaemon setup: pulls go through dfdaemon (P2P), then the registry\n" + head + block
    parsed = _toml(old, path)
    hosts = parsed.get("host", {})
    if not isinstance(hosts, dict):
        raise SetupError(f"{path}: 'host' is not a table; left untouched")
    if mirror in hosts or mirror.rstrip("/") in hosts:
        return old
    m = _HOST_TABLE.search(old)
    if m is None:
        new = old + ("" if old.endswith("\n") or not old else "\n") + ("\n" if old.strip() else "") + block
    else:
        new = old[: m.start()] + block + "\n" + old[m.start():]
    check = _toml(new, path)
    if next(iter(check.get("host", {}))) != mirror:  # pragma: no cover - the insertion above guarantees it
        raise SetupError(f"{path}: could not put dfdaemon first; left untouched")
    return new


# -- docker ---------------------------------------------------------------------------------------


def docker_daemon_json(old: str | None, mirror: str, path: str = "daemon.json") -> str:
    """C{daemon.json} with C{mirror} first in C{registry-mirrors}."""
    if old is None or not old.strip():
        data: dict[str, Any] = {}
    else:
        try:
            data = json.loads(old)
        except ValueError as e:
            raise SetupError(f"{path}: not valid JSON ({e}); left untouched") from None
        if not isinstance(data, dict):
            raise SetupError(f"{path}: not a JSON object; left untouched")
    mirrors = data.get("registry-mirrors", [])
    if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
        raise SetupError(f"{path}: 'registry-mirrors' is not a list of URLs; left untouched")
    if any(m.rstrip("/") == mirror.rstrip("/") for m in mirrors):
        return old if old is not None else json.dumps(data, indent=2) + "\n"
    data["registry-mirrors"] = [mirror, *mirrors]
    return json.dumps(data, indent=2) + "\n"


# -- podman -----------------------------------------------------------------------------------------

_TABLE = re.compile(r"^\s*\[", re.M)
_REGISTRY_HEADER = re.compile(r"^\s*\[\[\s*registry\s*\]\]\s*(#.*)?$", re.M)


def podman_registries(old: str | None, registry: str, mirror: str, path: str = "registries.conf") -> str:
    """
    C{registries.conf} (v2) with C{mirror} (C{host:port}, plain HTTP) as the
    first mirror of the C{[[registry]]} for C{registry} (a host[:port]),
    which is added if there is none.
    """
    mirror_block = f"[[registry.mirror]]\nlocation = {_q(mirror)}\ninsecure = true\n"
    text = old or ""
    parsed = _toml(text, path) if text else {}
    entries = parsed.get("registry", [])
    if not isinstance(entries, list):
        raise SetupError(f"{path}: 'registry' is not an array of tables; left untouched")
    headers = list(_REGISTRY_HEADER.finditer(text))
    if len(headers) != len(entries):
        raise SetupError(f"{path}: [[registry]] tables written in a form this tool does not edit; left untouched")
    for i, entry in enumerate(entries):
        where = entry.get("prefix") or entry.get("location")
        if where != registry:
            continue
        if any(isinstance(m, dict) and m.get("location") == mirror for m in entry.get("mirror", [])):
            return text
        # right after the [[registry]] table's own keys: dfdaemon becomes its first mirror
        start = headers[i].end()
        nxt = _TABLE.search(text, start + 1)
        cut = nxt.start() if nxt is not None else len(text)
        before = text[:cut]
        if not before.endswith("\n"):
            before += "\n"
        new = before + mirror_block + ("\n" + text[cut:] if nxt is not None else "")
        _check_podman(new, registry, mirror, path)
        return new
    sep = "" if not text else ("\n" if text.endswith("\n") else "\n\n")
    new = text + sep + f"[[registry]]\nlocation = {_q(registry)}\n\n" + mirror_block
    _check_podman(new, registry, mirror, path)
    return new


def _check_podman(text: str, registry: str, mirror: str, path: str) -> None:
    for entry in _toml(text, path).get("registry", []):
        if (entry.get("prefix") or entry.get("location")) == registry:
            if entry.get("mirror", [{}])[0].get("location") == mirror:
                return
    raise SetupError(f"{path}: could not put dfdaemon first for {registry}; left untouched")  # pragma: no cover


# -- planning and applying -------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise SetupError(f"{path}: cannot read it ({e})") from None


def registry_host(url: str) -> str:
    """C{host[:port]} of a registry given as a URL or as a bare host."""
    if "://" not in url:
        url = "https://" + url
    parts = urlsplit(url)
    if not parts.netloc:
        raise SetupError(f"bad registry {url!r}")
    return parts.netloc


def _server(url: str) -> str:
    if "://" not in url:
        url = "https://" + url
    parts = urlsplit(url)
    host = parts.netloc
    if host in DOCKER_HUB:
        return "https://registry-1.docker.io"
    return f"{parts.scheme}://{host}"


def plan(runtime: str, target: str, registries: Sequence[str], mirror: str, all_registries: bool = False) -> list[Change]:
    """
    The changes for C{runtime} under C{target} (containerd: the certs.d
    directory; docker: daemon.json; podman: registries.conf).
    """
    if not mirror.startswith(("http://", "https://")):
        raise SetupError(f"--mirror must be dfdaemon's http URL, not {mirror!r}")
    changes = []
    if runtime == "containerd":
        if not registries and not all_registries:
            raise SetupError("name the registries (--registry URL, repeatable) or give --all-registries")
        for url in registries:
            host = registry_host(url)
            name = "docker.io" if host in DOCKER_HUB else host
            path = os.path.join(target, name, "hosts.toml")
            old = _read(path)
            changes.append(Change(path, old, containerd_hosts(old, _server(url), mirror, path)))
        if all_registries:
            path = os.path.join(target, "_default", "hosts.toml")
            old = _read(path)
            changes.append(Change(path, old, containerd_hosts(old, None, mirror, path)))
    elif runtime == "docker":
        old = _read(target)
        changes.append(Change(target, old, docker_daemon_json(old, mirror, target)))
    elif runtime == "podman":
        if not registries:
            raise SetupError("name the registries (--registry URL or host, repeatable)")
        hostport = urlsplit(mirror).netloc
        old = _read(target)
        text = old
        for url in registries:
            host = registry_host(url)
            text = podman_registries(text, "docker.io" if host in DOCKER_HUB else host, hostport, target)
        changes.append(Change(target, old, text if text is not None else ""))
    else:
        raise SetupError(f"unknown runtime {runtime!r}: containerd, docker or podman")
    return changes


def apply(changes: list[Change], dry_run: bool, out: Any) -> int:
    """Write the changed files (keeping a backup of each original); print what changed. Returns how many changed."""
    n = 0
    for c in changes:
        if not c.changed:
            print(f"{c.path}: already points at dfdaemon, unchanged", file=out)
            continue
        n += 1
        if dry_run:
            print(f"{c.path}: would change (--dry-run):", file=out)
            print(c.diff(), file=out, end="")
            continue
        os.makedirs(os.path.dirname(os.path.abspath(c.path)), exist_ok=True)
        backup = None
        if c.old is not None:
            backup = c.path + BACKUP_SUFFIX
            if not os.path.exists(backup):
                shutil.copy2(c.path, backup)
        tmp = c.path + ".dfdaemon-tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(c.new)
        if c.old is not None:
            shutil.copymode(c.path, tmp)
        os.replace(tmp, c.path)
        print(f"{c.path}: {'created' if c.old is None else 'changed'}" + (f" (original kept in {backup})" if backup else ""), file=out)
        print(c.diff(), file=out, end="")
    return n
