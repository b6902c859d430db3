"""GET /openapi.json: the API as OpenAPI 3.1, generated from the request models the handlers
validate with, the statuses they answer and OpenAI's error shape. Built once per app."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from adapters_manifest.record import ADAPTER_FILES, MAX_DESCRIPTION_CHARS, MAX_ROUTE_CHARS, MAX_ROUTES, NAME_PATTERN
from gateway.api.adapters import FORM_FIELDS
from gateway.auth.middleware import OPEN_PATHS
from gateway.errors import ErrorBody

REF = "#/components/schemas/{model}"
JSON = "application/json"
SSE = "text/event-stream"
BODY_SCHEMAS = {JSON: {"type": "object"}, SSE: {"type": "object", "required": ["data"]}}  # SSE: each event
STREAMED = (JSON, SSE)
GENERATION_ERRORS = (400, 404, 408, 413, 422, 429, 503)  # a bad, slow or large body, no such model, adapter, limits
TOKEN_ERRORS = (400, 404, 408, 413, 429, 503)


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    body: type[BaseModel] | str | None = None  # a JSON body's model, or "multipart"
    ok_types: tuple[str, ...] = (JSON,)
    errors: tuple[int, ...] = ()  # besides 401 and 500, which every authenticated operation may answer
    ok: int = 200
    query: tuple[tuple[str, dict[str, Any]], ...] = ()  # optional query parameters: name, schema


def _operations() -> tuple[Operation, ...]:
    # The bodies are vLLM's own protocol models: what its OpenAI layer validates with, behind the gate.
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeCompletionRequest

    return (
        Operation(
            "post", "/v1/completions", "Create a text completion", CompletionRequest, STREAMED, GENERATION_ERRORS
        ),
        Operation(
            "post",
            "/v1/chat/completions",
            "Create a chat completion",
            ChatCompletionRequest,
            STREAMED,
            GENERATION_ERRORS,
        ),
        Operation("post", "/v1/responses", "Create a model response", ResponsesRequest, STREAMED, GENERATION_ERRORS),
        Operation(
            "post", "/tokenize", "Tokenize a prompt or conversation", TokenizeCompletionRequest, errors=TOKEN_ERRORS
        ),
        Operation("post", "/detokenize", "Token ids back to text", DetokenizeRequest, errors=TOKEN_ERRORS),
        Operation("get", "/v1/models", "List the base model and the adapters the caller may use"),
        Operation("get", "/v1/models/{model}", "One model the caller may use", errors=(404,)),
        Operation(
            "get",
            "/v1/adapters",
            "List the adapters the caller may use, a page at a time",
            errors=(400,),
            query=(("limit", {"type": "integer", "minimum": 1}), ("after", {"type": "string"})),
        ),
        Operation("post", "/v1/adapters", "Upload an adapter", "multipart", errors=(400, 403, 413, 429, 503), ok=201),
        Operation("get", "/v1/adapters/{owner}/{name}", "Show an adapter", errors=(404, 503)),
        Operation("delete", "/v1/adapters/{owner}/{name}", "Delete an adapter", errors=(403, 404, 503)),
        Operation("post", "/admin/sync", "Sync the adapter catalog with the store now (admins)", errors=(403, 503)),
        Operation("get", "/admin/resident", "Adapters the engine holds (admins)", errors=(403, 503)),
        Operation("get", "/healthz", "The process answers"),
        Operation("get", "/readyz", "The engine serves and the first sync is done", errors=(503,)),
        Operation(
            "get",
            "/metrics",
            "Prometheus metrics (adapter names only with the metrics token)",
            errors=(401,),
            ok_types=("text/plain",),
        ),
        Operation("get", "/openapi.json", "This document"),
    )


def build_openapi() -> dict[str, Any]:
    operations = _operations()
    bodies = [op.body for op in operations if isinstance(op.body, type)]
    refs, defs = models_json_schema([(m, "validation") for m in (*bodies, ErrorBody)], ref_template=REF)
    for schema in defs["$defs"].values():  # vLLM's models keep extras; the gateway's gate refuses them
        if schema.get("additionalProperties") is True and "properties" in schema:
            schema["additionalProperties"] = False
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method] = _operation(op, refs)
    return {
        "openapi": "3.1.0",
        "info": {"title": "lora-gateway", "version": importlib.metadata.version("lora-gateway")},
        "paths": paths,
        "components": {
            "schemas": defs["$defs"],
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "An API key."}},
        },
        "security": [{"bearer": []}],
    }


def _operation(op: Operation, refs: dict[Any, Any]) -> dict[str, Any]:
    error = {"content": {JSON: {"schema": refs[(ErrorBody, "validation")]}}}
    open_path = op.path in OPEN_PATHS
    statuses = sorted({*op.errors, *(() if open_path else (401, 500))})
    operation: dict[str, Any] = {
        "operationId": f"{op.method}_{op.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
        "summary": op.summary,
        "responses": {
            str(op.ok): {
                "description": HTTPStatus(op.ok).phrase,
                "content": {t: {"schema": BODY_SCHEMAS.get(t, {"type": "string"})} for t in op.ok_types},
            },
            **{str(s): {"description": HTTPStatus(s).phrase, **error} for s in statuses},
        },
    }
    if open_path:
        operation["security"] = []
    if "{owner}" in op.path:
        name = {"type": "string", "pattern": NAME_PATTERN.pattern}
        operation["parameters"] = [
            {"name": part, "in": "path", "required": True, "schema": name} for part in ("owner", "name")
        ]
    if "{model}" in op.path:
        operation["parameters"] = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    if op.query:
        operation["parameters"] = [{"name": n, "in": "query", "required": False, "schema": q} for n, q in op.query]
    if isinstance(op.body, type):
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": refs[(op.body, "validation")]}}}
    elif op.body == "multipart":
        fields = {f: {"type": "string", **_form_field_docs().get(f, {})} for f in sorted(FORM_FIELDS)}
        files = {f: {"type": "string", "contentMediaType": "application/octet-stream"} for f in ADAPTER_FILES}
        form = {
            "type": "object",
            "properties": {**fields, **files},
            "required": ["name", *ADAPTER_FILES],
            "additionalProperties": False,
        }
        operation["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": form}}}
    return operation


def _form_field_docs() -> dict[str, dict[str, str]]:
    """What the upload's text fields hold, where the name alone does not say."""
    return {
        "description": {"description": f"At most {MAX_DESCRIPTION_CHARS} characters."},
        "routes": {
            "description": f"A JSON array of at most {MAX_ROUTES} distinct example utterances, each 1 to "
            f'{MAX_ROUTE_CHARS} characters, that `model: "auto"` routes by. Changing them (or the '
            "description) makes a new version.",
            "contentMediaType": "application/json",
        },
    }


OPENAPI = web.AppKey("openapi", dict)


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])
