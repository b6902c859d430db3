"""GET /v1/models: the base model and every adapter, each adapter's parent being the base."""

from __future__ import annotations

from aiohttp import web

from gateway.app_keys import CATALOG
from gateway.auth.middleware import PRINCIPAL


async def list_models(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    visible = catalog.visible_records(request[PRINCIPAL])
    base = catalog.base_model_name
    data = [{"id": base, "object": "model", "created": 0, "owned_by": "lora-gateway", "root": base, "parent": None}]
    data += [
        {
            "id": record.ref,
            "object": "model",
            "created": int(record.created_at.timestamp()),
            "owned_by": record.owner,
            "root": record.ref,
            "parent": base,
        }
        for record in visible
    ]
    return web.json_response({"object": "list", "data": data})
