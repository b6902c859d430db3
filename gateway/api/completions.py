"""POST /v1/completions and /v1/chat/completions: resolve the adapter, hold it, generate.

Observed on the way: the request's server span gets the gen_ai.* attributes (operation, models,
token usage, finish reasons) and the adapter's owner/name/version; the generation is an
`engine.generate` span with a `first_token` event, whose context travels into vLLM; request
counts, latency and time to first token go to /metrics (labels bounded: no adapter names).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.trace import Span, StatusCode

from adapters_manifest.record import AdapterRecord
from gateway.api.formats import ChatFormat, ChoiceState, CompletionFormat, ResponseFormat
from gateway.api.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from gateway.app_keys import CATALOG, LIMITER, METRICS, SERVING, SETTINGS, TRACER
from gateway.auth.middleware import PRINCIPAL
from gateway.engine.interface import Engine, EngineAdapter, EngineDeadError, GenerationDelta, SamplingOptions
from gateway.errors import (
    ContextLengthExceededError,
    GatewayError,
    InvalidRequestError,
    RequestTimeoutError,
    ServiceUnavailableError,
    error_body,
    known_error,
)
from gateway.telemetry import spans
from gateway.telemetry.instruments import GatewayMetrics, elapsed_since

TEXT_COMPLETION = gen_ai.GenAiOperationNameValues.TEXT_COMPLETION.value
CHAT = gen_ai.GenAiOperationNameValues.CHAT.value
BASE_SOURCE = "base"  # the adapter source of a base-model request

# Request outcomes by HTTP status (a metric label: a handful of values whatever the traffic).
OUTCOMES = {400: "invalid", 408: "invalid", 413: "invalid", 404: "not_found", 422: "adapter_failed"}
OUTCOMES |= {429: "rate_limited", 503: "unavailable"}


@dataclass
class Observation:
    """What the metrics of one completion request need, filled in as the request goes."""

    endpoint: str
    started: float
    stream: bool = False
    outcome: str = "ok"  # a stream that fails after its headers were sent sets its own
    adapter_source: str = BASE_SOURCE

    @property
    def stream_label(self) -> str:
        return "true" if self.stream else "false"


def outcome_of(status: int) -> str:
    return OUTCOMES.get(status, "invalid" if 400 <= status < 500 else "error")


async def _observed(
    request: web.Request,
    endpoint: str,
    handler: Callable[[web.Request, Observation], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    observation = Observation(endpoint, time.perf_counter())
    try:
        return await handler(request, observation)
    except asyncio.CancelledError:  # the client hung up
        observation.outcome = "cancelled"
        raise
    except Exception as exc:  # errors.py answers it: the outcome follows its status
        error = known_error(exc)
        observation.outcome = "error" if error is None else outcome_of(error.status)
        raise
    finally:
        metrics = request.app[METRICS]
        labels = (endpoint, observation.stream_label, observation.outcome)
        metrics.requests.labels(*labels).inc()
        metrics.request_seconds.labels(*labels).observe(elapsed_since(observation.started))


async def create_completion(request: web.Request) -> web.StreamResponse:
    return await _observed(request, "completions", _create_completion)


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    return await _observed(request, "chat_completions", _create_chat_completion)


async def _create_completion(request: web.Request, observation: Observation) -> web.StreamResponse:
    body = parse_body(CompletionRequest, await _read_json(request))
    observation.stream = body.stream
    engine = request.app[SERVING].engine_or_raise()
    prompt_ids = engine.tokenize(body.prompt) if isinstance(body.prompt, str) else body.prompt
    max_tokens = _fit_context(engine, prompt_ids, body.max_tokens)
    return await _generate(
        request,
        body.model,
        prompt_ids,
        body.sampling_options(max_tokens),
        CompletionFormat(body.model, body.logprobs is not None, body.return_tokens_as_token_ids),
        observation,
        operation=TEXT_COMPLETION,
        include_usage=body.include_usage_chunk,
    )


async def _create_chat_completion(request: web.Request, observation: Observation) -> web.StreamResponse:
    body = parse_body(ChatCompletionRequest, await _read_json(request))
    observation.stream = body.stream
    engine = request.app[SERVING].engine_or_raise()
    try:
        prompt_ids = engine.render_chat(body.template_messages())
    except Exception as exc:  # the model's template rejected the conversation
        raise InvalidRequestError(
            f"The chat template could not render these messages: {exc}", param="messages"
        ) from exc
    max_tokens = _fit_context(engine, prompt_ids, body.requested_max_tokens())
    return await _generate(
        request,
        body.model,
        prompt_ids,
        body.sampling_options(max_tokens),
        ChatFormat(body.model, body.logprobs, body.return_tokens_as_token_ids),
        observation,
        operation=CHAT,
        include_usage=body.include_usage_chunk,
    )


async def _read_json(request: web.Request) -> Any:
    try:  # bounded in size by the app's client_max_size (413), and in time against slow senders
        async with asyncio.timeout(request.app[SETTINGS].body_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise RequestTimeoutError("The request body did not arrive in time.") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}") from None


def _fit_context(engine: Engine, prompt_ids: list[int], max_tokens: int | None) -> int:
    """The completion budget; a prompt plus max_tokens beyond the context is a 400 naming the limit."""
    limit = engine.max_model_len
    if max_tokens is None:
        max_tokens = limit - len(prompt_ids)
    if len(prompt_ids) + max_tokens > limit or max_tokens < 1:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{len(prompt_ids) + max(max_tokens, 1)} tokens ({len(prompt_ids)} in the prompt, "
            f"{max(max_tokens, 1)} for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
        )
    return max_tokens


async def _generate(
    request: web.Request,
    model: str,
    prompt_ids: list[int],
    options: SamplingOptions,
    fmt: ResponseFormat,
    observation: Observation,
    *,
    operation: str,
    include_usage: bool,
) -> web.StreamResponse:
    serving, principal, metrics = request.app[SERVING], request[PRINCIPAL], request.app[METRICS]
    request_span = trace.get_current_span()  # the server span of this HTTP request
    _describe_request(request_span, operation, model, fmt.id, options)
    record = await request.app[CATALOG].resolve(model, principal)
    _describe_adapter(request_span, record)

    def heard(source: str) -> None:
        observation.adapter_source = source

    choices = [ChoiceState(i) for i in range(options.n)]
    async with contextlib.AsyncExitStack() as held:
        with metrics.waiting("fair_share"):
            await held.enter_async_context(request.app[LIMITER].admit(principal.user))
        adapter = await held.enter_async_context(serving.pool_or_raise().acquire(record, on_outcome=heard))
        deltas = _engine_deltas(
            request.app[TRACER], metrics, serving.engine_or_raise(), prompt_ids, options, adapter, observation
        )
        async with contextlib.aclosing(deltas):
            # The first delta comes before any byte is sent: an early failure is a plain error.
            first = await anext(deltas, None)
            if observation.stream:
                response = await _stream(
                    request, fmt, first, deltas, choices, len(prompt_ids), include_usage, observation
                )
            else:
                delta: GenerationDelta | None = first
                while delta is not None:
                    for choice in delta.choices:
                        choices[choice.index].add(choice)
                    delta = await anext(deltas, None)
                response = web.json_response(fmt.whole(choices, len(prompt_ids)))
    _describe_result(request_span, len(prompt_ids), choices)
    if observation.outcome != "ok":
        request_span.set_status(StatusCode.ERROR, f"the stream ended with an error ({observation.outcome})")
    return response


def _describe_request(span: Span, operation: str, model: str, response_id: str, options: SamplingOptions) -> None:
    span.set_attributes(
        {
            gen_ai.GEN_AI_OPERATION_NAME: operation,
            gen_ai.GEN_AI_REQUEST_MODEL: model,
            gen_ai.GEN_AI_RESPONSE_MODEL: model,  # responses name the model as requested
            gen_ai.GEN_AI_RESPONSE_ID: response_id,
            gen_ai.GEN_AI_REQUEST_MAX_TOKENS: options.max_tokens,
            gen_ai.GEN_AI_REQUEST_TEMPERATURE: options.temperature,
            gen_ai.GEN_AI_REQUEST_TOP_P: options.top_p,
        }
    )


def _describe_adapter(span: Span, record: AdapterRecord | None) -> None:
    if record is not None:
        span.set_attributes(spans.adapter_attributes(record))


def _describe_result(span: Span, prompt_tokens: int, choices: list[ChoiceState]) -> None:
    span.set_attributes(
        {
            gen_ai.GEN_AI_USAGE_INPUT_TOKENS: prompt_tokens,
            gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS: sum(c.token_count for c in choices),
            gen_ai.GEN_AI_RESPONSE_FINISH_REASONS: [c.finish_reason or "" for c in choices],
        }
    )


async def _engine_deltas(
    tracer: trace.Tracer,
    metrics: GatewayMetrics,
    engine: Engine,
    prompt_ids: list[int],
    options: SamplingOptions,
    adapter: EngineAdapter | None,
    observation: Observation,
) -> AsyncIterator[GenerationDelta]:
    # Not the current span: this generator yields to its caller, which must not run inside it.
    span = tracer.start_span(spans.GENERATE, attributes={spans.ENGINE_ID: adapter.engine_id} if adapter else {})
    trace_headers: dict[str, str] = {}
    propagate.inject(trace_headers, context=trace.set_span_in_context(span))  # vLLM's spans join this trace
    stream = engine.generate(uuid.uuid4().hex, prompt_ids, options, adapter, trace_headers)
    first = True
    try:
        async for delta in stream:
            if first:
                first = False
                span.add_event(spans.FIRST_TOKEN_EVENT)
                metrics.time_to_first_token.labels(
                    observation.endpoint, observation.stream_label, observation.adapter_source
                ).observe(elapsed_since(observation.started))
            yield delta
    except EngineDeadError as exc:
        spans.fail(span, f"EngineDeadError: {exc}")
        raise ServiceUnavailableError(f"The engine is not serving: {exc}", retry_after_s=5) from exc
    except ValueError as exc:  # the engine's own input checks (e.g. a token id outside the vocabulary)
        spans.fail(span, f"refused by the engine: {exc}")
        raise InvalidRequestError(str(exc)) from exc
    finally:
        await stream.aclose()
        span.end()


async def _stream(
    request: web.Request,
    fmt: ResponseFormat,
    first: GenerationDelta | None,
    deltas: AsyncIterator[GenerationDelta],
    choices: list[ChoiceState],
    prompt_tokens: int,
    include_usage: bool,
    observation: Observation,
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(payload: dict[str, Any] | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        await response.write(f"data: {data}\n\n".encode())

    try:
        delta = first
        while delta is not None:
            for choice in delta.choices:
                offset = choices[choice.index].add(choice)
                for chunk_choice in fmt.stream_choices(choices[choice.index], choice, offset):
                    await send(fmt.chunk(chunk_choice))
            delta = await anext(deltas, None)
        if include_usage:
            await send(fmt.usage_chunk(choices, prompt_tokens))
    except GatewayError as error:  # headers are gone: the error travels as an event
        observation.outcome = outcome_of(error.status)
        await send(error_body(error.message, error.error_type, error.param, error.code))
    await send("[DONE]")
    await response.write_eof()
    return response
