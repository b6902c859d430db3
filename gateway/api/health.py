"""/healthz (the process answers) and /readyz (the engine serves and the first sync is done)."""

from __future__ import annotations

from aiohttp import web

from gateway.app_keys import CATALOG, SERVING
from gateway.auth.middleware import AUTHENTICATOR, ApiKeyAuthenticator


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    since = catalog.seconds_since_sync()
    # A store outage does not make the replica unready: it serves what it has, and says how stale.
    sync = {
        "seconds_since_success": None if since is None else round(since, 1),
        # Anonymous callers: whether the store answers, never the error's text (bucket, endpoint).
        "last_error": None if catalog.last_error is None else "the adapter store is unreachable",
        "adapters": len(catalog),
    }
    # A broken keys file leaves the replica ready (the valid keys serve on) but says so.
    authenticator = request.app[AUTHENTICATOR]
    keys = {"keys_file": authenticator.keys.status.public()} if isinstance(authenticator, ApiKeyAuthenticator) else {}
    reason = request.app[SERVING].not_ready_reason(catalog)
    if reason is not None:
        body = {"status": "unavailable", "reason": reason, "adapter_sync": sync, **keys}
        return web.json_response(body, status=503)
    engine = request.app[SERVING].engine_or_raise()
    return web.json_response({"status": "ready", "adapter_sync": sync, "base_requests": engine.base_requests, **keys})
