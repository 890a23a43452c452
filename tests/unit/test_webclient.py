"""The daemons' outbound treq client keeps no cookies between requests."""

from __future__ import annotations

from urllib.request import Request

from dragonfly.core.webclient import cookieless_jar, http_client


class _Headers:
    def __init__(self, values: list[str]) -> None:
        self._values = values

    def get_all(self, name: str, default: list[str]) -> list[str]:
        return self._values if name.lower() == "set-cookie" else default


class _Response:
    def __init__(self, cookies: list[str]) -> None:
        self._headers = _Headers(cookies)

    def info(self) -> _Headers:
        return self._headers


def test_a_set_cookie_is_not_stored_or_sent() -> None:
    jar = cookieless_jar()
    first = Request("http://registry.example/v2/a/blobs/sha256:1")
    jar.extract_cookies(_Response(["session=client-a; Path=/"]), first)  # type: ignore[arg-type]
    assert len(jar) == 0
    second = Request("http://registry.example/v2/b/blobs/sha256:2")
    jar.add_cookie_header(second)
    assert not second.has_header("Cookie")


def test_a_plain_jar_would_have_kept_it() -> None:
    """The same steps with a default jar do carry the cookie: the test above can fail."""
    from http.cookiejar import CookieJar

    jar = CookieJar()
    jar.extract_cookies(_Response(["session=client-a; Path=/"]), Request("http://registry.example/v2/"))  # type: ignore[arg-type]
    second = Request("http://registry.example/v2/b")
    jar.add_cookie_header(second)
    assert second.get_header("Cookie") == "session=client-a"


def test_http_client_uses_the_cookieless_jar() -> None:
    client = http_client(agent=object())
    jar = client._cookiejar
    jar.extract_cookies(_Response(["k=v; Path=/"]), Request("http://o.example/f"))  # type: ignore[arg-type]
    assert len(jar) == 0
