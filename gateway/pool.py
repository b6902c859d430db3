"""AdapterPool: which adapters are resident in the engine, owned by the gateway.

The gateway mirrors the engine's CPU adapter cache exactly (it never asks for more than
`capacity`), so it knows every load and eviction. Guarantees:
- an adapter is registered (`add_adapter`) before any request generates with it;
- concurrent first requests for one version share one registration (single flight);
- only idle adapters (no request holding them) are evicted, least recently used first;
- a request holds its adapter until its response ends, however it ends;
- when every slot is busy a request queues for one up to `wait_timeout_s`, then AdapterCapacityError.

Slots are handed over, not raced for (no starvation): a request whose adapter is not resident
queues behind those already waiting, and every slot that frees (an adapter idle, or removed) goes
to the oldest waiter that can take it. Requests for a resident adapter join it at once, so hot
adapters stay resident, until a waiter has queued for `slot_aging_s`: then, for each such waiter,
one resident adapter (fewest requests in flight, least recently used among equals) drains: its
newcomers queue too, it becomes idle when its requests end, and the oldest waiter gets its slot
(the newcomers get it back later, in their turn). Whatever keeps arriving, a waiter first in line
is thus served once it has waited `slot_aging_s` and the requests then in flight on one adapter
have ended; those behind it, as many at once as there are slots.

Tenants (the callers, not the adapters' owners: a public adapter serves many) share the slots:
an adapter held only by one caller's requests is that caller's. A caller holding
`max_slots_per_user` of them (default: all slots but one) at its share: its requests for another
adapter let other callers' waiters go first, and while other callers wait they make no adapter
drain. The share orders, it never idles the engine: a slot that no one below their share can
take goes to the oldest waiter past its share (a caller alone may use every slot). Two limits keep
such a caller off the others' slots: an adapter that a caller below its share used last stays theirs
for a moment after its request ends (`MAX_SHARE_GRACE_S`, or the aging bound when shorter), so that
their next request finds it resident; and waiters past their share drain only adapters held by
callers past theirs, their own among them.

The queue is bounded (`max_queued`) and each waiter has a deadline (`wait_timeout_s`): a request that
finds the queue full, or longer than the slots can serve before its deadline (measured as they serve
it), is refused at once (AdapterCapacityError, Retry-After the estimated wait) rather than at the end.

Warm adapters (the record's flag, `keep_warm` after each sync) are pinned: loaded before anyone asks,
never evicted or drained while warm, in at most `warm_slots` slots (one at least stays unpinned).

Also:
- a version that fails to load fails fast for `failure_ttl_s`, and the engine serves on;
- a retired version (superseded or deleted) leaves the engine when its last request ends.
The files come from the disk tier (`AdapterFiles`), pinned while the engine holds them. The single
flight, holder counts, retirement and LRU order are `RefcountedLRU`'s; the scheduling is this module's.

Each acquire is an `adapter.acquire` span (outcome resident, disk, store or failed; the queue
position it got and the seconds it waited for a slot, 0 when it did not queue); a load runs
in a task of its own, started in the context of the request that triggered it, so its
`adapter.evict`, `adapter.fetch`, `adapter.verify` and `adapter.register` spans are children of
that request's acquire. Requests that join a load in flight get their own acquire span, linked
to the load's.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from opentelemetry import trace
from opentelemetry.trace import Span, SpanContext, Tracer

from adapters_manifest.record import AdapterRecord
from adapters_manifest.store import StoreUnavailableError
from adapters_manifest.validation import AdapterValidationError
from gateway.engine.interface import AdapterLoadError, Engine, EngineAdapter, EngineDeadError
from gateway.errors import (
    STORE_UNREACHABLE,
    AdapterCapacityError,
    AdapterLoadFailedError,
    ServiceUnavailableError,
    describe,
    redact_paths,
)
from gateway.metrics import TIER_ENGINE, GatewayMetrics, detached_metrics, elapsed_since
from gateway.refcounted_lru import EntryState, LruEntry, RefcountedLRU
from gateway.service_rate import ServiceRate, retry_after_s
from gateway.telemetry import spans

log = logging.getLogger(__name__)

# How long an adapter a caller below its share just used stays out of reach of callers past theirs
# (at most; the aging bound when shorter): a tenant's back-to-back requests keep their slot.
MAX_SHARE_GRACE_S = 1.0


class AdapterFiles(Protocol):
    """The tier below: a version's files on local disk, kept while pinned."""

    async def pin(self, record: AdapterRecord) -> Path: ...

    def unpin(self, record: AdapterRecord) -> None: ...

    def is_cached(self, record: AdapterRecord) -> bool:
        """Whether this version is on local disk already (a load from it skips the store)."""


