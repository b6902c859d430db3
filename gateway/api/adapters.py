"""/v1/adapters: upload (multipart), list, show and delete adapters.

Callers act in their own namespace (`owner` = their user); admins in any. An upload is
validated before anything is stored, published (files, then the record), and
served at once by this replica; other replicas pick it up at their next sync.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import BadHttpMessage

from adapters_manifest.publish import publish, validated_record
from adapters_manifest.record import (
    ADAPTER_FILES,
    CONFIG_FILE,
    MAX_ROUTE_CHARS,
    MAX_ROUTES,
    WEIGHTS_FILE,
    AdapterRecord,
    RoutingError,
    check_name,
    check_upload_name,
)
from adapters_manifest.validation import AdapterValidationError, ValidationLimits
from adapters_manifest.versions import kept_versions
from gateway.app_keys import BASE_SPEC, CATALOG, SETTINGS, STORE, UPLOADS, VERSIONS
from gateway.auth.middleware import PRINCIPAL
from gateway.errors import (
    InvalidAdapterError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RequestTimeoutError,
    RequestTooLargeError,
    TemporaryQuotaError,
)

FORM_FIELDS = {"name", "description", "public", "owner", "routes"}
MAX_FIELD_BYTES = 4096
# `routes` is a JSON array: MAX_ROUTES routes of MAX_ROUTE_CHARS characters must fit even when every
# character is \u-escaped as a surrogate pair (12 bytes), with room for quotes, commas and spaces.
MAX_ROUTES_FIELD_BYTES = MAX_ROUTES * (12 * MAX_ROUTE_CHARS + 16)


def adapter_json(record: AdapterRecord) -> dict[str, Any]:
    return {"id": record.ref, "object": "adapter", **record.model_dump(mode="json")}


async def upload_adapter(request: web.Request) -> web.Response:
    # Admitted before the body is read: uploads in progress bound the scratch disk they take.
    async with request.app[UPLOADS].admit(request[PRINCIPAL].user):
        return await _upload(request)


async def _upload(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    with tempfile.TemporaryDirectory(prefix="upload-") as tmp:
        folder = Path(tmp)
        try:  # bounded in time too: a client dribbling its upload must not hold a connection forever
            async with asyncio.timeout(settings.upload_timeout_s):
                fields = await _receive_form(request, folder, _part_limits(settings.validation_limits()))
        except (ValueError, BadHttpMessage) as exc:  # aiohttp's multipart parser: no boundary, a malformed part
            raise InvalidRequestError(f"Malformed multipart body: {exc}") from None
        except TimeoutError:
            raise RequestTimeoutError(f"The upload did not arrive within {settings.upload_timeout_s:g} s.") from None
        principal = request[PRINCIPAL]
        owner, name = fields.get("owner") or principal.user, fields.get("name", "")
        if owner != principal.user and not principal.admin:
            raise PermissionDeniedError("You can only upload into your own namespace.", param="owner")
        for value, what, check in (
            (owner, "owner", partial(check_name, what="owner")),
            (name, "name", check_upload_name),
        ):
            if not value:
                raise InvalidRequestError(f"Missing required form field: '{what}'.", param=what)
            try:
                check(value)
            except ValueError as exc:
                raise InvalidRequestError(str(exc), param=what) from None
        routes = _routes_field(fields.get("routes"))
        missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
        if missing:
            raise InvalidAdapterError(f"Missing file(s): {', '.join(missing)}.", param="files")
        try:
            record = await asyncio.to_thread(
                validated_record,
                folder,
                owner,
                name,
                base=request.app[BASE_SPEC],
                limits=settings.validation_limits(),
                base_model=settings.base_model_name,
                description=fields.get("description", ""),
                routes=routes,
                visibility="public" if fields.get("public", "").lower() in ("1", "true", "yes", "on") else "private",
            )
        except RoutingError as exc:  # checked before the adapter's files
            raise InvalidRequestError(str(exc), param=exc.field) from None
        except AdapterValidationError as exc:
            raise InvalidAdapterError(f"Adapter refused: {exc}", param="files") from None
        await _check_quotas(request.app, record)
        await publish(request.app[STORE], folder, record)
    request.app[CATALOG].add(record)
    request.app[VERSIONS].schedule(record.owner, record.name)  # the one it replaced, after its grace
    return web.json_response(adapter_json(record), status=201)


async def _check_quotas(app: web.Application, record: AdapterRecord) -> None:
    """Judged by the store, not this replica's catalog: other replicas and the CLI upload too."""
    settings, store = app[SETTINGS], app[STORE]
    owned = await store.list_stamps(record.owner)
    if record.ref not in owned and len(owned) >= settings.max_adapters_per_user:
        raise QuotaExceededError(
            f"'{record.owner}' has {len(owned)} adapters, the most one user may have: delete one first.",
            param="name",
        )
    kept = await kept_versions(store, record.owner, record.name, settings.version_grace_s, excluding=record.version)
    if kept.count >= settings.max_versions_per_adapter:
        raise TemporaryQuotaError(
            f"'{record.ref}' keeps {kept.count} versions, the most one adapter may: a replaced version stays "
            f"{settings.version_grace_s:g} s for replicas still serving it. Retry later.",
            param="name",
            retry_after_s=kept.next_expiry_s,
        )


