"""Waiting in tests without depending on the machine's speed: poll a condition up to a generous bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# The first fake engine of a test process builds vLLM's config and tokenizer: many seconds on a busy host.
ENGINE_START_TIMEOUT_S = 60.0


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)
