"""The gateway's errors, and the one place that maps them to HTTP status and OpenAI's error shape.

What a client is told is a stable message of the gateway's own: never an exception's text, which
names buckets, endpoints, object URLs and server paths. A server-side failure (5xx) quotes the
request id (telemetry/request_id.py); its details go to the log line and the span carrying that id.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from aiohttp import web
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict

from adapters_manifest.store import StoreUnavailableError
from gateway.telemetry.request_id import request_id_of

log = logging.getLogger(__name__)

STORE_UNREACHABLE = "The adapter store is unreachable. Retry shortly."
INTERNAL_ERROR = "The server had an error while processing your request."
# An absolute path of two or more parts (a server's folder layout): reduced to its last part.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.@+=-]+/)+([\w.@+=-]+)")


class GatewayError(Exception):
    status = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s


class InvalidRequestError(GatewayError):
    status = 400
    error_type = "invalid_request_error"


class UnsupportedParameterError(InvalidRequestError):
    code = "unsupported_parameter"


class InvalidAdapterError(InvalidRequestError):
    """An uploaded adapter was refused by validation: nothing was stored."""

    code = "invalid_adapter"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class AuthenticationError(GatewayError):
    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    status = 403
    error_type = "invalid_request_error"
    code = "permission_denied"


class QuotaExceededError(GatewayError):
    """A tenant's bound (adapters per user) is reached: freeing room is up to them."""

    status = 403
    error_type = "invalid_request_error"
    code = "quota_exceeded"


class TemporaryQuotaError(QuotaExceededError):
    """A bound that frees itself with time (versions kept in their grace period): retry later."""

    status = 429
    error_type = "rate_limit_error"


class RateLimitError(GatewayError):
    """The caller has too many requests running and waiting: back off."""

    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ModelNotFoundError(GatewayError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        # The same words whether the adapter is missing or merely not the caller's.
        super().__init__(f"The model '{model}' does not exist or you do not have access to it.", param="model")


class NotFoundError(GatewayError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowedError(GatewayError):
    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeoutError(GatewayError):
    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class RequestTooLargeError(GatewayError):
    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class AdapterLoadFailedError(GatewayError):
    """The adapter exists but the engine cannot load it; other adapters are unaffected."""

    status = 422
    error_type = "invalid_request_error"
    code = "adapter_load_failed"


class AdapterCapacityError(GatewayError):
    """Every engine slot holds an adapter that is in use: try again shortly."""

    status = 503
    code = "adapter_capacity_exhausted"


class EngineCapacityError(GatewayError):
    """The engine runs as many sequences as it can and the queue for it is too long: try again shortly."""

    status = 503
    code = "engine_capacity_exhausted"


class ServiceUnavailableError(GatewayError):
    status = 503
    code = "service_unavailable"


class EngineRequestError(GatewayError):
    """vLLM's OpenAI layer refused or failed a request; its status and words, in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None) -> None:
        super().__init__(message, param=param)
        self.status = status
        self.error_type = "invalid_request_error" if status < 500 else "server_error"


def engine_request_error(status: int, message: str, param: str | None = None) -> GatewayError:
    if status >= 500:  # vLLM's text for its own failures names internals: those go to the log
        log.error("vLLM's OpenAI layer failed a request (%d): %s", status, message)
        return GatewayError("The server had an error while processing your request.")
    if status == 404:  # the gateway resolved the model; vLLM's 404s are for what it cannot find inside it
        return NotFoundError(message, param=param)
    return EngineRequestError(status, message, param)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error shape, for every 4xx and 5xx (and the OpenAPI document's schema of it)."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail

    @classmethod
    def of(cls, error: GatewayError, request_id: str | None) -> ErrorBody:
        detail = ErrorDetail(
            message=client_message(error, request_id), type=error.error_type, param=error.param, code=error.code
        )
        return cls(error=detail)


def redact_paths(text: str) -> str:
    """`text` with absolute paths cut to their last part: `/var/cache/x/adapter_model.safetensors`
    becomes `adapter_model.safetensors`, which is all the adapter's owner needs to know."""
    return _ABSOLUTE_PATH.sub(r"\1", text)


def describe(exc: BaseException) -> str:
    """An exception and what caused it, in one line, for the log and the span (never for clients)."""
    parts, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)


def client_message(error: GatewayError, request_id: str | None) -> str:
    """The message a client gets: a server-side failure quotes the request id to report."""
    if error.status < 500 or request_id is None:
        return error.message
    return f"{error.message} (Please include the request ID {request_id} when you report this.)"


def client_error_body(error: GatewayError, request: web.BaseRequest) -> dict[str, Any]:
    """The error object for `request`, also for an error event inside a stream already under way."""
    return ErrorBody.of(error, request_id_of(request)).model_dump()


def error_response(error: GatewayError, request_id: str | None = None) -> web.Response:
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    body = ErrorBody.of(error, request_id).model_dump_json()
    return web.Response(status=error.status, text=body, content_type="application/json", headers=headers)


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    """aiohttp raises these for routing and body-size problems; give them our shape."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        # aiohttp keeps the limit only in its text: "Maximum request body size N exceeded."
        return RequestTooLargeError(f"Request body too large. {exc.text}")
    if isinstance(exc, web.HTTPNotFound):
        return NotFoundError("No such endpoint.")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowedError(f"Method {exc.method} is not allowed here.")
    error = InvalidRequestError(exc.reason) if exc.status < 500 else GatewayError(exc.reason)
    error.status = exc.status
    return error


def known_error(exc: BaseException) -> GatewayError | None:
    """The API error an exception from the serving path stands for; None for a bug (a 500)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, StoreUnavailableError):  # serving from cache goes on; this request needed the store
        return ServiceUnavailableError(STORE_UNREACHABLE, retry_after_s=5)
    return None


def report_server_error(request: web.BaseRequest, exc: BaseException, error: GatewayError | None) -> None:
    """A 5xx (or a bug): its details to the log, with the request id, and to the current (server) span."""
    request_id = request_id_of(request)
    if error is None:
        log.error("unhandled error on %s %s (request %s)", request.method, request.path, request_id, exc_info=exc)
    else:
        log.warning(
            "%s %s answered %d (request %s): %s", request.method, request.path, error.status, request_id, describe(exc)
        )
    span = trace.get_current_span()
    span.record_exception(exc)
    span.set_attribute("error.detail", describe(exc))


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(_from_http_exception(exc), request_id_of(request))
        if "Allow" in exc.headers:  # a 405 must say which methods are allowed (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception as exc:
        error = known_error(exc)
        if error is None or error.status >= 500:
            report_server_error(request, exc, error)
        return error_response(error or GatewayError(INTERNAL_ERROR), request_id_of(request))
