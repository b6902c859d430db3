"""A server span for every HTTP request, W3C trace context accepted from clients.

This is opentelemetry-instrumentation-aiohttp-server's own middleware, created for a given
TracerProvider (`create_aiohttp_middleware(tracer_provider=...)`), so each app (and each test)
traces into its own provider instead of the process-global one. That middleware reads state
the instrumentor sets up when it instruments (excluded URLs from
OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS, the semantic-convention mode, its HTTP meters); the
instrumentor would also replace `web.Application` process-wide, so it is undone at once: the
middleware goes into the app's own list instead.

Request headers land on spans only if an operator lists them in
OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST; credential headers are then always
redacted (added to OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS), so an API key
never reaches a trace whatever is captured.
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor, create_aiohttp_middleware
from opentelemetry.util.http import OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS, get_custom_headers

CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key")


def server_span_middleware(provider: trace.TracerProvider) -> Any:
    redact_credential_headers()
    instrumentor = AioHttpServerInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=provider)
        instrumentor.uninstrument()  # keep web.Application as it is; the state the middleware reads stays
    return create_aiohttp_middleware(tracer_provider=provider)


def redact_credential_headers() -> None:
    """Whatever headers are captured on spans, credentials among them are redacted (the library reads
    this variable on every request)."""
    listed = get_custom_headers(OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS)
    missing = [name for name in CREDENTIAL_HEADERS if name not in {entry.lower() for entry in listed}]
    if missing:
        os.environ[OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS] = ",".join([*listed, *missing])
