"""EngineSeats: the sequences in the engine, handed out fairly across callers.

vLLM runs at most `max_num_seqs` sequences a step and queues the rest first come, first served, so
a few heavy callers in its queue would make a newcomer wait behind all of them. The gateway keeps the
engine's sequences within its seats and queues the rest itself:
- a request takes as many seats as it makes sequences (`n`, times the prompts of a batch), and holds
  them until its response ends;
- one caller holds at most `max_per_user` seats (default: all but an eighth), so there is always room
  for another caller to start at once;
- a freed seat goes to the waiting caller with the fewest seats held (first in line among equals),
  first come, first served within a caller;
- a request waits up to `wait_timeout_s`, and is refused at once (503 + Retry-After) when the queue
  ahead of it is longer than the seats can serve in that time, measured as they serve it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.trace import Span

from gateway.errors import EngineCapacityError
from gateway.metrics import GatewayMetrics, detached_metrics
from gateway.service_rate import ServiceRate, retry_after_s
from gateway.telemetry import spans


@dataclass
class _SeatWaiter:
    user: str
    seats: int
    order: int  # arrival order, across callers
    granted: asyncio.Future[None]


def default_seats_per_user(seats: int) -> int:
    """All seats but an eighth (at least one kept for others, where there are two)."""
    return max(1, seats - max(1, seats // 8))


class EngineSeats:
    def __init__(
        self,
        seats: int,
        wait_timeout_s: float,
        max_per_user: int | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        if seats < 1:
            raise ValueError("seats must be at least 1")
        self.seats = seats
        self.max_per_user = min(seats, max_per_user or default_seats_per_user(seats))
        self._wait_timeout_s = wait_timeout_s
        self._metrics = metrics or detached_metrics()
        self._held: Counter[str] = Counter()  # seats per caller (no zero counts)
        self._in_use = 0  # their sum
        self._waiting: dict[str, deque[_SeatWaiter]] = {}  # per caller, in arrival order
        self._queued = 0  # waiters in all
        self._order = itertools.count()
        self._rate = ServiceRate()

    @property
    def in_use(self) -> int:
        return self._in_use

    def held_by(self, user: str) -> int:
        return self._held[user]

    def queued(self) -> int:
        return self._queued

    @asynccontextmanager
    async def take(self, user: str, sequences: int) -> AsyncIterator[None]:
        """Hold `sequences` seats (at most a caller's share) for `user` until the block exits."""
        seats = max(1, min(sequences, self.max_per_user))
        span = trace.get_current_span()
        span.set_attributes({spans.SEATS_TAKEN: seats, spans.SEATS_QUEUE_POSITION: 0, spans.SEATS_WAIT: 0.0})
        if not self._queued and self._fits(user, seats):
            self._hold(user, seats)
        else:
            await self._wait(user, seats, span)
        try:
            yield
        finally:
            self._release(user, seats)

    def _fits(self, user: str, seats: int) -> bool:
        return self._room_for(seats) and self._within_share(user, seats)

    def _room_for(self, seats: int) -> bool:
        return self._in_use + seats <= self.seats

    def _within_share(self, user: str, seats: int) -> bool:
        return self._held[user] + seats <= self.max_per_user

    async def _wait(self, user: str, seats: int, span: Span) -> None:
        arrived = time.monotonic()
        waiter = _SeatWaiter(user, seats, next(self._order), asyncio.get_running_loop().create_future())
        self._waiting.setdefault(user, deque()).append(waiter)
        self._queue_changed(+1)
        self._dispatch()
        if waiter.granted.done():
            return
        ahead = self._ahead_of(waiter)
        span.set_attribute(spans.SEATS_QUEUE_POSITION, ahead + 1)
        estimate = self._rate.wait_s(ahead)
        if estimate is not None and estimate > self._wait_timeout_s:
            self._remove(waiter)
            self._dispatch()  # it may have been first in turn, holding back a smaller request
            raise self._busy("estimate", f"{ahead} requests wait ahead of this one", estimate)
        try:
            with self._metrics.waiting("engine_seat"):
                async with asyncio.timeout(self._wait_timeout_s):
                    await asyncio.shield(waiter.granted)
        except BaseException as exc:
            if waiter.granted.done():
                self._release(user, seats)  # granted just as it gave up
            else:
                waiter.granted.cancel()
                self._remove(waiter)
                self._dispatch()  # a smaller request behind it may fit now
            if isinstance(exc, TimeoutError):
                why = f"this request waited {self._wait_timeout_s:g} s"
                raise self._busy("timeout", why, self._wait_timeout_s) from None
            raise
        finally:
            waited = time.monotonic() - arrived
            span.set_attribute(spans.SEATS_WAIT, waited)
            self._metrics.engine_seat_wait_seconds.observe(waited)

    def _ahead_of(self, waiter: _SeatWaiter) -> int:
        """Waiters served before this one as things stand: its caller's earlier ones, and those of
        callers holding no more seats than its caller."""
        held = self._held[waiter.user]
        mine = self._waiting[waiter.user]
        others = sum(len(q) for user, q in self._waiting.items() if user != waiter.user and self._held[user] <= held)
        return len(mine) - 1 + others

    def _busy(self, reason: str, why: str, wait_s: float) -> EngineCapacityError:
        self._metrics.admission_refusals.labels("engine_seat", reason).inc()
        return EngineCapacityError(
            f"The engine is at capacity ({self.seats} sequences) and {why}. Retry shortly.",
            retry_after_s=retry_after_s(wait_s),
        )

    def _dispatch(self) -> None:
        """Hand free seats out: the caller holding fewest first, the first in line among equals."""
        while self._waiting:
            heads = [queue[0] for queue in self._waiting.values()]
            heads = [w for w in heads if self._within_share(w.user, w.seats)]
            if not heads:
                return  # every waiting caller is at its share: its own requests must end first
            first = min(heads, key=lambda w: (self._held[w.user], w.order))
            if not self._room_for(first.seats):
                return  # the next in turn waits for more seats; nobody passes it (it would starve)
            self._remove(first)
            self._hold(first.user, first.seats)
            self._rate.served()
            first.granted.set_result(None)

    def _remove(self, waiter: _SeatWaiter) -> None:
        queue = self._waiting[waiter.user]
        queue.remove(waiter)
        if not queue:
            del self._waiting[waiter.user]
        self._queue_changed(-1)

    def _queue_changed(self, change: int) -> None:
        self._queued += change
        self._rate.queue_changed(self._queued)

    def _hold(self, user: str, seats: int) -> None:
        self._held[user] += seats
        self._in_use += seats

    def _release(self, user: str, seats: int) -> None:
        self._held[user] -= seats
        self._in_use -= seats
        if self._held[user] <= 0:
            del self._held[user]
        self._dispatch()
