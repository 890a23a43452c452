"""
Which requests dfdaemon sends through the swarm, and where the rest go.

Rules are Dragonfly's C{proxies} list: a regular expression searched in the
request's full URL, first match wins.  A matching rule sends GETs through
the local peer (P2P) unless it says C{direct}; C{use_https} upgrades the
upstream URL to https, C{redirect} replaces its host.  A request no rule
matches, and every method but GET, goes straight to its upstream.

The default is one rule, for registry blobs named by their SHA-256 digest
(C{/v2/<name>/blobs/sha256:<hex>}); manifests, tags, tokens and uploads go
direct.  Interception of HTTPS (C{hijack}) is a separate list of host
regexes: a CONNECT to a matching host is terminated with a certificate from
dfdaemon's CA, anything else is tunnelled untouched.

Pure: no I/O, so the rules are unit-tested by themselves.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from attrs import field, frozen

#: a registry blob named by its digest, with or without a query (containerd adds ?ns=)
BLOB_PATTERN = r"/v2/(?:[^/?#]+/)+blobs/sha256:[0-9a-f]{64}(?:[?#]|$)"
_BLOB = re.compile(r"/v2/(?:[^/?#]+/)+blobs/(sha256:[0-9a-f]{64})(?:[?#]|$)")


class RuleError(ValueError):
    """A rule that cannot be used (bad regex, conflicting actions, bad target)."""


@frozen
class Rule:
    regex: str
    direct: bool = False
    use_https: bool = False
    redirect: str | None = None
    compiled: re.Pattern[str] = field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        try:
            object.__setattr__(self, "compiled", re.compile(self.regex))
        except re.error as e:
            raise RuleError(f"bad regex {self.regex!r}: {e}") from None
        if self.direct and (self.use_https or self.redirect):
            raise RuleError(f"rule {self.regex!r}: 'direct' cannot be combined with 'use_https' or 'redirect'")
        if self.redirect is not None and not re.fullmatch(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9a-fA-F:.]+\](:[0-9]{1,5})?", self.redirect):
            raise RuleError(f"rule {self.regex!r}: redirect must be host or host:port, not {self.redirect!r}")

    def matches(self, url: str) -> bool:
        return self.compiled.search(url) is not None

    @classmethod
    def from_dict(cls, item: Any) -> Rule:
        """A rule as written in a config file: C{{regx|regex, direct, use_https, redirect}}."""
        if not isinstance(item, dict):
            raise RuleError(f"a rule must be a mapping, not {item!r}")
        known = {"regx", "regex", "direct", "use_https", "redirect"}
        unknown = set(item) - known
        if unknown:
            raise RuleError(f"unknown key {sorted(unknown)[0]!r} in rule {item!r}")
        regex = item.get("regx", item.get("regex"))
        if not isinstance(regex, str) or not regex:
            raise RuleError(f"rule {item!r} needs a 'regx'")
        for flag in ("direct", "use_https"):
            if not isinstance(item.get(flag, False), bool):
                raise RuleError(f"rule {regex!r}: {flag!r} must be true or false")
        redirect = item.get("redirect")
        if redirect is not None and not isinstance(redirect, str):
            raise RuleError(f"rule {regex!r}: 'redirect' must be a host")
        return cls(regex, bool(item.get("direct", False)), bool(item.get("use_https", False)), redirect)


DEFAULT_RULES = (Rule(BLOB_PATTERN),)


@frozen
class Decision:
    """Where one request goes: its upstream URL, and whether through the swarm."""

    url: str
    p2p: bool
    digest: str | None = None  # sha256:<hex> of a registry blob, its task's identity


def blob_digest(url: str) -> str | None:
    """C{sha256:<hex>} if C{url} names a registry blob by digest."""
    m = _BLOB.search(url)
    return m.group(1) if m else None


def _rewrite(url: str, rule: Rule) -> str:
    parts = urlsplit(url)
    scheme = "https" if rule.use_https else parts.scheme
    netloc = rule.redirect or parts.netloc
    return urlunsplit((scheme, netloc, parts.path, parts.query, parts.fragment))


def decide(rules: tuple[Rule, ...] | list[Rule], method: str, url: str) -> Decision:
    """The decision for a request for C{url} (absolute) with C{method}."""
    for rule in rules:
        if rule.matches(url):
            if rule.direct:
                return Decision(url, False)
            target = _rewrite(url, rule)
            p2p = method == "GET"
            return Decision(target, p2p, blob_digest(target) if p2p else None)
    return Decision(url, False)


def hijacks(patterns: tuple[re.Pattern[str], ...] | list[re.Pattern[str]], host: str) -> bool:
    """True if a CONNECT to C{host} (no port) is to be intercepted."""
    return any(p.search(host) for p in patterns)


def compile_hosts(regexes: list[str]) -> tuple[re.Pattern[str], ...]:
    out = []
    for r in regexes:
        try:
            out.append(re.compile(r))
        except re.error as e:
            raise RuleError(f"bad host regex {r!r}: {e}") from None
    return tuple(out)
