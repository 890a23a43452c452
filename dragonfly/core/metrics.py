"""
Prometheus metrics (C{/metrics}, the Prometheus text format) for our Klein apps.

Each program object keeps its own L{CollectorRegistry}, never the process-wide
default one: unit tests build many SuperNodes and dfpeers in one process, and
each must show only its own numbers.  Domain objects (the CDN, the scheduler,
a peer's tasks) keep plain integers and L{Distribution}s; a collector turns
them into metric families when Prometheus scrapes, so the core never imports
prometheus_client and gauges are always read from the live objects.

Adding C{/metrics} to a Klein app (the SuperNode API and the dfpeer local API
do exactly this; so can dfdaemon)::

    from dragonfly.core.metrics import HttpMetrics, collector, counter, metrics_route, new_registry

    class ProxyApi:
        app = Klein()
        install_error_handlers(app)
        metrics_route(app, lambda self: self.registry)   # GET /metrics

        def __init__(self, proxy):
            self.proxy = proxy
            self.registry = new_registry()
            # dragonfly_dfdaemon_http_requests_total{handler,code} and
            # dragonfly_dfdaemon_http_request_duration_seconds{handler}
            self.http = HttpMetrics(self.registry, "dragonfly_dfdaemon")
            # anything read from live objects at scrape time
            self.registry.register(collector(lambda: [
                counter("dragonfly_dfdaemon_proxy_requests_total", "Requests proxied.", proxy.requests),
            ]))

        def resource(self):
            return self.http.wrap(self.app.resource(), self.app)

A program whose API must stay on loopback can serve the same registry on a
port of its own: C{Site(metrics_only_root(registry))} (dfpeer C{--metrics}).

C{handler} is the Klein endpoint (the route function's name), never the raw
path, and C{code} the HTTP status, so label sets stay bounded.  Label values
taken from anything a client controls must go through L{bounded}.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from klein import Klein
from klein.interfaces import IKleinRequest
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RoutingException

from .distribution import FAST_SECONDS as FAST_SECONDS
from .distribution import SECONDS as SECONDS
from .distribution import Distribution as Distribution

UNMATCHED = "unmatched"

# no *_created series next to every counter: they double the output and our
# counters all start with the process anyway
disable_created_metrics()  # type: ignore[no-untyped-call]


def bounded(value: str, allowed: Iterable[str], other: str = "other") -> str:
    """C{value} if it is one of C{allowed}, else C{other}: keeps a label's values few."""
    return value if value in allowed else other


# -- metric families for collectors ---------------------------------------------


def counter(name: str, doc: str, value: float | Mapping[str, float], label: str | None = None) -> Metric:
    """A counter family: one value, or one value per C{label} value."""
    if label is None:
        assert not isinstance(value, Mapping), "values per label need the label's name"
        return CounterMetricFamily(name, doc, value=value)
    assert isinstance(value, Mapping), "a label needs a value per label value"
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, v in sorted(value.items()):
        family.add_metric([key], v)
    return family


def gauge(name: str, doc: str, value: float | Mapping[str, float], label: str | None = None) -> Metric:
    """A gauge family: one value, or one value per C{label} value."""
    if label is None:
        assert not isinstance(value, Mapping), "values per label need the label's name"
        return GaugeMetricFamily(name, doc, value=value)
    assert isinstance(value, Mapping), "a label needs a value per label value"
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, v in sorted(value.items()):
        family.add_metric([key], v)
    return family


def histogram(name: str, doc: str, dist: Distribution) -> Metric:
    """A histogram family from C{dist}."""
    return HistogramMetricFamily(name, doc, buckets=dist.cumulative(), sum_value=dist.sum)


class _FuncCollector:
    def __init__(self, produce: Callable[[], Iterable[Metric]]) -> None:
        self._produce = produce

    def collect(self) -> Iterable[Metric]:
        return list(self._produce())


def collector(produce: Callable[[], Iterable[Metric]]) -> _FuncCollector:
    """A collector calling C{produce} at every scrape; register it on a registry."""
    return _FuncCollector(produce)


def new_registry(process: bool = True) -> CollectorRegistry:
    """
    A registry of one program object, with the process_* and python_info
    metrics when C{process} (CPU seconds, resident memory, open files).
    """
    registry = CollectorRegistry()
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry


# -- HTTP ---------------------------------------------------------------------------


def render_metrics(request: IRequest, registry: CollectorRegistry) -> bytes:
    """The registry's metrics in the format the scraper asks for (Prometheus text unless OpenMetrics)."""
    accept = (request.getHeader(b"accept") or b"").decode("latin-1")
    encode, content_type = choose_encoder(accept)
    body = encode(registry)
    request.setResponseCode(200)
    request.setHeader(b"content-type", content_type.encode("ascii"))
    request.setHeader(b"cache-control", b"no-store")
    return body


def metrics_route(app: Klein, registry_of: Callable[[Any], CollectorRegistry], path: str = "/metrics") -> None:
    """
    Add C{GET path} to the class-level Klein C{app}; C{registry_of(self)} is
    the registry of the app's instance.
    """

    @app.route(path, methods=["GET"])
    def metrics(self: Any, request: IRequest) -> bytes:
        return render_metrics(request, registry_of(self))


class MetricsResource(Resource):
    """C{registry}'s metrics as a plain twisted.web resource (GET and HEAD)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._registry = registry

    def render_GET(self, request: IRequest) -> bytes:
        """The registry's metrics in the exposition format the request accepts."""
        return render_metrics(request, self._registry)

    render_HEAD = render_GET


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return b'{"error": {"code": "NOT_FOUND", "message": "only /metrics is served here"}}'


class _MetricsOnly(Resource):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._metrics = MetricsResource(registry)

    def getChild(self, path: bytes, request: IRequest) -> Resource:
        return self._metrics if path == b"metrics" and not request.postpath else _NotFound()  # type: ignore[no-untyped-call]

    def render(self, request: IRequest) -> bytes:
        return _NotFound().render(request)  # type: ignore[no-untyped-call]


def metrics_only_root(registry: CollectorRegistry) -> Resource:
    """A site root serving C{/metrics} and nothing else (a scrape port apart from an API)."""
    return _MetricsOnly(registry)


class HttpMetrics:
    """
    C{<prefix>_http_requests_total{handler,code}} and
    C{<prefix>_http_request_duration_seconds{handler}} for one Klein app.

    @param timer: seconds, monotonic (tests pass a fake).
    """

    def __init__(self, registry: CollectorRegistry, prefix: str, timer: Callable[[], float] = time.monotonic) -> None:
        self.requests = Counter(
            f"{prefix}_http_requests_total", "HTTP requests answered, by route and status code.",
            ["handler", "code"], registry=registry,
        )
        self.duration = Histogram(
            f"{prefix}_http_request_duration_seconds", "Time from a request's arrival to the end of its response.",
            ["handler"], registry=registry, buckets=SECONDS,
        )
        self.timer = timer

    def wrap(self, resource: Any, app: Klein) -> Resource:
        """C{resource} (C{app.resource()}) counting every request it answers."""
        return _Instrumented(resource, app, self)

    def observe(self, handler: str, code: str, seconds: float) -> None:
        """Count one request to C{handler} answered with C{code} after C{seconds}."""
        self.requests.labels(handler, code).inc()
        self.duration.labels(handler).observe(seconds)


class _Instrumented(Resource):
    isLeaf = True

    def __init__(self, inner: Any, app: Klein, metrics: HttpMetrics) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._inner = inner
        self._app = app
        self._metrics = metrics

    def render(self, irequest: IRequest) -> Any:
        request = cast(Request, irequest)  # what a Site passes
        start = self._metrics.timer()

        def done(result: Any, finished: bool) -> None:
            # a client that went away before the answer: code "aborted"
            code = str(request.code) if finished else "aborted"
            self._metrics.observe(_handler(request), code, self._metrics.timer() - start)

        request.notifyFinish().addCallbacks(done, done, callbackArgs=(True,), errbackArgs=(False,))
        return self._inner.render(request)


def _handler(request: IRequest) -> str:
    """The Klein endpoint that matched C{request}, or L{UNMATCHED}."""
    mapper = getattr(IKleinRequest(request, None), "mapper", None)
    if mapper is None:
        return UNMATCHED
    try:
        rule, _ = mapper.match(return_rule=True)
    except (HTTPException, RoutingException):
        return UNMATCHED
    return str(rule.endpoint)
