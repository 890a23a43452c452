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

treq is imported when a client is made: a dfpeer makes its origin client
on its first back-to-source fetch (L{LazyHttpClient}), so a dfpeer that
never fetches from an origin never loads treq (0.3-0.4 MiB of RSS).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import treq.client
    from treq.cookies import IndexableCookieJar


def cookieless_jar() -> IndexableCookieJar:
    """A cookie jar that stores nothing and sends nothing (no domain allowed)."""
    from http.cookiejar import DefaultCookiePolicy

    from treq.cookies import IndexableCookieJar

    return IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=()))


def http_client(agent: Any) -> treq.client.HTTPClient:
    """A treq client over C{agent} that never stores or sends cookies."""
    import treq.client

    return treq.client.HTTPClient(agent, cookiejar=cookieless_jar())


class LazyHttpClient:
    """
    L{http_client}C{(make_agent())}, made on the first request: C{get} and
    C{request} as treq's L{HTTPClient} has them.
    """

    def __init__(self, make_agent: Callable[[], Any]) -> None:
        self._make_agent = make_agent
        self._client: treq.client.HTTPClient | None = None

    def client(self) -> treq.client.HTTPClient:
        """The treq client, made now if it was not yet."""
        if self._client is None:
            self._client = http_client(self._make_agent())
        return self._client

    def get(self, url: Any, **kwargs: Any) -> Any:
        return self.client().get(url, **kwargs)

    def request(self, method: str, url: Any, **kwargs: Any) -> Any:
        return self.client().request(method, url, **kwargs)
