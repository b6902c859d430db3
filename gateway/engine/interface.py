"""What the gateway needs from an inference engine, in the gateway's own types.

The real implementation is vLLM's AsyncLLM (`vllm_engine.py`); unit tests use a fake engine client
under vLLM's real OpenAI layer.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class EngineAdapter:
    """An adapter as the engine knows it: a unique id, a unique name and its files."""

    engine_id: int
    engine_name: str
    path: Path


class EngineDeadError(Exception):
    """The engine stopped working; the process must be restarted."""


class AdapterLoadError(Exception):
    """The engine refused to load an adapter (it serves on)."""


class Engine(Protocol):
    # What vLLM's OpenAI serving layer drives (vLLM's EngineClient), and the `vllm serve` arguments
    # that configure that layer (chat template, tool and reasoning parsers).
    client: Any
    frontend_args: argparse.Namespace
    max_model_len: int
    # Whether base-model requests must carry the gateway's all-zero adapter to get exactly the base
    # model in a batch with adapter requests, and a sentence on how they run (the log, /readyz).
    base_via_zero_adapter: bool
    base_requests: str

    async def add_adapter(self, adapter: EngineAdapter) -> None:
        """Load an adapter into the engine's CPU cache; AdapterLoadError when it cannot."""

    async def remove_adapter(self, adapter: EngineAdapter) -> None:
        """Free the engine's copy of an adapter."""

    def is_alive(self) -> bool:
        """False once the engine has died."""

    def shutdown(self) -> None:
        """Stop the engine and its processes."""
