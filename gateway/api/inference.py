"""The OpenAI inference endpoints (completions, chat, Responses, tokenize, detokenize).

A request's path, top to bottom in `Inference._serve`: the strict gate (vLLM's protocol models,
unknown fields refused; request_gate.py) -> the caller's turn (admission.py) -> `model: "auto"` is
routed to one of the caller's adapters (or the base) -> the catalog resolves `model` for the caller
-> the request enters the engine: its seats, then its adapter's slot (admission.py) -> vLLM's own
OpenAI layer serves it as that caller (openai_layer.py) -> the answer, whole or streamed, errors in
OpenAI's shape (errors.py).

Observed on the way: the request's server span gets the gen_ai.* attributes and the adapter's
owner/name/version; each generation is an `engine.generate` span with a `first_token` event; request
counts, latency and time to first token go to /metrics (labels bounded: no adapter names).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry import trace
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.trace import Span, StatusCode
from pydantic import BaseModel

from gateway.admission import sequences_of
from gateway.api.openai_layer import Caller
from gateway.api.request_gate import parse_body
from gateway.app_keys import Running, Serving
from gateway.auth.middleware import PRINCIPAL
from gateway.catalog import AdapterCatalog
from gateway.engine.vllm_engine import lora_request
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    RequestTimeoutError,
    ServiceUnavailableError,
    client_error_body,
    engine_request_error,
    known_error,
)
from gateway.metrics import GatewayMetrics, elapsed_since
from gateway.routing.auto import ROUTED_MODEL_HEADER, auto_namespace, routed_model
from gateway.routing.router import Router
from gateway.settings import ServeSettings
from gateway.telemetry import spans
from gateway.telemetry.request_id import request_id_of

log = logging.getLogger(__name__)

BASE_SOURCE = "base"  # the adapter source of a base-model request

# Request outcomes by HTTP status (a metric label: a handful of values whatever the traffic).
OUTCOMES = {400: "invalid", 408: "invalid", 413: "invalid", 404: "not_found", 422: "adapter_failed"}
OUTCOMES |= {429: "rate_limited", 503: "unavailable"}


@dataclass(frozen=True)
class Endpoint:
    label: str  # the metrics' endpoint label
    operation: str  # gen_ai.operation.name
    request_model: Callable[[dict[str, Any]], type[BaseModel]]  # vLLM's protocol model for a body
    serve: Callable[[Any], Callable[[Any, None], Awaitable[Any]]]  # OpenAILayer -> vLLM's handler
    # Generating needs the adapter in the engine, and may be routed (model "auto"); tokenizing neither.
    generates: bool = True


def _protocol(module: str, name: str) -> Callable[[dict[str, Any]], type[BaseModel]]:
    """vLLM's protocol model `module.name`, imported at the first request (vLLM is slow to import)."""

    def model(body: dict[str, Any]) -> type[BaseModel]:
        return getattr(importlib.import_module(module), name)

    return model


def _tokenize_model(body: dict[str, Any]) -> type[BaseModel]:
    from vllm.entrypoints.serve.tokenize.protocol import TokenizeChatRequest, TokenizeCompletionRequest

    return TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest


