"""Graceful shutdown: once draining, new work gets a 503 while work in flight runs to its end."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.app_keys import SERVING
from gateway.auth.middleware import OPEN_PATHS
from gateway.errors import ServiceUnavailableError


@web.middleware
async def drain_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path in OPEN_PATHS:  # probes keep answering: /readyz says 503 while draining
        return await handler(request)
    serving = request.app[SERVING]
    if serving.draining:
        raise ServiceUnavailableError("The server is shutting down; retry on another replica.", retry_after_s=1)
    serving.in_flight += 1  # a stream counts until its last byte: the handler returns after it
    try:
        return await handler(request)
    finally:
        serving.in_flight -= 1
