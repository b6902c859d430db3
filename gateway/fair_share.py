"""Per-user admission, so one user's flood cannot starve the others.

Each user may have `max_running` requests generating and `max_queued` more waiting (first come,
first served within the user); beyond that, or after waiting `queue_timeout_s`, a 429 with
Retry-After. The engine batches the admitted requests of all users together, so a user under
their limit never queues behind another user's backlog.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from gateway.errors import RateLimitError


@dataclass
class _UserState:
    running: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)


class UserLimiter:
    def __init__(self, max_running: int, max_queued: int, queue_timeout_s: float) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self._users: dict[str, _UserState] = {}

    def running(self, user: str) -> int:
        state = self._users.get(user)
        return 0 if state is None else state.running

    @asynccontextmanager
    async def admit(self, user: str) -> AsyncIterator[None]:
        state = self._users.setdefault(user, _UserState())
        if state.running < self.max_running and not state.waiting:
            state.running += 1
        else:
            await self._wait_for_turn(user, state)
        try:
            yield
        finally:
            self._release(user, state)

    async def _wait_for_turn(self, user: str, state: _UserState) -> None:
        if len(state.waiting) >= self.max_queued:
            raise RateLimitError(
                f"Too many requests for user '{user}': {self.max_running} running and {self.max_queued} "
                "waiting. Retry shortly.",
                retry_after_s=1,
            )
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.waiting.append(turn)
        try:
            # Not asyncio.wait_for: before Python 3.12 it swallows a cancellation that arrives as
            # the turn is handed over, and the request of a client that is gone would run anyway.
            async with asyncio.timeout(self.queue_timeout_s):
                await asyncio.shield(turn)
        except BaseException as exc:
            if turn.done() and not turn.cancelled():
                self._release(user, state)  # the slot was handed over just as we gave up
            else:
                turn.cancel()
                state.waiting.remove(turn)
                self._drop_if_idle(user, state)
            if isinstance(exc, TimeoutError):
                raise RateLimitError(
                    f"Request for user '{user}' waited {self.queue_timeout_s:.0f} s for one of its "
                    f"{self.max_running} running slots. Retry shortly.",
                    retry_after_s=1,
                ) from None
            raise

    def _release(self, user: str, state: _UserState) -> None:
        # Hand the slot straight to the user's next waiter: `running` stays the same.
        while state.waiting:
            turn = state.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        state.running -= 1
        self._drop_if_idle(user, state)

    def _drop_if_idle(self, user: str, state: _UserState) -> None:
        if state.running == 0 and not state.waiting:
            self._users.pop(user, None)  # thousands of users: keep only the active ones