COMPLETIONS = Endpoint(
    "completions",
    gen_ai.GenAiOperationNameValues.TEXT_COMPLETION.value,
    _protocol("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
    lambda layer: layer.completion.create_completion,
)
CHAT_COMPLETIONS = Endpoint(
    "chat_completions",
    gen_ai.GenAiOperationNameValues.CHAT.value,
    _protocol("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),
    lambda layer: layer.chat.create_chat_completion,
)
RESPONSES = Endpoint(
    "responses",
    gen_ai.GenAiOperationNameValues.CHAT.value,
    _protocol("vllm.entrypoints.openai.responses.protocol", "ResponsesRequest"),
    lambda layer: layer.responses.create_responses,
)
TOKENIZE = Endpoint("tokenize", "tokenize", _tokenize_model, lambda layer: layer.tokenization.create_tokenize, False)
DETOKENIZE = Endpoint(
    "detokenize",
    "detokenize",
    _protocol("vllm.entrypoints.serve.tokenize.protocol", "DetokenizeRequest"),
    lambda layer: layer.tokenization.create_detokenize,
    False,
)


@dataclass
class Observation:
    """What the metrics and the span of one request need, filled in as the request goes."""

    endpoint: str
    started: float
    stream: bool = False
    outcome: str = "ok"  # a stream that fails after its headers were sent sets its own
    adapter_source: str = BASE_SOURCE
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    _prompts_seen: set[str] = field(default_factory=set)

    @property
    def stream_label(self) -> str:
        return "true" if self.stream else "false"

    def add_output(self, output: Any) -> None:
        """Tally one of vLLM's RequestOutputs (deltas when streaming, the final one otherwise)."""
        if output.prompt_token_ids and output.request_id not in self._prompts_seen:
            self._prompts_seen.add(output.request_id)
            self.prompt_tokens += len(output.prompt_token_ids)
        for completion in output.outputs:
            self.output_tokens += len(completion.token_ids)
            if completion.finish_reason is not None:
                self.finish_reasons.append(completion.finish_reason)


def tenant_cache_salt(secret: bytes, user: str, requested: str | None) -> str:
    """The prefix-cache salt of a user's request: cached prefixes are shared only within one tenant
    (and within one salt the caller chose), and no caller can name another tenant's salt."""
    return hmac.new(secret, f"{user}\0{requested or ''}".encode(), hashlib.sha256).hexdigest()


def outcome_of(status: int) -> str:
    return OUTCOMES.get(status, "invalid" if 400 <= status < 500 else "error")


@dataclass(frozen=True)
class Inference:
    """The inference endpoints, with the collaborators the app factory passes in once."""

    settings: ServeSettings
    serving: Serving  # the engine's parts once it has started (it may restart)
    catalog: AdapterCatalog
    router: Router
    metrics: GatewayMetrics
    cache_salt_secret: bytes  # this process's secret for tenants' prefix-cache salts

    def handler(self, endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            observation = Observation(endpoint.label, time.perf_counter())
            try:
                return await self._serve(request, endpoint, observation)
            except (asyncio.CancelledError, ConnectionResetError):  # the client hung up
                observation.outcome = "cancelled"
                raise
            except Exception as exc:  # errors.py answers it: the outcome follows its status
                error = known_error(exc)
                observation.outcome = "error" if error is None else outcome_of(error.status)
                raise
            finally:
                labels = (endpoint.label, observation.stream_label, observation.outcome)
                self.metrics.requests.labels(*labels).inc()
                self.metrics.request_seconds.labels(*labels).observe(elapsed_since(observation.started))

        return handle

    async def _serve(self, request: web.Request, endpoint: Endpoint, observation: Observation) -> web.StreamResponse:
        raw = await _read_json(request, self.settings.body_timeout_s)
        if not isinstance(raw, dict):
            raise InvalidRequestError("The request body must be a JSON object.")
        principal = request[PRINCIPAL]
        try:
            body = parse_body(endpoint.request_model(raw), raw)
        except GatewayError:
            raise
        except Exception as exc:  # vLLM's own validators raise its errors out of pydantic's validation
            raise _refusal(self.serving.running_or_raise(), None, exc) from exc
        observation.stream = bool(getattr(body, "stream", False))
        running = self.serving.running_or_raise()
        body.model = body.model or self.catalog.base_model_name  # as vLLM: no model is the base model
        if hasattr(body, "request_id"):  # the engine's id is the gateway's: a client's could pose as another's
            body.request_id = request_id_of(request)
        if hasattr(body, "cache_salt") and self.settings.prefix_cache_per_tenant:
            body.cache_salt = tenant_cache_salt(self.cache_salt_secret, principal.user, body.cache_salt)
        request_span = trace.get_current_span()  # the server span of this HTTP request
        _describe_request(request_span, endpoint.operation, body)

        def first_token() -> None:
            self.metrics.time_to_first_token.labels(
                observation.endpoint, observation.stream_label, observation.adapter_source
            ).observe(elapsed_since(observation.started))

        headers: dict[str, str] = {}
        async with contextlib.AsyncExitStack() as held:
            with self.metrics.waiting("fair_share"):  # before any work for the caller, the look-up included
                await held.enter_async_context(running.admission.caller_turn(principal.user))
            routing_owner = auto_namespace(body.model, principal.user) if self.settings.routing else None
            if routing_owner is not None:
                if not endpoint.generates:
                    raise InvalidRequestError(
                        f"model '{body.model}' routes completions, chat and responses; name a model here.",
                        param="model",
                    )
                body.model = await routed_model(self.router, self.catalog, principal, body, routing_owner)
                headers[ROUTED_MODEL_HEADER] = body.model
                request_span.set_attribute(gen_ai.GEN_AI_RESPONSE_MODEL, body.model)
            record = await self.catalog.resolve(body.model, principal)
            if record is not None:
                request_span.set_attributes(spans.adapter_attributes(record))
            adapter = None
            if endpoint.generates:
                grant = await held.enter_async_context(
                    running.admission.enter_engine(record, principal.user, sequences_of(body))
                )
                adapter = grant.adapter
                if grant.source is not None:  # None: the base model, BASE_SOURCE already
                    observation.adapter_source = grant.source
            caller = Caller(
                model=body.model,
                lora=lora_request(adapter),
                on_first_token=first_token,
                on_output=observation.add_output,
            )
            with running.openai.serving(caller):
                try:
                    result = await endpoint.serve(running.openai)(body, None)
                except Exception as exc:  # vLLM's server maps these in its exception handlers
                    raise _refusal(running, caller, exc) from exc
                response = await _respond(request, running, caller, result, observation, headers)
        _describe_result(request_span, observation)
        if observation.outcome != "ok":
            request_span.set_status(StatusCode.ERROR, f"the stream ended with an error ({observation.outcome})")
        return response


async def _read_json(request: web.Request, timeout_s: float) -> Any:
    try:  # bounded in size by the app's client_max_size (413), and in time against slow senders
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise RequestTimeoutError("The request body did not arrive in time.") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}") from None


def _refusal(running: Running, caller: Caller | None, error: Any) -> GatewayError:
    """vLLM's ErrorResponse, or an exception out of its layer (mapped as vLLM's server maps it), as the
    gateway's error: anything while the engine is dead is a 503, and a failure of vLLM's layer before
    the request reached the engine is the request's (a body vLLM's models let through but its code
    cannot handle, e.g. `structured_outputs: [null]`): a 400."""
    from vllm.entrypoints.serve import create_error_response

    if not running.engine.is_alive():
        return ServiceUnavailableError("The engine is not serving; it is being restarted.", retry_after_s=5)
    info = (create_error_response(error) if isinstance(error, Exception) else error).error
    if info.code >= 500 and (caller is None or caller.generations == 0):
        log.warning("vLLM's OpenAI layer failed on a request before the engine saw it: %s", info.message)
        return engine_request_error(400, f"This request could not be processed: {info.message}", info.param)
    return engine_request_error(info.code, info.message, info.param)


def _event_error_response(text: str) -> Any:
    """vLLM's error event as its ErrorResponse (a 500 where it cannot be read)."""
    from pydantic import ValidationError
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    try:
        return ErrorResponse.model_validate(_event_data(text))
    except ValidationError:
        return ErrorResponse.model_validate({"error": {"message": text, "type": "InternalServerError", "code": 500}})


async def _respond(
    request: web.Request,
    running: Running,
    caller: Caller,
    result: Any,
    observation: Observation,
    headers: dict[str, str],
) -> web.StreamResponse:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if isinstance(result, ErrorResponse):
        raise _refusal(running, caller, result)
    if isinstance(result, BaseModel):
        payload = result.model_dump(mode="json", by_alias=True)
        _describe_response_id(payload)
        return web.json_response(text=json.dumps(payload, ensure_ascii=False), headers=headers)
    return await _stream(request, running, caller, result, observation, headers)


async def _stream(
    request: web.Request,
    running: Running,
    caller: Caller,
    events: AsyncIterator[Any],
    observation: Observation,
    headers: dict[str, str],
) -> web.StreamResponse:
    """Relay vLLM's server-sent events; closing them early (client gone) aborts the generation."""
    async with contextlib.aclosing(events):
        try:  # before any byte is sent: an early failure is a plain error
            first = await anext(events, None)
        except Exception as exc:
            raise _refusal(running, caller, exc) from exc
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
        )
        await response.prepare(request)
        event = first
        if first is not None:
            _describe_response_id(_event_data(_sse(first)))
        while event is not None:
            text = _sse(event)
            if text.startswith('data: {"error"'):  # headers are gone: the error travels as an event
                error = _refusal(running, caller, _event_error_response(text))
                observation.outcome = outcome_of(error.status)
                text = f"data: {json.dumps(client_error_body(error, request))}\n\n"
            await response.write(text.encode())
            event = await anext(events, None)
    await response.write_eof()
    return response


def _sse(event: Any) -> str:
    """An event as vLLM's server sends it: completions and chat yield SSE text, Responses event objects."""
    if isinstance(event, str):
        return event
    return f"event: {getattr(event, 'type', 'unknown')}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"


def _event_data(text: str) -> dict[str, Any]:
    """The JSON of one SSE event (`event:` line optional); {} for anything else ([DONE])."""
    data = text[text.find("data: ") + len("data: ") :] if "data: " in text else ""
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _describe_response_id(payload: dict[str, Any]) -> None:
    """The id the client sees (Responses stream it inside `response`), on the request's span."""
    response_id = payload.get("id") or (payload.get("response") or {}).get("id")
    if isinstance(response_id, str):
        trace.get_current_span().set_attribute(gen_ai.GEN_AI_RESPONSE_ID, response_id)


def _describe_request(span: Span, operation: str, body: Any) -> None:
    attributes = {
        gen_ai.GEN_AI_OPERATION_NAME: operation,
        gen_ai.GEN_AI_REQUEST_MODEL: body.model,
        gen_ai.GEN_AI_RESPONSE_MODEL: body.model,  # responses name the model as requested
        gen_ai.GEN_AI_REQUEST_MAX_TOKENS: getattr(body, "max_tokens", None) or getattr(body, "max_output_tokens", None),
        gen_ai.GEN_AI_REQUEST_TEMPERATURE: getattr(body, "temperature", None),
        gen_ai.GEN_AI_REQUEST_TOP_P: getattr(body, "top_p", None),
    }
    span.set_attributes({key: value for key, value in attributes.items() if value is not None})


def _describe_result(span: Span, observation: Observation) -> None:
    span.set_attributes(
        {
            gen_ai.GEN_AI_USAGE_INPUT_TOKENS: observation.prompt_tokens,
            gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS: observation.output_tokens,
            gen_ai.GEN_AI_RESPONSE_FINISH_REASONS: observation.finish_reasons,
        }
    )
