"""
The treq client every daemon uses for outbound HTTP (origins, registries,
the SuperNode API, a dfpeer's loopback API).

treq's L{HTTPClient} keeps a cookie jar for the life of the client: every
C{Set-Cookie} an upstream answers with is sent again on later requests to
that host.  Our daemons make requests on behalf of many clients (dfdaemon
relays each runtime's registry requests; a SuperNode fetches for every
peer), so a session cookie one client's request earned would ride on the
next client's request.  Our clients keep no cookies at all: the jar refuses
every cookie, and a request carries only the headers its caller gave.
"""

from __future__ import annotations

from http.cookiejar import DefaultCookiePolicy
from typing import Any

import treq.client
from treq.cookies import IndexableCookieJar


def cookieless_jar() -> IndexableCookieJar:
    """A cookie jar that stores nothing and sends nothing (no domain allowed)."""
    return IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=()))


def http_client(agent: Any) -> treq.client.HTTPClient:
    """A treq client over C{agent} that never stores or sends cookies."""
    return treq.client.HTTPClient(agent, cookiejar=cookieless_jar())
