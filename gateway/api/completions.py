"""POST /v1/completions and /v1/chat/completions: resolve the adapter, hold it, generate."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway.api.formats import ChatFormat, ChoiceState, CompletionFormat, ResponseFormat
from gateway.api.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from gateway.app_keys import CATALOG, LIMITER, SERVING, SETTINGS
from gateway.auth.middleware import PRINCIPAL
from gateway.engine.interface import Engine, EngineAdapter, EngineDeadError, GenerationDelta, SamplingOptions
from gateway.errors import (
    ContextLengthExceededError,
    GatewayError,
    InvalidRequestError,
    RequestTimeoutError,
    ServiceUnavailableError,
    error_body,
)

TRACE_HEADERS = ("traceparent", "tracestate")


async def create_completion(request: web.Request) -> web.StreamResponse:
    body = parse_body(CompletionRequest, await _read_json(request))
    engine = request.app[SERVING].engine_or_raise()
    prompt_ids = engine.tokenize(body.prompt) if isinstance(body.prompt, str) else body.prompt
    max_tokens = _fit_context(engine, prompt_ids, body.max_tokens)
    return await _generate(
        request,
        body.model,
        prompt_ids,
        body.sampling_options(max_tokens),
        CompletionFormat(body.model, body.logprobs is not None, body.return_tokens_as_token_ids),
        stream=body.stream,
        include_usage=body.include_usage_chunk,
    )


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    body = parse_body(ChatCompletionRequest, await _read_json(request))
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
        stream=body.stream,
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
    *,
    stream: bool,
    include_usage: bool,
) -> web.StreamResponse:
    serving, principal = request.app[SERVING], request[PRINCIPAL]
    record = await request.app[CATALOG].resolve(model, principal)
    trace_headers = {h: request.headers[h] for h in TRACE_HEADERS if h in request.headers}
    async with request.app[LIMITER].admit(principal.user), serving.pool_or_raise().acquire(record) as adapter:
        deltas = _engine_deltas(serving.engine_or_raise(), prompt_ids, options, adapter, trace_headers)
        async with contextlib.aclosing(deltas):
            # The first delta comes before any byte is sent: an early failure is a plain error.
            first = await anext(deltas, None)
            if stream:
                return await _stream(request, fmt, first, deltas, len(prompt_ids), options.n, include_usage)
            choices = [ChoiceState(i) for i in range(options.n)]
            delta: GenerationDelta | None = first
            while delta is not None:
                for choice in delta.choices:
                    choices[choice.index].add(choice)
                delta = await anext(deltas, None)
            return web.json_response(fmt.whole(choices, len(prompt_ids)))


async def _engine_deltas(
    engine: Engine,
    prompt_ids: list[int],
    options: SamplingOptions,
    adapter: EngineAdapter | None,
    trace_headers: dict[str, str],
) -> AsyncIterator[GenerationDelta]:
    stream = engine.generate(uuid.uuid4().hex, prompt_ids, options, adapter, trace_headers)
    try:
        async for delta in stream:
            yield delta
    except EngineDeadError as exc:
        raise ServiceUnavailableError(f"The engine is not serving: {exc}", retry_after_s=5) from exc
    except ValueError as exc:  # the engine's own input checks (e.g. a token id outside the vocabulary)
        raise InvalidRequestError(str(exc)) from exc
    finally:
        await stream.aclose()


async def _stream(
    request: web.Request,
    fmt: ResponseFormat,
    first: GenerationDelta | None,
    deltas: AsyncIterator[GenerationDelta],
    prompt_tokens: int,
    n: int,
    include_usage: bool,
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    choices = [ChoiceState(i) for i in range(n)]

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
        await send(error_body(error.message, error.error_type, error.param, error.code))
    await send("[DONE]")
    await response.write_eof()
    return response
