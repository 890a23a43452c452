"""
The SuperNode and the dfpeer load Twisted without pyOpenSSL
(L{dragonfly.core.tls.load_twisted_without_tls}): Twisted's own TLS helpers
do not work in them, so every TLS connection goes through
L{dragonfly.core.tls}.  This keeps new code from calling those helpers
where it would fail only at run time, on the first https URL.
"""

from __future__ import annotations

import ast
import pathlib

import dragonfly

#: Twisted's TLS helpers that need pyOpenSSL when Twisted is imported
TWISTED_TLS = {"BrowserLikePolicyForHTTPS", "wrapClientTLS", "wrapServerTLS", "startTLS", "listenSSL", "connectSSL",
               "optionsForClientTLS", "CertificateOptions", "TLSMemoryBIOFactory"}

ROOT = pathlib.Path(dragonfly.__file__).parent
#: dfdaemon loads Twisted whole (its --hijack uses startTLS); tests' helpers never run in a daemon
EXEMPT = ("core/tls.py", "daemon/", "testing/")


def _uses(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in TWISTED_TLS:
            found.add(node.id)
        elif isinstance(node, ast.Attribute) and node.attr in TWISTED_TLS:
            found.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            found |= {a.name for a in node.names if a.name in TWISTED_TLS}
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Agent":
            found.add("Agent(...) (its own https endpoints: use Agent.usingEndpointFactory with core.tls)")
    return found


def test_tls_goes_through_core_tls_in_the_supernode_and_dfpeer() -> None:
    offenders = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(EXEMPT):
            continue
        found = _uses(ast.parse(path.read_text(), str(path)))
        if found:
            offenders[rel] = sorted(found)
    assert offenders == {}
