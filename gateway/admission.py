"""Admission: which request enters the engine next, decided in one place, in three stages.

1. The caller's own limit (`UserLimiter`): a user has so many requests in progress and so many
   waiting, first come, first served within the user; beyond that a 429. It comes first, before
   the request costs anything (the adapter look-up, routing).
2. Engine seats (`EngineSeats`): the sequences in the engine, fair across callers: a freed seat goes
   to the waiting caller holding fewest, and one caller never holds them all; grouped by adapter, so
   the engine holds requests of no more adapters than a step runs (max_loras), with bounded aging.
3. The adapter's slot (`AdapterPool`): the adapter is resident, or loaded into a slot handed over in
   arrival order, with aging and per-caller shares.
Stages 2 and 3 refuse (503 + Retry-After) only when their queue is past what they can serve before
the request's deadline. Inside the engine, vLLM's scheduler batches the admitted requests, as many
distinct adapters a step as it has LoRA slots (max_loras).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from adapters_manifest.record import AdapterRecord
from gateway.engine_seats import EngineSeats
from gateway.fair_share import UserLimiter
from gateway.pool import AdapterPool, LoraActivity, SlotGrant


class Admission:
    def __init__(self, callers: UserLimiter, seats: EngineSeats | None, pool: AdapterPool) -> None:
        self.callers = callers
        self.seats = seats  # None: no gateway limit, vLLM's queue orders the sequences
        self.pool = pool

    def caller_turn(self, user: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Stage 1, held until the response ends."""
        return self.callers.admit(user)

    @asynccontextmanager
    async def enter_engine(self, record: AdapterRecord | None, user: str, sequences: int) -> AsyncIterator[SlotGrant]:
        """Stages 2 and 3: seats for the request's sequences, then its adapter's slot, held until the
        block exits; the grant says which adapter (None: the base model, where the engine needs none) and
        where it came from."""
        async with contextlib.AsyncExitStack() as held:
            if self.seats is not None:
                adapter = record.versioned_ref if record is not None else None
                await held.enter_async_context(self.seats.take(user, sequences, adapter))
            yield await held.enter_async_context(self.pool.take_slot(record, user))

    def lora_activity(self) -> LoraActivity:
        """Adapters with requests running or waiting, in the pool or for seats."""
        activity = self.pool.lora_activity()
        if self.seats is None:
            return activity
        return LoraActivity(running=activity.running, waiting=activity.waiting | self.seats.waiting_adapters())


def sequences_of(body: Any) -> int:
    """The sequences a request makes in the engine: `n` per prompt, and a completion may carry a batch
    of prompts (a list of strings or of token lists)."""
    n = getattr(body, "n", None) or 1
    prompt = getattr(body, "prompt", None)
    prompts = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else 1
    return max(1, n) * max(1, prompts)