@dataclass(kw_only=True)
class _Entry(LruEntry):  # keyed by the version's engine name
    record: AdapterRecord
    adapter: EngineAdapter
    source: str = spans.STORE  # where the load found the files: disk, or the store (fetched first)
    load_span: SpanContext | None = None  # the acquire span of the request that started the load
    users: Counter[str | None] = field(default_factory=Counter)  # holders by caller (no zero counts)
    draining: bool = False  # makes room for a waiter past the aging bound: newcomers queue
    pinned: bool = False  # a warm adapter: never evicted, never drained, while it stays warm
    released_at: float = -math.inf  # time.monotonic() when its last request ended
    last_user: str | None = None  # the caller whose request ended last


@dataclass
class _Waiter:
    """A request queued for an engine slot (or for its draining adapter to be loaded again)."""

    record: AdapterRecord
    user: str | None
    arrived: float  # time.monotonic()
    context: contextvars.Context  # the request's (its acquire span current): a load started for it runs in it
    granted: asyncio.Future[tuple[_Entry, bool]]  # the entry, held for it; whether it was loaded then


@dataclass(frozen=True)
class SlotGrant:
    """What taking a slot did for a request."""

    adapter: EngineAdapter | None  # held until the block exits (None: the base model, with no adapter)
    source: str | None  # where it came from: resident, disk or store (the acquire outcome); None: the base model


@dataclass(frozen=True)
class ResidentAdapter:
    name: str
    holders: int
    loaded: bool
    pinned: bool  # warm: kept in the engine


@dataclass(frozen=True)
class QueuedRequest:
    name: str  # the version's engine name, owner/name@version
    user: str | None  # the caller


@dataclass(frozen=True)
class LoraActivity:
    """Adapter refs (`owner/name`, as clients name them) with requests in flight, by state."""

    running: frozenset[str]  # held by a request and registered: generating, or queued in the engine
    waiting: frozenset[str]  # requests waiting for a free slot, or for the adapter's load


