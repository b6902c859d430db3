"""vLLM's own OpenAI serving layer (completions, chat, Responses, tokenize), driven for one caller at a time.

The gateway resolves and holds the caller's adapter (auth -> catalog -> pool); vLLM's layer does the
rest exactly as `vllm serve` does: protocol, sampling fields, structured outputs, tool and reasoning
parsers, chat templates. Two seams connect them, both read from the request's `Caller` (a context
variable, so concurrent requests never see each other's): the model registry vLLM's layer asks
"which adapter is `model`?", which answers with the caller's held adapter only, and the engine client
it generates through, which traces and times every generation for the caller.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import propagate, trace

from gateway.telemetry import spans


@dataclass
class Caller:
    """What the request being served resolved to, and who hears about its generations."""

    model: str  # as the caller wrote it: responses name the model so
    lora: Any  # vLLM's LoRARequest of the held adapter; None: the base model, plain
    on_first_token: Callable[[], None] = lambda: None
    on_output: Callable[[Any], None] = lambda output: None  # each vLLM RequestOutput
    generations: int = field(default=0, init=False)


class _CallerLoRAs(Mapping[str, Any]):
    """vLLM's `lora_requests` table as one caller sees it: their own model name and held adapter only."""

    def __init__(self, caller: ContextVar[Caller]) -> None:
        self._caller = caller

    def _own(self) -> dict[str, Any]:
        caller = self._caller.get(None)
        return {} if caller is None or caller.lora is None else {caller.model: caller.lora}

    def __getitem__(self, name: str) -> Any:
        return self._own()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._own())

    def __len__(self) -> int:
        return len(self._own())


class CallerModels:
    """Stands in for vLLM's OpenAIServingModels: `model` is whatever the gateway resolved for the
    caller; vLLM never looks a name up itself (so it cannot find another tenant's adapter)."""

    def __init__(self, caller: ContextVar[Caller], base_model_paths: list[Any]) -> None:
        self._caller = caller
        self.base_model_paths = base_model_paths
        self.lora_requests = _CallerLoRAs(caller)

    def is_base_model(self, model_name: str | None) -> bool:
        caller = self._caller.get(None)
        return caller is not None and caller.lora is None and model_name == caller.model

    def model_name(self, lora_request: Any = None) -> str:
        return self._caller.get().model

    async def resolve_lora(self, lora_name: str) -> None:
        return None  # the catalog resolved it already; nothing else may


class CallerEngineClient:
    """vLLM's engine client as the OpenAI layer sees it: each generation gets an `engine.generate` span
    (whose context travels into vLLM's own spans), and the caller hears its first token and outputs."""

    def __init__(self, client: Any, caller: ContextVar[Caller], tracer: trace.Tracer, into_engine: bool) -> None:
        self._client = client
        self._caller = caller
        self._tracer = tracer
        self._into_engine = into_engine  # vLLM warns on every request with trace context while its tracing is off

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def generate(
        self, *args: Any, trace_headers: Mapping[str, str] | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        caller = self._caller.get()
        caller.generations += 1
        attributes = {} if caller.lora is None else {spans.ENGINE_ID: caller.lora.lora_int_id}
        # Not the current span: this generator yields to its caller, which must not run inside it.
        span = self._tracer.start_span(spans.GENERATE, attributes=attributes)
        headers: dict[str, str] = {}
        if self._into_engine:
            propagate.inject(headers, context=trace.set_span_in_context(span))
        first = True
        try:
            async for output in self._client.generate(*args, trace_headers=headers or None, **kwargs):
                if first:
                    first = False
                    span.add_event(spans.FIRST_TOKEN_EVENT)
                    caller.on_first_token()
                caller.on_output(output)
                yield output
        except BaseException as exc:
            spans.fail(span, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            span.end()


@dataclass
class OpenAILayer:
    """vLLM's serving objects, built by vLLM's own `init_app_state` from `vllm serve` arguments."""

    completion: Any
    chat: Any
    responses: Any
    tokenization: Any
    caller: ContextVar[Caller]

    @contextlib.contextmanager
    def serving(self, caller: Caller) -> Iterator[None]:
        """Run vLLM's layer for `caller` inside this block (a stream is consumed inside it too)."""
        token = self.caller.set(caller)
        try:
            yield
        finally:
            self.caller.reset(token)


async def build_openai_layer(client: Any, frontend_args: argparse.Namespace, tracer: trace.Tracer) -> OpenAILayer:
    from starlette.datastructures import State
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

    caller: ContextVar[Caller] = ContextVar("lora_gateway_caller")
    tracing = frontend_args.otlp_traces_endpoint is not None
    state = State()
    engine_client = CallerEngineClient(client, caller, tracer, into_engine=tracing)
    await init_app_state(engine_client, state, frontend_args, await client.get_supported_tasks())
    vllm_models = state.openai_serving_models
    models = CallerModels(caller, vllm_models.base_model_paths)
    for serving in vars(state)["_state"].values():  # every serving object vLLM built shares its registry
        if getattr(serving, "models", None) is vllm_models:
            serving.models = models
    return OpenAILayer(
        completion=state.openai_serving_completion,
        chat=state.openai_serving_chat,
        responses=state.openai_serving_responses,
        tokenization=state.serving_tokenization,
        caller=caller,
    )
