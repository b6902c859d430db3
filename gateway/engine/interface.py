"""What the gateway needs from an inference engine, in the gateway's own types.

The real implementation wraps vLLM's AsyncLLM (`vllm_engine.py`); unit tests use a fake.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top-k alternatives per generated token
    incremental: bool = True  # deltas as tokens come (streaming), or one final output (cheaper)


@dataclass(frozen=True)
class EngineAdapter:
    """An adapter as the engine knows it: a unique id, a unique name and its files."""

    engine_id: int
    engine_name: str
    path: Path


@dataclass(frozen=True)
class Alternative:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token, its log-probability, and the most likely tokens at its position."""

    token_id: int
    token: str
    logprob: float
    top: list[Alternative]


@dataclass(frozen=True)
class ChoiceDelta:
    """What one of the n choices produced since the last delta."""

    index: int
    text: str
    token_count: int
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass(frozen=True)
class GenerationDelta:
    prompt_tokens: int
    choices: list[ChoiceDelta]


class EngineDeadError(Exception):
    """The engine stopped working; the process must be restarted."""


class AdapterLoadError(Exception):
    """The engine refused to load an adapter (it serves on)."""


class Engine(Protocol):
    max_model_len: int
    # Whether base-model requests must carry the gateway's all-zero adapter to get exactly the base
    # model in a batch with adapter requests, and a sentence on how they run (the log, /readyz).
    base_via_zero_adapter: bool
    base_requests: str

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a completion prompt (with the model's BOS handling)."""

    def render_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        adapter: EngineAdapter | None,
        trace_headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[GenerationDelta]:
        """Stream deltas; closing the iterator early aborts the request. ValueError: the engine
        refuses the request itself (e.g. a token id outside the vocabulary). `trace_headers`: the
        W3C context (traceparent) of the gateway's `engine.generate` span, for the engine's own spans."""

    async def add_adapter(self, adapter: EngineAdapter) -> None:
        """Load an adapter into the engine's CPU cache; AdapterLoadError when it cannot."""

    async def remove_adapter(self, adapter: EngineAdapter) -> None:
        """Free the engine's copy of an adapter."""

    def is_alive(self) -> bool:
        """False once the engine has died."""

    def shutdown(self) -> None:
        """Stop the engine and its processes."""
