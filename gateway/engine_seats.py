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
- grouped by adapter: vLLM runs the requests of at most `adapters_per_step` distinct adapters a step
  (max_loras) and leaves the rest idle in its queue, holding seats. So while that many adapters hold
  seats, a seat goes to a caller's first request for one of them (or for the base model); a request
  for another adapter enters when one of them has drained, unless its caller has none inside (one
  caller's adapters never shut another out: the adapter pool's per-caller slot shares decide then).
  Bounded aging: once a caller's first request has been passed by `max_passes` later requests
  (default: `adapters_per_step`), the adapter inside holding fewest seats among those of the callers
  holding most adapters takes no more, and it enters when that one has drained, or at once where more
  adapters than a step runs are inside already (callers with none inside went in: vLLM orders them);
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

from gateway.errors import AdapterCapacityError, EngineCapacityError
from gateway.metrics import GatewayMetrics, detached_metrics
from gateway.service_rate import ServiceRate, retry_after_s
from gateway.telemetry import spans


@dataclass
class _SeatWaiter:
    user: str
    seats: int
    adapter: str | None  # the engine's name for its adapter; None: the base model, which takes no LoRA slot
    order: int  # arrival order, across callers
    granted: asyncio.Future[None]
    passes: int = 0  # later requests that got seats while it could not enter


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
        adapters_per_step: int | None = None,
        max_passes: int | None = None,
    ) -> None:
        if seats < 1:
            raise ValueError("seats must be at least 1")
        self.seats = seats
        self.max_per_user = min(seats, max_per_user or default_seats_per_user(seats))
        self.adapters_per_step = adapters_per_step  # None: no grouping
        self.max_passes = (adapters_per_step or 0) if max_passes is None else max_passes
        self._wait_timeout_s = wait_timeout_s
        self._metrics = metrics or detached_metrics()
        self._held: Counter[str] = Counter()  # seats per caller (no zero counts)
        self._inside: dict[str, Counter[str]] = {}  # per adapter inside (not the base), its seats per caller
        self._places: Counter[str] = Counter()  # adapters inside per caller (no zero counts)
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

    def adapters_inside(self) -> set[str]:
        return set(self._inside)

    def waiting_adapters(self) -> frozenset[str]:
        """Refs (`owner/name`) of the adapters that requests wait in this queue for."""
        return frozenset(w.adapter.partition("@")[0] for q in self._waiting.values() for w in q if w.adapter)

    def queued(self) -> int:
        return self._queued

    @asynccontextmanager
    async def take(self, user: str, sequences: int, adapter: str | None = None) -> AsyncIterator[None]:
        """Hold `sequences` seats (at most a caller's share) for `user`'s request on `adapter` (None: the
        base model) until the block exits."""
        seats = max(1, min(sequences, self.max_per_user))
        span = trace.get_current_span()
        span.set_attributes({spans.SEATS_TAKEN: seats, spans.SEATS_QUEUE_POSITION: 0, spans.SEATS_WAIT: 0.0})
        if not self._queued and self._fits(user, seats) and self._runs_now(user, adapter):
            self._hold(user, seats, adapter)
        else:
            await self._wait(user, seats, adapter, span)
        try:
            yield
        finally:
            self._release(user, seats, adapter)

    def _fits(self, user: str, seats: int) -> bool:
        return self._room_for(seats) and self._within_share(user, seats)

    def _runs_now(self, user: str, adapter: str | None, draining: str | None = None) -> bool:
        """Whether `user`'s request on `adapter` may enter as far as the adapters of a step go: vLLM would
        run it at its next step (`draining` takes no more requests), or the user has no adapter inside
        (then the adapter pool's shares of the slots decide, as for one request of each user)."""
        return (
            adapter is None
            or self.adapters_per_step is None
            or (adapter in self._inside and adapter != draining)
            or len(self._inside) < self.adapters_per_step
            or not self._places[user]
        )

    def _room_for(self, seats: int) -> bool:
        return self._in_use + seats <= self.seats

    def _within_share(self, user: str, seats: int) -> bool:
        return self._held[user] + seats <= self.max_per_user

    async def _wait(self, user: str, seats: int, adapter: str | None, span: Span) -> None:
        arrived = time.monotonic()
        waiter = _SeatWaiter(user, seats, adapter, next(self._order), asyncio.get_running_loop().create_future())
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
            # Counted by what held it back as it queued: seats, or a place for its adapter in the engine's step.
            with self._metrics.waiting("adapter_slot" if self._held_back(user, seats, adapter) else "engine_seat"):
                async with asyncio.timeout(self._wait_timeout_s):
                    await asyncio.shield(waiter.granted)
        except BaseException as exc:
            if waiter.granted.done():
                self._release(user, seats, adapter)  # granted just as it gave up
            else:
                waiter.granted.cancel()
                self._remove(waiter)
                self._dispatch()  # a smaller request behind it may fit now
            if isinstance(exc, TimeoutError):
                if self._held_back(user, seats, adapter):
                    raise self._adapters_busy(adapter) from None
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

    def _held_back(self, user: str, seats: int, adapter: str | None) -> bool:
        """Seats are free for the request, but not a place for its adapter."""
        return adapter is not None and self._room_for(seats) and not self._runs_now(user, adapter)

    def _adapters_busy(self, adapter: str) -> AdapterCapacityError:
        """Seats were free, but the engine's adapter places a step were all taken by busy adapters."""
        self._metrics.admission_refusals.labels("adapter_slot", "timeout").inc()
        return AdapterCapacityError(
            f"All {self.adapters_per_step} adapter slots are busy and '{adapter.partition('@')[0]}' could not be "
            f"loaded: it waited {self._wait_timeout_s:g} s. Retry shortly.",
            retry_after_s=retry_after_s(self._wait_timeout_s),
        )

    def _dispatch(self) -> None:
        """Hand free seats out: the caller holding fewest first, the first in line among equals; within a
        caller, its first request that vLLM would run now."""
        while self._waiting:
            draining = self._draining()
            turns = [self._turn_of(queue, draining) for queue in self._waiting.values()]
            turns = [(w, i) for w, i in filter(None, turns) if self._within_share(w.user, w.seats)]
            if not turns:
                return  # every waiting caller is at its share, or waits for an adapter inside to drain
            first, position = min(turns, key=lambda turn: (self._held[turn[0].user], turn[0].order))
            if not self._room_for(first.seats):
                return  # the next in turn waits for more seats; nobody passes it (it would starve)
            self._count_passes(first, position, draining)
            self._remove(first)
            self._hold(first.user, first.seats, first.adapter)
            self._rate.served()
            first.granted.set_result(None)

    def _turn_of(self, queue: deque[_SeatWaiter], draining: str | None) -> tuple[_SeatWaiter, int] | None:
        """A caller's request next in turn, and its place in the caller's queue: its first, if aged while more
        adapters than a step runs are inside, else its first that vLLM would run now (None: none)."""
        if self._aged(queue[0]) and len(self._inside) > (self.adapters_per_step or 0):
            return queue[0], 0
        return next(((w, i) for i, w in enumerate(queue) if self._runs_now(w.user, w.adapter, draining)), None)

    def _aged(self, waiter: _SeatWaiter) -> bool:
        return waiter.passes >= self.max_passes

    def _count_passes(self, entering: _SeatWaiter, position: int, draining: str | None) -> None:
        """`entering` passes its caller's requests ahead of it, and other callers' first requests that
        arrived before it and could not enter."""
        for passed in itertools.islice(self._waiting[entering.user], position):
            passed.passes += 1
        for queue in self._waiting.values():
            head = queue[0]
            if (
                head.user != entering.user
                and head.order < entering.order
                and not self._runs_now(head.user, head.adapter, draining)
            ):
                head.passes += 1

    def _draining(self) -> str | None:
        """The adapter inside that takes no more requests, so that an aged request's adapter can enter
        (None: none has aged): the one holding fewest seats among those of the callers holding most
        adapters inside."""
        if not any(self._aged(q[0]) and not self._runs_now(q[0].user, q[0].adapter) for q in self._waiting.values()):
            return None
        return min(
            self._inside, key=lambda a: (-max(map(self._places.__getitem__, self._inside[a])), self._inside[a].total())
        )

    def _remove(self, waiter: _SeatWaiter) -> None:
        queue = self._waiting[waiter.user]
        queue.remove(waiter)
        if not queue:
            del self._waiting[waiter.user]
        self._queue_changed(-1)

    def _queue_changed(self, change: int) -> None:
        self._queued += change
        self._rate.queue_changed(self._queued)

    def _hold(self, user: str, seats: int, adapter: str | None) -> None:
        self._held[user] += seats
        self._in_use += seats
        if adapter is not None:
            callers = self._inside.setdefault(adapter, Counter())
            if not callers[user]:
                self._places[user] += 1
            callers[user] += seats

    def _release(self, user: str, seats: int, adapter: str | None) -> None:
        self._held[user] -= seats
        self._in_use -= seats
        if self._held[user] <= 0:
            del self._held[user]
        if adapter is not None:
            callers = self._inside[adapter]
            callers[user] -= seats
            if callers[user] <= 0:
                del callers[user]
                self._places[user] -= 1
                if not self._places[user]:
                    del self._places[user]
            if not callers:
                del self._inside[adapter]
        self._dispatch()
