"""/admin: operations for admins only (trigger a sync, see what the engine holds)."""

from __future__ import annotations

from aiohttp import web

from gateway.app_keys import CATALOG, SERVING
from gateway.auth.middleware import PRINCIPAL
from gateway.errors import PermissionDeniedError


def _require_admin(request: web.Request) -> None:
    if not request[PRINCIPAL].admin:
        raise PermissionDeniedError("This endpoint is for admins.")


async def trigger_sync(request: web.Request) -> web.Response:
    _require_admin(request)
    result = await request.app[CATALOG].sync()
    return web.json_response({"listed": result.listed, "changed": result.changed, "removed": result.removed})


async def resident_adapters(request: web.Request) -> web.Response:
    _require_admin(request)
    pool = request.app[SERVING].pool_or_raise()
    rows = [{"adapter": r.name, "requests": r.holders, "loaded": r.loaded, "pinned": r.pinned} for r in pool.resident()]
    return web.json_response({"data": rows})
