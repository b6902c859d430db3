"""/admin: operations for admins only (trigger a sync, see what the engine holds)."""

from __future__ import annotations

from aiohttp import web

from adapters_manifest.store import StoreUnavailableError
from gateway.app_keys import CATALOG, SERVING
from gateway.auth.middleware import PRINCIPAL
from gateway.errors import PermissionDeniedError, ServiceUnavailableError


def _require_admin(request: web.Request) -> None:
    if not request[PRINCIPAL].admin:
        raise PermissionDeniedError("This endpoint is for admins.")


async def trigger_sync(request: web.Request) -> web.Response:
    _require_admin(request)
    try:
        result = await request.app[CATALOG].sync()
    except StoreUnavailableError as exc:
        raise ServiceUnavailableError(f"The adapter store is unreachable: {exc}", retry_after_s=5) from exc
    return web.json_response({"listed": result.listed, "changed": result.changed, "removed": result.removed})


async def resident_adapters(request: web.Request) -> web.Response:
    _require_admin(request)
    pool = request.app[SERVING].pool_or_raise()
    return web.json_response(
        {"data": [{"adapter": r.name, "requests": r.holders, "loaded": r.loaded} for r in pool.resident()]}
    )
