"""A server span for every HTTP request, W3C trace context accepted from clients.

This is opentelemetry-instrumentation-aiohttp-server's own middleware, created for a given
TracerProvider (`create_aiohttp_middleware(tracer_provider=...)`), so each app (and each test)
traces into its own provider instead of the process-global one. That middleware reads state
the instrumentor sets up when it instruments (excluded URLs from
OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS, the semantic-convention mode, its HTTP meters); the
instrumentor would also replace `web.Application` process-wide, so it is undone at once: the
middleware goes into the app's own list instead.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor, create_aiohttp_middleware


def server_span_middleware(provider: trace.TracerProvider) -> Any:
    instrumentor = AioHttpServerInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=provider)
        instrumentor.uninstrument()  # keep web.Application as it is; the state the middleware reads stays
    return create_aiohttp_middleware(tracer_provider=provider)