def _routes_field(raw: str | None) -> list[str]:
    """The `routes` form field: a JSON array of strings (their limits are check_routing's)."""
    if raw is None:
        return []
    try:
        routes = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: brackets nested deeper than the parser goes
        raise InvalidRequestError(
            "Form field 'routes' is not valid JSON: send a JSON array of strings.", param="routes"
        ) from None
    if not isinstance(routes, list) or not all(isinstance(route, str) for route in routes):
        raise InvalidRequestError("Form field 'routes' must be a JSON array of strings.", param="routes")
    return routes


def _part_limits(limits: ValidationLimits) -> dict[str, int]:
    """Each file's own limit, enforced while it streams in (not after the whole body arrived)."""
    return {CONFIG_FILE: limits.max_config_bytes, WEIGHTS_FILE: limits.max_weights_bytes}


async def _receive_form(request: web.Request, folder: Path, file_limits: dict[str, int]) -> dict[str, str]:
    """Stream the multipart body: files to `folder` (each bounded), small text fields to a dict."""
    if not request.content_type.startswith("multipart/"):
        raise InvalidRequestError(
            "Upload with multipart/form-data: fields 'name', files adapter_config.json and adapter_model.safetensors."
        )
    fields: dict[str, str] = {}
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise InvalidRequestError("Nested multipart bodies are not supported.")
        file_name = part.filename or ""
        if part.name in FORM_FIELDS and not file_name:
            limit = MAX_ROUTES_FIELD_BYTES if part.name == "routes" else MAX_FIELD_BYTES
            fields[part.name] = (await _read_bounded(part, limit, part.name)).decode("utf-8", "replace")
        elif file_name in ADAPTER_FILES or (part.name in ADAPTER_FILES and not file_name):
            target = file_name or str(part.name)
            await _save_bounded(part, folder / target, file_limits[target])
        elif file_name:
            raise InvalidAdapterError(
                f"Unexpected file '{file_name}': an adapter is exactly adapter_config.json and "
                "adapter_model.safetensors (pickle formats such as .bin and .pt are refused: loading "
                "them can run arbitrary code).",
                param="files",
            )
        else:
            raise InvalidRequestError(f"Unknown form field: '{part.name}'.", param=part.name)
    return fields


async def _read_bounded(part: BodyPartReader, limit: int, what: str | None) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk():
        data += chunk
        if len(data) > limit:
            raise RequestTooLargeError(f"Form field '{what}' is larger than {limit} bytes.")
    return bytes(data)


async def _save_bounded(part: BodyPartReader, dest: Path, limit: int) -> None:
    size = 0
    with dest.open("wb") as out:
        while chunk := await part.read_chunk(1 << 20):
            size += len(chunk)
            if size > limit:
                raise RequestTooLargeError(f"File '{dest.name}' is larger than the limit of {limit} bytes.")
            out.write(chunk)


async def list_adapters(request: web.Request) -> web.Response:
    """One page, in `owner/name` order: `limit` (default and most: max_list_page), `after` an id."""
    largest = request.app[SETTINGS].max_list_page
    raw = request.query.get("limit", str(largest))
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= largest):
        raise InvalidRequestError(f"limit must be an integer from 1 to {largest}.", param="limit")
    page, has_more = request.app[CATALOG].visible_page(request[PRINCIPAL], request.query.get("after"), int(raw))
    return web.json_response(
        {
            "object": "list",
            "data": [adapter_json(r) for r in page],
            "first_id": page[0].ref if page else None,
            "last_id": page[-1].ref if page else None,
            "has_more": has_more,
        }
    )


async def show_adapter(request: web.Request) -> web.Response:
    return web.json_response(adapter_json(await _known_adapter(request)))


async def delete_adapter(request: web.Request) -> web.Response:
    record = await _known_adapter(request)
    principal = request[PRINCIPAL]
    if record.owner != principal.user and not principal.admin:  # someone else's public adapter
        raise PermissionDeniedError("You can only delete adapters in your own namespace.")
    await request.app[STORE].delete_adapter(record.owner, record.name)
    request.app[CATALOG].forget(record.ref)
    return web.json_response({"id": record.ref, "object": "adapter", "deleted": True})


async def _known_adapter(request: web.Request) -> AdapterRecord:
    ref = f"{request.match_info['owner']}/{request.match_info['name']}"
    record = await request.app[CATALOG].resolve(ref, request[PRINCIPAL])
    if record is None:  # the base model's name: not an adapter
        raise NotFoundError(f"No adapter '{ref}'.")
    return record
