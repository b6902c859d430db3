"""/healthz (the process answers) and /readyz (the engine serves and the first sync is done)."""

from __future__ import annotations

from aiohttp import web

from gateway.app_keys import CATALOG, SERVING


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    reason = request.app[SERVING].not_ready_reason(request.app[CATALOG])
    if reason is not None:
        return web.json_response({"status": "unavailable", "reason": reason}, status=503)
    return web.json_response({"status": "ready"})
