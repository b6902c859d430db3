"""The gateway's errors, and the one place that maps them to HTTP status and OpenAI's error shape."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from aiohttp import web

from adapters_manifest.store import StoreUnavailableError

log = logging.getLogger(__name__)


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


class ServiceUnavailableError(GatewayError):
    status = 503
    code = "service_unavailable"


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: GatewayError) -> web.Response:
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return web.Response(
        status=error.status,
        text=json.dumps(error_body(error.message, error.error_type, error.param, error.code)),
        content_type="application/json",
        headers=headers,
    )


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
        return ServiceUnavailableError(f"The adapter store is unreachable: {exc}", retry_after_s=5)
    return None


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(_from_http_exception(exc))
        if "Allow" in exc.headers:  # a 405 must say which methods are allowed (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception as exc:
        error = known_error(exc)
        if error is None:
            log.exception("unhandled error on %s %s", request.method, request.path)
            error = GatewayError("The server had an error while processing your request.")
        return error_response(error)
