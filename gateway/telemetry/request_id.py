"""A request id for every HTTP request: in the `X-Request-Id` response header, on the server span
(`gateway.request_id`) and in the log lines about the request's failure, so that a client quoting it
leads an operator to the details the client is not shown (errors.py keeps those out of bodies)."""

from __future__ import annotations

import secrets
from typing import Any

from aiohttp import web
from opentelemetry import trace

REQUEST_ID = web.RequestKey("request_id", str)
REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_ATTRIBUTE = "gateway.request_id"


def new_request_id() -> str:
    # Made here, never taken from the client: a client-chosen id could pose as another request's.
    return "req_" + secrets.token_hex(12)


def request_id_of(request: web.BaseRequest) -> str | None:
    return request.get(REQUEST_ID)


@web.middleware
async def request_id_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Inside the server span (which it annotates), outside the error middleware (which quotes it)."""
    request[REQUEST_ID] = new_request_id()
    trace.get_current_span().set_attribute(REQUEST_ID_ATTRIBUTE, request[REQUEST_ID])
    return await handler(request)


async def add_request_id_header(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """An `on_response_prepare` signal: streams get the header too, before their first byte."""
    request_id = request_id_of(request)
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id
