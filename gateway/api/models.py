"""GET /v1/models and /v1/models/{id}: the base model and the adapters the caller may use, each
adapter's parent being the base. Another tenant's private adapter is not found, in the same words
as a missing one."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from adapters_manifest.record import AdapterRecord
from gateway.app_keys import CATALOG
from gateway.auth.middleware import PRINCIPAL


def _base_card(base: str) -> dict[str, Any]:
    return {"id": base, "object": "model", "created": 0, "owned_by": "lora-gateway", "root": base, "parent": None}


def _adapter_card(record: AdapterRecord, base: str) -> dict[str, Any]:
    return {
        "id": record.ref,
        "object": "model",
        "created": int(record.created_at.timestamp()),
        "owned_by": record.owner,
        "root": record.ref,
        "parent": base,
    }


async def list_models(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    base = catalog.base_model_name
    data = [_base_card(base)] + [_adapter_card(r, base) for r in catalog.visible_records(request[PRINCIPAL])]
    return web.json_response({"object": "list", "data": data})


async def show_model(request: web.Request) -> web.Response:
    catalog, model = request.app[CATALOG], request.match_info["model"]
    # As completions resolve `model` (a bare name is the caller's own): the same 404 for what is
    # missing and what is someone else's.
    record = await catalog.resolve(model, request[PRINCIPAL])
    base = catalog.base_model_name
    return web.json_response(_base_card(base) if record is None else _adapter_card(record, base))
