"""C{QuietSite}: the daemons' HTTP site (imported on demand through L{dragonfly.core.tapkit})."""

from __future__ import annotations

from typing import Any

from twisted.web.server import Site


class QuietSite(Site):
    """
    A Site without a line in the log per request (peers sync twice a second),
    and without twisted.web's parsing of POST bodies as forms: our APIs speak
    JSON, and the form check (the Content-Type parsed by the email package)
    was 14 % of the SuperNode's CPU under sync load (docs/scale.md).
    """

    def __init__(self, resource: Any, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(resource, *args, parsePOSTFormSubmission=False, **kwargs)  # type: ignore[no-untyped-call]
        except TypeError:  # a Twisted without the switch
            super().__init__(resource, *args, **kwargs)  # type: ignore[no-untyped-call]

    def log(self, request: Any) -> None:
        """Log nothing per request."""
        pass
