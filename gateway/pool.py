"""AdapterPool: which adapters are resident in the engine, owned by the gateway.

The gateway mirrors the engine's CPU adapter cache exactly (it never asks for more than
`capacity`), so it knows every load and eviction. Guarantees:
- an adapter is registered (`add_adapter`) before any request generates with it;
- concurrent first requests for one version share one registration (single flight);
- only idle adapters (no request holding them) are evicted, least recently used first;
- a request holds its adapter until its response ends, however it ends;
- when every slot is busy a request waits up to `wait_timeout_s`, then AdapterCapacityError;
- a version that fails to load fails fast for `failure_ttl_s`, and the engine serves on;
- a retired version (superseded or deleted) leaves the engine when its last request ends.
The files come from the disk tier (`AdapterFiles`), pinned while the engine holds them.

Each acquire is an `adapter.acquire` span (outcome resident, disk, store or failed); a load runs
in a task of its own, started in the context of the request that triggered it, so its
`adapter.evict`, `adapter.fetch`, `adapter.verify` and `adapter.register` spans are children of
that request's acquire. Requests that join a load in flight get their own acquire span, linked
to the load's.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
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
from gateway.telemetry import spans
from gateway.telemetry.instruments import TIER_ENGINE, GatewayMetrics, detached_metrics, elapsed_since

log = logging.getLogger(__name__)


class AdapterFiles(Protocol):
    """The tier below: a version's files on local disk, kept while pinned."""

    async def pin(self, record: AdapterRecord) -> Path: ...

    def unpin(self, record: AdapterRecord) -> None: ...

    def is_cached(self, record: AdapterRecord) -> bool:
        """Whether this version is on local disk already (a load from it skips the store)."""


@dataclass
class _Entry:
    record: AdapterRecord
    adapter: EngineAdapter
    loaded: asyncio.Future[None]
    holders: int = 0
    retired: bool = False
    source: str = spans.STORE  # where the load found the files: disk, or the store (fetched first)
    load_span: SpanContext | None = None  # the acquire span of the request that started the load