class AdapterPool:
    def __init__(
        self,
        engine: Engine,
        files: AdapterFiles,
        capacity: int,
        wait_timeout_s: float = 30.0,
        failure_ttl_s: float = 60.0,
        slot_aging_s: float = 1.0,
        max_slots_per_user: int | None = None,
        max_queued: int = 1024,
        warm_slots: int = 0,
        validate: Callable[[Path], None] | None = None,
        tracer: Tracer | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._engine = engine
        self._files = files
        self._validate = validate  # run on the local files before the engine sees them
        self._capacity = capacity
        self._wait_timeout_s = wait_timeout_s
        self._failure_ttl_s = failure_ttl_s
        self._slot_aging_s = slot_aging_s
        self._max_slots_per_user = max_slots_per_user or default_slots_per_user(capacity)
        self._max_queued = max_queued
        self._warm_slots = min(warm_slots, capacity - 1)  # one slot at least is never pinned
        self._rate = ServiceRate()  # of the slot queue: what a newcomer's wait is estimated from
        self._entries: RefcountedLRU[_Entry] = RefcountedLRU()  # its tasks: the loads and removals
        self._failures: dict[str, tuple[str, float]] = {}  # name -> (reason, retry at)
        self._engine_ids = itertools.count(1)
        self._base_adapter: EngineAdapter | None = None
        self._removing = 0  # retired adapters out of the pool whose engine removal has not returned
        # engine name -> done when its removal from the engine returned: a version published
        # again meanwhile is registered only after that (the engine refuses a name added twice).
        self._removals: dict[str, asyncio.Future[None]] = {}
        self._wake: tuple[float, asyncio.TimerHandle] | None = None  # a dispatch when a share grace ends
        self._queue: dict[int, _Waiter] = {}  # requests waiting for a slot, in arrival order
        self._queued_users: Counter[str | None] = Counter()  # callers with requests in the queue
        self._waiter_ids = itertools.count()
        self._tracer = tracer or trace.NoOpTracer()
        self._metrics = metrics or detached_metrics()

    # -- base model ------------------------------------------------------------

    async def register_base_adapter(self, path: Path) -> None:
        """Route base-model requests through this (all-zero) adapter; it is never evicted."""
        adapter = EngineAdapter(next(self._engine_ids), "__base__", path)
        await self._engine.add_adapter(adapter)
        self._base_adapter = adapter

    # -- requests --------------------------------------------------------------

    @asynccontextmanager
    async def take_slot(self, record: AdapterRecord | None, user: str | None = None) -> AsyncIterator[SlotGrant]:
        """The engine adapter for `record` (None: the base model), held for caller `user` until the
        block exits, and where it came from."""
        if record is None:
            yield SlotGrant(self._base_adapter, None)
            return
        entry, source = await self._traced_hold(record, user)
        try:
            yield SlotGrant(entry.adapter, source)
        finally:
            self._release(entry, user)

    @asynccontextmanager
    async def acquire(
        self, record: AdapterRecord | None, user: str | None = None
    ) -> AsyncIterator[EngineAdapter | None]:
        """`take_slot`, for a caller that needs only the adapter."""
        async with self.take_slot(record, user) as grant:
            yield grant.adapter

    async def _traced_hold(self, record: AdapterRecord, user: str | None) -> tuple[_Entry, str]:
        started = time.perf_counter()
        with self._tracer.start_as_current_span(spans.ACQUIRE, attributes=spans.adapter_attributes(record)) as span:
            try:
                entry, outcome = await self._hold(record, user, span)
            except Exception:  # the span records the exception and the reason as its status
                span.set_attribute(spans.ACQUIRE_OUTCOME, spans.FAILED)
                self._metrics.adapter_acquires.labels(spans.FAILED).inc()
                raise
            span.set_attribute(spans.ACQUIRE_OUTCOME, outcome)
        self._metrics.adapter_acquires.labels(outcome).inc()
        self._metrics.adapter_acquire_seconds.labels(outcome).observe(elapsed_since(started))
        return entry, outcome

    async def _hold(self, record: AdapterRecord, user: str | None, span: Span) -> tuple[_Entry, str]:
        name = record.versioned_ref
        self._raise_if_recently_failed(name)
        span.set_attributes({spans.ACQUIRE_QUEUE_POSITION: 0, spans.ACQUIRE_SLOT_WAIT: 0.0})
        if self._update_draining():
            self._dispatch()  # a drain called off: requests queued for that adapter may join it again
        entry = self._entries.get(name)
        if entry is not None and not entry.draining:
            resident = self._hold_entry(entry, user)
        elif entry is None and not self._queue and self._slot_available(yielding := self._past_share(user)):
            entry = self._start_load(record, yielding)
            resident = self._hold_entry(entry, user)
        else:
            entry, resident = await self._queue_for_slot(record, user, span)
        if not resident and entry.load_span != span.get_span_context():
            span.set_attribute(spans.ACQUIRE_JOINED, True)
            if entry.load_span is not None:
                span.add_link(entry.load_span)
        try:
            await asyncio.shield(entry.loaded)
        except BaseException:
            self._release(entry, user)
            raise
        return entry, spans.RESIDENT if resident else entry.source

    def _hold_entry(self, entry: _Entry, user: str | None) -> bool:
        """Count a request in (synchronously: a held entry is never evicted); whether it is loaded. The
        caller resolved this version as current: a retired one was republished."""
        entry.users[user] += 1
        return self._entries.hold(entry)

    def _release(self, entry: _Entry, user: str | None) -> None:
        state = self._entries.release(entry)
        entry.users[user] -= 1
        if entry.users[user] <= 0:
            del entry.users[user]
        if state in (EntryState.HELD, EntryState.ABSENT):
            return  # still in use, or already gone (a failed load hands its slot on itself)
        entry.released_at, entry.last_user = time.monotonic(), user
        if state is EntryState.DROPPED:
            self._remove_dropped(entry)
            return
        if state is EntryState.LOADING:
            # Recency counts from the end of use (for a loaded one, the LRU's own rule): an adapter
            # busy with a long request is not less recently used than one whose short request ended meanwhile.
            self._entries.touch(entry)
        self._dispatch()

    # -- the queue for slots ---------------------------------------------------

    async def _queue_for_slot(self, record: AdapterRecord, user: str | None, span: Span) -> tuple[_Entry, bool]:
        """Wait in line until `_dispatch` hands this request an entry (held for it), or time out; refused
        at once when the queue is full, or longer than the slots can serve before the deadline."""
        if len(self._queue) >= self._max_queued:
            raise self._capacity_error("full", record, f"{len(self._queue)} requests wait for one", 1)
        waiter = _Waiter(
            record, user, time.monotonic(), contextvars.copy_context(), asyncio.get_running_loop().create_future()
        )
        waiter_id = next(self._waiter_ids)
        self._queue[waiter_id] = waiter
        self._queued_users[user] += 1
        self._rate.queue_changed(len(self._queue))
        position = len(self._queue)
        span.set_attribute(spans.ACQUIRE_QUEUE_POSITION, position)
        span.add_event("waiting for a free adapter slot")
        self._dispatch()
        estimate = None if waiter.granted.done() else self._rate.wait_s(position - 1)
        if estimate is not None and estimate > self._wait_timeout_s:
            self._leave_queue(waiter_id)
            raise self._capacity_error("estimate", record, f"{position - 1} requests wait ahead", estimate)
        try:
            with self._metrics.waiting("adapter_slot"):
                # Shielded: a timeout or a cancellation must not cancel a grant made meanwhile.
                await asyncio.wait_for(asyncio.shield(waiter.granted), self._wait_timeout_s)
        except TimeoutError:
            pass
        except BaseException:  # cancelled: give back what was granted meanwhile
            self._leave_queue(waiter_id)
            if waiter.granted.done() and waiter.granted.exception() is None:
                self._release(waiter.granted.result()[0], user)
            raise
        finally:
            waited = time.monotonic() - waiter.arrived
            span.set_attribute(spans.ACQUIRE_SLOT_WAIT, waited)
            self._metrics.adapter_slot_wait_seconds.observe(waited)
        if waiter.granted.done():
            return waiter.granted.result()  # (a load failure remembered meanwhile raises here)
        self._leave_queue(waiter_id)
        raise self._capacity_error("timeout", record, f"it waited {self._wait_timeout_s:g} s", 1)

    def _capacity_error(self, reason: str, record: AdapterRecord, why: str, wait_s: float) -> AdapterCapacityError:
        self._metrics.admission_refusals.labels("adapter_slot", reason).inc()
        return AdapterCapacityError(
            f"All {self._capacity} adapter slots are busy and '{record.ref}' could not be loaded: {why}. "
            "Retry shortly.",
            retry_after_s=retry_after_s(wait_s),
        )

    def _dequeue(self, waiter_id: int) -> _Waiter | None:
        waiter = self._queue.pop(waiter_id, None)
        if waiter is not None:
            self._rate.queue_changed(len(self._queue))
            self._queued_users[waiter.user] -= 1
            if self._queued_users[waiter.user] <= 0:
                del self._queued_users[waiter.user]
        return waiter

    def _leave_queue(self, waiter_id: int) -> None:
        if self._dequeue(waiter_id) is not None:
            self._dispatch()  # a drain for it may be called off, a tenant it held back may go

    def _dispatch(self) -> None:
        """Hand what can be handed to the queue; called whenever a slot may have freed, or the
        queue or the drains changed."""
        self._grant_queued()
        while self._update_draining():  # a drain called off: its adapter takes its waiters again
            self._grant_queued()

    def _grant_queued(self) -> None:
        """Joins of an adapter in the pool (not draining) to anyone queued for it; new slots in arrival
        order, to tenants below their share first, then to the others (never left free while anyone waits)."""
        alone, slots = self._slots_held_alone(), self._slot_available()
        deferred: list[int] = []
        for waiter_id, waiter in list(self._queue.items()):
            entry = self._entries.get(waiter.record.versioned_ref)
            if entry is not None:
                if not entry.draining:
                    self._grant(waiter_id, entry)
            elif not slots:
                continue  # only joins are left to hand out
            elif self._tenant_at_share(waiter.user, alone):
                deferred.append(waiter_id)
            elif self._grant_slot(waiter_id):
                alone, slots = self._slots_held_alone(), self._slot_available()
        for waiter_id in deferred:
            if not self._slot_available(yielding=True):
                self._wake_when_grace_ends()
                break
            self._grant_slot(waiter_id, yielding=True)

    def _grant_slot(self, waiter_id: int, yielding: bool = False) -> bool:
        """Load a waiter's adapter into a slot, if one can be had; whether the waiter left the queue."""
        waiter = self._queue.get(waiter_id)
        if waiter is None:
            return False
        name = waiter.record.versioned_ref
        if (entry := self._entries.get(name)) is not None:  # loaded for a waiter ahead of it
            if entry.draining:
                return False
            self._grant(waiter_id, entry)
            return True
        if (failure := self._recent_failure(name)) is not None:
            self._dequeue(waiter_id)
            waiter.granted.set_exception(failure)
            return True
        if not self._slot_available(yielding):
            return False
        # In the waiter's context: the load's spans are children of its acquire, not of whoever freed the slot.
        self._grant(waiter_id, waiter.context.run(self._start_load, waiter.record, yielding))
        return True

    def _grant(self, waiter_id: int, entry: _Entry) -> None:
        waiter = self._dequeue(waiter_id)
        if waiter is not None:
            self._rate.served()
            waiter.granted.set_result((entry, self._hold_entry(entry, waiter.user)))

    def _update_draining(self) -> bool:
        """Make one resident adapter drain per waiter past the aging bound that no spare slot covers
        (the fewest requests in flight first, least recently used among equals); whether a drain
        was called off (its waiter served, gone, or no longer counted)."""
        # An idle draining adapter is no spare: its slot is the one its waiter is about to get.
        idle = sum(1 for e in self._entries.idle() if not (e.draining or e.pinned))
        spare = max(0, self._capacity - self._occupied()) + idle
        aged, all_past_share = self._aged_waiters(spare + self._capacity)
        need = max(0, aged - spare)
        draining = [e for e in self._entries.values() if e.draining]
        released = False
        while len(draining) > need:
            busiest = max(draining, key=lambda e: e.holders)
            busiest.draining, released = False, True
            draining.remove(busiest)
        if len(draining) < need:
            candidates = [
                e for e in self._entries.values() if not (e.draining or e.pinned) and e.holders > 0 and e.loaded.done()
            ]
            if all_past_share:  # they drain only adapters of callers past their share (theirs among them)
                alone = self._slots_held_alone()
                candidates = [e for e in candidates if all(self._tenant_at_share(u, alone) for u in e.users)]
            for entry in sorted(candidates, key=lambda e: e.holders)[: need - len(draining)]:  # stable: LRU first
                entry.draining = True
        return released

    def _aged_waiters(self, enough: int) -> tuple[int, bool]:
        """Waiters past the aging bound that need a slot of their own, counted up to `enough` (the
        queue is in arrival order, so they are the first ones); and whether all of them are of callers
        past their share."""
        now, count, all_past_share = time.monotonic(), 0, True
        alone: Counter[str | None] | None = None
        for waiter in self._queue.values():
            if count >= enough or now - waiter.arrived < self._slot_aging_s:
                break
            if waiter.record.versioned_ref in self._entries:
                continue  # its adapter is in the pool (loading, or draining): no other slot for it
            alone = alone if alone is not None else self._slots_held_alone()
            past_share = self._tenant_at_share(waiter.user, alone)
            if past_share and self._others_queued(waiter.user):
                continue  # at its share, with other callers waiting: it drains nobody's adapter
            count += 1
            all_past_share = all_past_share and past_share
        return count, all_past_share

    def _slots_held_alone(self) -> Counter[str | None]:
        """Per caller: the adapters in the pool held by that caller's requests only."""
        return Counter(next(iter(e.users)) for e in self._entries.values() if len(e.users) == 1)

    def _tenant_at_share(self, user: str | None, alone: Counter[str | None]) -> bool:
        return alone[user] >= self._max_slots_per_user

    def _past_share(self, user: str | None) -> bool:
        return self._tenant_at_share(user, self._slots_held_alone())

    def _others_queued(self, user: str | None) -> bool:
        return len(self._queued_users) - (user in self._queued_users) > 0

    # -- loading and eviction --------------------------------------------------

    def _occupied(self) -> int:
        """Engine slots in use or promised: an adapter still being removed holds its slot."""
        return len(self._entries) + self._removing

    def _slot_available(self, yielding: bool = False) -> bool:
        return self._occupied() < self._capacity or self._idle_victim(yielding) is not None

    def _idle_victim(self, yielding: bool = False) -> _Entry | None:
        """The idle adapter to evict for a new one: a draining one first, else the least recently used.
        `yielding` (for a caller past its share): not one a caller below its share used within the grace."""
        idle = [e for e in self._entries.idle() if not e.pinned]
        if yielding:
            alone = self._slots_held_alone()
            idle = [e for e in idle if self._grace_ends(e, alone) is None]
        return next((e for e in idle if e.draining), idle[0] if idle else None)

    def _grace_ends(self, entry: _Entry, alone: Counter[str | None]) -> float | None:
        """When an idle adapter last used by a caller below its share stops being kept for it (None: it is not)."""
        ends = entry.released_at + min(self._slot_aging_s, MAX_SHARE_GRACE_S)
        if ends <= time.monotonic() or self._tenant_at_share(entry.last_user, alone):
            return None
        return ends

    def _wake_when_grace_ends(self) -> None:
        """A waiter past its share waits for a grace to end: dispatch then, whatever else happens."""
        alone = self._slots_held_alone()
        ends = [t for e in self._entries.idle() if (t := self._grace_ends(e, alone)) is not None]
        if not ends or (self._wake is not None and self._wake[0] <= min(ends)):
            return
        if self._wake is not None:
            self._wake[1].cancel()
        delay = max(0.0, min(ends) - time.monotonic())
        self._wake = (min(ends), asyncio.get_running_loop().call_later(delay, self._woken))

    def _woken(self) -> None:
        self._wake = None
        self._dispatch()

    def _start_load(self, record: AdapterRecord, yielding: bool = False) -> _Entry:
        """Reserve a slot now (synchronously, so concurrent requests find it) and load in a task."""
        victim = None
        if self._occupied() >= self._capacity:
            victim = self._idle_victim(yielding)
            assert victim is not None, "a load started without a slot"
            self._entries.evict(victim)
            self._removal_started(victim)
        name = record.versioned_ref
        adapter = EngineAdapter(next(self._engine_ids), name, Path())
        entry = _Entry(key=name, record=record, adapter=adapter, load_span=trace.get_current_span().get_span_context())
        # The task copies this context: the load's spans are children of the triggering acquire.
        return self._entries.start(entry, self._load(entry, victim))

    async def _load(self, entry: _Entry, victim: _Entry | None) -> None:
        record, name = entry.record, entry.record.versioned_ref
        pinned = False
        try:
            if victim is not None:
                await self._evict(victim)
            entry.source = spans.DISK if self._files.is_cached(record) else spans.STORE
            path = await self._files.pin(record)
            pinned = True
            if self._validate is not None:
                with self._tracer.start_as_current_span(spans.VERIFY, attributes=spans.adapter_attributes(record)):
                    await asyncio.to_thread(self._validate, path)
            entry.adapter = EngineAdapter(entry.adapter.engine_id, name, path)
            if (removal := self._removals.get(name)) is not None:
                await asyncio.shield(removal)
            await self._register(entry.adapter, record)
        except (EngineDeadError, StoreUnavailableError) as exc:
            # Not the adapter's fault: nothing to remember, the client may retry. The details
            # (endpoint, bucket, object) go to the log and the spans, never to the client.
            log.warning("adapter %s could not be loaded now: %s", name, describe(exc))
            unavailable = ServiceUnavailableError(
                "The engine is not serving. Retry shortly." if isinstance(exc, EngineDeadError) else STORE_UNREACHABLE,
                retry_after_s=5,
            )
            unavailable.__cause__ = exc
            self._forget(entry, unavailable, record if pinned else None)
        except Exception as exc:
            log.warning("adapter %s failed to load: %s", name, describe(exc))
            # What is wrong with the adapter itself is its owner's to know (without server paths);
            # anything else is the server's business.
            known = isinstance(exc, (AdapterLoadError, AdapterValidationError))
            reason = redact_paths(str(exc)) if known else "the server could not prepare it"
            self._failures[name] = (reason, time.monotonic() + self._failure_ttl_s)
            self._forget(entry, _failure_error(name, reason), record if pinned else None)
        else:
            log.info("adapter %s registered as engine id %d", name, entry.adapter.engine_id)
            state = self._entries.set_loaded(entry)
            if state is EntryState.DROPPED:
                self._remove_dropped(entry)
            elif state is EntryState.IDLE:
                # Every request for it left while it loaded: it is evictable only now.
                self._dispatch()

    async def _register(self, adapter: EngineAdapter, record: AdapterRecord) -> None:
        started = time.perf_counter()
        attributes = {**spans.adapter_attributes(record), spans.ENGINE_ID: adapter.engine_id}
        with self._tracer.start_as_current_span(spans.REGISTER, attributes=attributes):
            try:
                await self._engine.add_adapter(adapter)
            except Exception:
                self._metrics.load_finished(TIER_ENGINE, elapsed_since(started), ok=False)
                raise
        self._metrics.load_finished(TIER_ENGINE, elapsed_since(started), ok=True)

    async def _evict(self, victim: _Entry) -> None:
        reason = "retired" if victim.retired else "lru"
        why = "retired: a new version or deleted" if victim.retired else "least recently used, idle"
        attributes = {
            **spans.adapter_attributes(victim.record),
            spans.EVICT_REASON: reason,
            spans.ENGINE_ID: victim.adapter.engine_id,
        }
        with self._tracer.start_as_current_span(spans.EVICT, attributes=attributes) as span:
            try:
                await self._engine.remove_adapter(victim.adapter)
                self._metrics.adapter_evictions.labels(reason).inc()
                log.info("adapter %s evicted (%s)", victim.adapter.engine_name, why)
            except EngineDeadError:
                raise
            except Exception as exc:
                spans.fail(span, f"{type(exc).__name__}: {exc}")
                log.exception("removing adapter %s from the engine failed", victim.adapter.engine_name)
            finally:
                self._files.unpin(victim.record)
                self._removal_finished(victim)

    def _removal_started(self, entry: _Entry) -> None:
        """Called as `entry` leaves the pool, before anything awaits: a load of the same version
        started from now on finds the removal and waits for it."""
        self._removals[entry.adapter.engine_name] = asyncio.get_running_loop().create_future()

    def _removal_finished(self, entry: _Entry) -> None:
        removal = self._removals.pop(entry.adapter.engine_name, None)
        if removal is not None and not removal.done():
            removal.set_result(None)

    def _remove_dropped(self, entry: _Entry) -> None:
        """An entry the LRU dropped (retired, idle): remove it from the engine in the background."""
        self._removing += 1
        self._removal_started(entry)
        self._entries.spawn(self._evict_then_free_slot(entry))

    async def _evict_then_free_slot(self, entry: _Entry) -> None:
        # The slot is free only once the engine let go: else an add could find it still full.
        try:
            await self._evict(entry)
        finally:
            self._removing -= 1
            self._dispatch()

    def _forget(self, entry: _Entry, error: Exception, pinned: AdapterRecord | None) -> None:
        """A failed load: out of the pool (its holders get `error`), its slot handed on."""
        if pinned is not None:
            self._files.unpin(pinned)
        self._entries.set_failed(entry, error)
        self._dispatch()

    # -- versions leaving ------------------------------------------------------

    def retire(self, record: AdapterRecord) -> None:
        """This version is superseded or deleted: new requests no longer reach it (the catalog
        sees to that); it leaves the engine now if idle, else when its last request ends."""
        entry = self._entries.get(record.versioned_ref)
        if entry is not None and self._entries.retire(entry) is EntryState.DROPPED:
            self._remove_dropped(entry)

    def keep_warm(self, records: Iterable[AdapterRecord]) -> None:
        """Pin the current versions marked `warm` (up to `warm_slots`, by ref) in the engine: loaded now
        where a slot is free and nobody waits for one, never evicted while they stay warm. Call after
        each sync; a version no longer warm (or no longer current) is an ordinary adapter again."""
        warm = sorted((r for r in records if r.warm), key=lambda r: r.ref)[: self._warm_slots]
        wanted = {r.versioned_ref for r in warm}
        for name, entry in self._entries.items():
            entry.pinned = name in wanted
        for record in warm:
            if record.versioned_ref in self._entries or self._recent_failure(record.versioned_ref) is not None:
                continue
            if self._queue or not self._slot_available(yielding=True):
                break  # the next sync tries again
            entry = self._start_load(record, yielding=True)
            entry.pinned = True
        self._dispatch()  # an adapter no longer pinned may be the idle victim a waiter needs

    def _raise_if_recently_failed(self, name: str) -> None:
        if (failure := self._recent_failure(name)) is not None:
            raise failure

    def _recent_failure(self, name: str) -> AdapterLoadFailedError | None:
        failure = self._failures.get(name)
        if failure is None:
            return None
        reason, retry_at = failure
        if time.monotonic() >= retry_at:
            del self._failures[name]
            return None
        return _failure_error(name, reason)

    # -- introspection ---------------------------------------------------------

    def resident(self) -> list[ResidentAdapter]:
        return [
            ResidentAdapter(name=name, holders=e.holders, loaded=e.loaded.done(), pinned=e.pinned)
            for name, e in self._entries.items()
        ]

    def lora_activity(self) -> LoraActivity:
        """Which adapters have requests running or waiting now (for vLLM-style `lora_requests_info`)."""
        held = [e for e in self._entries.values() if e.holders > 0]
        # An entry in the pool whose future is done loaded fine: a failed load leaves the pool first.
        running = frozenset(e.record.ref for e in held if e.loaded.done())
        loading = frozenset(e.record.ref for e in held if not e.loaded.done())
        queued = frozenset(w.record.ref for w in self._queue.values())
        return LoraActivity(running=running, waiting=loading | queued)

    def queued(self) -> list[QueuedRequest]:
        """Requests waiting for an engine slot (or for their draining adapter) now, in arrival order."""
        return [QueuedRequest(w.record.versioned_ref, w.user) for w in self._queue.values()]


def default_slots_per_user(capacity: int) -> int:
    """All slots but one (one when there is one): a tenant alone may use every slot, but while others
    wait it never holds the last one."""
    return max(1, capacity - 1)


def _failure_error(versioned_name: str, reason: str) -> AdapterLoadFailedError:
    ref = versioned_name.partition("@")[0]
    return AdapterLoadFailedError(f"Adapter '{ref}' could not be loaded: {reason}", param="model")