@dataclass(frozen=True)
class ResidentAdapter:
    name: str
    holders: int
    loaded: bool


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
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU first
        self._failures: dict[str, tuple[str, float]] = {}  # name -> (reason, retry at)
        self._slot_freed = asyncio.Event()
        self._engine_ids = itertools.count(1)
        self._base_adapter: EngineAdapter | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._removing = 0  # retired adapters out of the pool whose engine removal has not returned
        # engine name -> done when its removal from the engine returned: a version published
        # again meanwhile is registered only after that (the engine refuses a name added twice).
        self._removals: dict[str, asyncio.Future[None]] = {}
        self._slot_waiters: Counter[str] = Counter()  # ref -> requests waiting for a free slot
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
    async def acquire(
        self, record: AdapterRecord | None, on_outcome: Callable[[str], None] | None = None
    ) -> AsyncIterator[EngineAdapter | None]:
        """The engine adapter for `record` (None: the base model), held until the block exits.
        `on_outcome` hears where it came from: resident, disk or store."""
        if record is None:
            yield self._base_adapter
            return
        entry = await self._traced_hold(record, on_outcome)
        try:
            yield entry.adapter
        finally:
            self._release(entry)

    async def _traced_hold(self, record: AdapterRecord, on_outcome: Callable[[str], None] | None) -> _Entry:
        started = time.perf_counter()
        with self._tracer.start_as_current_span(spans.ACQUIRE, attributes=spans.adapter_attributes(record)) as span:
            try:
                entry, outcome = await self._hold(record, span)
            except Exception:  # the span records the exception and the reason as its status
                span.set_attribute(spans.ACQUIRE_OUTCOME, spans.FAILED)
                self._metrics.adapter_acquires.labels(spans.FAILED).inc()
                raise
            span.set_attribute(spans.ACQUIRE_OUTCOME, outcome)
        self._metrics.adapter_acquires.labels(outcome).inc()
        self._metrics.adapter_acquire_seconds.labels(outcome).observe(elapsed_since(started))
        if on_outcome is not None:
            on_outcome(outcome)
        return entry

    async def _hold(self, record: AdapterRecord, span: Span) -> tuple[_Entry, str]:
        name = record.versioned_ref
        self._raise_if_recently_failed(name)
        deadline = time.monotonic() + self._wait_timeout_s
        while True:
            entry = self._entries.get(name)
            resident = entry is not None and entry.loaded.done()
            if entry is not None and not resident:
                span.set_attribute(spans.ACQUIRE_JOINED, True)
                if entry.load_span is not None:
                    span.add_link(entry.load_span)
            if entry is None and (self._occupied() < self._capacity or self._can_evict()):
                entry = self._start_load(record)
            if entry is not None:
                entry.holders += 1  # before any await: a held entry is never evicted
                entry.retired = False  # the caller resolved this version as current (republished)
                self._entries.move_to_end(name)
                try:
                    await asyncio.shield(entry.loaded)
                except BaseException:
                    self._release(entry)
                    raise
                return entry, spans.RESIDENT if resident else entry.source
            span.add_event("waiting for a free adapter slot")
            with self._metrics.waiting("adapter_slot"), self._waiting_for_slot(record.ref):
                await self._wait_for_free_slot(record, deadline)

    def _release(self, entry: _Entry) -> None:
        entry.holders -= 1
        name = entry.record.versioned_ref
        if entry.holders > 0 or self._entries.get(name) is not entry:
            return  # still in use, or already gone (a failed load wakes waiters itself)
        if entry.retired and entry.loaded.done():
            self._evict_now(entry)
        else:
            # Recency counts from the end of use: an adapter busy with a long request is not
            # less recently used than one whose short request ended meanwhile.
            self._entries.move_to_end(name)
            self._wake_waiters()

    async def _wait_for_free_slot(self, record: AdapterRecord, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AdapterCapacityError(
                f"All {self._capacity} adapter slots are busy; '{record.ref}' could not be loaded. Retry shortly.",
                retry_after_s=1,
            )
        slot_freed = self._slot_freed
        try:
            await asyncio.wait_for(slot_freed.wait(), remaining)
        except TimeoutError:
            pass  # the loop above raises AdapterCapacityError

    @contextmanager
    def _waiting_for_slot(self, ref: str) -> Iterator[None]:
        self._slot_waiters[ref] += 1
        try:
            yield
        finally:
            self._slot_waiters[ref] -= 1
            if self._slot_waiters[ref] <= 0:
                del self._slot_waiters[ref]  # keyed by ref: don't keep one entry per adapter ever seen

    def _wake_waiters(self) -> None:
        self._slot_freed.set()
        self._slot_freed = asyncio.Event()

    # -- loading and eviction --------------------------------------------------

    def _occupied(self) -> int:
        """Engine slots in use or promised: an adapter still being removed holds its slot."""
        return len(self._entries) + self._removing

    def _can_evict(self) -> bool:
        return any(e.holders == 0 and e.loaded.done() for e in self._entries.values())

    def _start_load(self, record: AdapterRecord) -> _Entry:
        """Reserve a slot now (synchronously, so concurrent requests find it) and load in a task."""
        victim = None
        if self._occupied() >= self._capacity:
            victim_name = next(n for n, e in self._entries.items() if e.holders == 0 and e.loaded.done())
            victim = self._entries.pop(victim_name)
            self._removal_started(victim)
        adapter = EngineAdapter(next(self._engine_ids), record.versioned_ref, Path())
        entry = _Entry(record=record, adapter=adapter, loaded=asyncio.get_running_loop().create_future())
        entry.load_span = trace.get_current_span().get_span_context()
        self._entries[record.versioned_ref] = entry
        # The task copies this context: the load's spans are children of the triggering acquire.
        self._spawn(self._load(entry, victim))
        # A load that fails after every waiter left must not warn "exception never retrieved".
        entry.loaded.add_done_callback(lambda f: f.cancelled() or f.exception())
        return entry

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
            self._forget(name, record if pinned else None)
            unavailable = ServiceUnavailableError(
                "The engine is not serving. Retry shortly." if isinstance(exc, EngineDeadError) else STORE_UNREACHABLE,
                retry_after_s=5,
            )
            unavailable.__cause__ = exc
            entry.loaded.set_exception(unavailable)
        except Exception as exc:
            log.warning("adapter %s failed to load: %s", name, describe(exc))
            # What is wrong with the adapter itself is its owner's to know (without server paths);
            # anything else is the server's business.
            known = isinstance(exc, (AdapterLoadError, AdapterValidationError))
            reason = redact_paths(str(exc)) if known else "the server could not prepare it"
            self._failures[name] = (reason, time.monotonic() + self._failure_ttl_s)
            self._forget(name, record if pinned else None)
            entry.loaded.set_exception(_failure_error(name, reason))
        else:
            log.info("adapter %s registered as engine id %d", name, entry.adapter.engine_id)
            entry.loaded.set_result(None)
            if entry.holders == 0 and entry.retired:
                self._evict_now(entry)
            elif entry.holders == 0:
                # Every request for it left while it loaded: it is evictable only now.
                self._wake_waiters()

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

    def _evict_now(self, entry: _Entry) -> None:
        """Take an idle entry out of the pool at once and remove it from the engine in the background."""
        self._entries.pop(entry.record.versioned_ref, None)
        self._removing += 1
        self._removal_started(entry)
        self._spawn(self._evict_then_free_slot(entry))

    async def _evict_then_free_slot(self, entry: _Entry) -> None:
        # The slot is free only once the engine let go: else an add could find it still full.
        try:
            await self._evict(entry)
        finally:
            self._removing -= 1
            self._wake_waiters()

    def _forget(self, name: str, pinned: AdapterRecord | None) -> None:
        self._entries.pop(name, None)
        if pinned is not None:
            self._files.unpin(pinned)
        self._wake_waiters()

    # -- versions leaving ------------------------------------------------------

    def retire(self, record: AdapterRecord) -> None:
        """This version is superseded or deleted: new requests no longer reach it (the catalog
        sees to that); it leaves the engine now if idle, else when its last request ends."""
        entry = self._entries.get(record.versioned_ref)
        if entry is None:
            return
        entry.retired = True
        if entry.holders == 0 and entry.loaded.done():
            self._evict_now(entry)

    def _raise_if_recently_failed(self, name: str) -> None:
        failure = self._failures.get(name)
        if failure is None:
            return
        reason, retry_at = failure
        if time.monotonic() >= retry_at:
            del self._failures[name]
            return
        raise _failure_error(name, reason)

    # -- introspection ---------------------------------------------------------

    def resident(self) -> list[ResidentAdapter]:
        return [
            ResidentAdapter(name=name, holders=e.holders, loaded=e.loaded.done()) for name, e in self._entries.items()
        ]

    def lora_activity(self) -> LoraActivity:
        """Which adapters have requests running or waiting now (for vLLM-style `lora_requests_info`)."""
        held = [e for e in self._entries.values() if e.holders > 0]
        # An entry in the pool whose future is done loaded fine: a failed load leaves the pool first.
        running = frozenset(e.record.ref for e in held if e.loaded.done())
        loading = frozenset(e.record.ref for e in held if not e.loaded.done())
        return LoraActivity(running=running, waiting=loading | frozenset(self._slot_waiters))


def _failure_error(versioned_name: str, reason: str) -> AdapterLoadFailedError:
    ref = versioned_name.partition("@")[0]
    return AdapterLoadFailedError(f"Adapter '{ref}' could not be loaded: {reason}", param="model")
