"""AdapterPool: which adapters are resident in the engine, owned by the gateway.

The gateway mirrors the engine's CPU adapter cache exactly (it never asks for more than
`capacity`), so it knows every load and eviction. Guarantees:
- an adapter is registered (`add_adapter`) before any request generates with it;
- concurrent first requests for one version share one registration (single flight);
- only idle adapters (no request holding them) are evicted, least recently used first;
- a request holds its adapter until its response ends, however it ends;
- when every slot is busy a request waits up to `wait_timeout_s`, then AdapterCapacityError;
- a version that fails to load fails fast for `failure_ttl_s`, and the engine serves on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from adapters_manifest.record import AdapterRecord
from gateway.engine.interface import AdapterLoadError, Engine, EngineAdapter, EngineDeadError
from gateway.errors import AdapterCapacityError, AdapterLoadFailedError, ServiceUnavailableError

log = logging.getLogger(__name__)

# Where a version's files are on local disk (the store, or the disk cache in front of it).
LocalDirSource = Callable[[AdapterRecord], Awaitable[Path]]


@dataclass
class _Entry:
    adapter: EngineAdapter
    loaded: asyncio.Future[None]
    holders: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class ResidentAdapter:
    name: str
    holders: int
    loaded: bool


class AdapterPool:
    def __init__(
        self,
        engine: Engine,
        local_dir: LocalDirSource,
        capacity: int,
        wait_timeout_s: float = 30.0,
        failure_ttl_s: float = 60.0,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._engine = engine
        self._local_dir = local_dir
        self._capacity = capacity
        self._wait_timeout_s = wait_timeout_s
        self._failure_ttl_s = failure_ttl_s
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU first
        self._failures: dict[str, tuple[str, float]] = {}  # name -> (reason, retry at)
        self._slot_freed = asyncio.Event()
        self._engine_ids = itertools.count(1)
        self._base_adapter: EngineAdapter | None = None
        self._loading: set[asyncio.Task[None]] = set()

    # -- base model ------------------------------------------------------------

    async def register_base_adapter(self, path: Path) -> None:
        """Route base-model requests through this (all-zero) adapter; it is never evicted."""
        adapter = EngineAdapter(next(self._engine_ids), "__base__", path)
        await self._engine.add_adapter(adapter)
        self._base_adapter = adapter

    # -- requests --------------------------------------------------------------

    @asynccontextmanager
    async def acquire(self, record: AdapterRecord | None) -> AsyncIterator[EngineAdapter | None]:
        """The engine adapter for `record` (None: the base model), held until the block exits."""
        if record is None:
            yield self._base_adapter
            return
        entry = await self._hold(record)
        try:
            yield entry.adapter
        finally:
            self._release(entry)

    async def _hold(self, record: AdapterRecord) -> _Entry:
        name = record.versioned_ref
        self._raise_if_recently_failed(name)
        deadline = time.monotonic() + self._wait_timeout_s
        while True:
            entry = self._entries.get(name)
            if entry is None and (len(self._entries) < self._capacity or self._can_evict()):
                entry = self._start_load(record)
            if entry is not None:
                entry.holders += 1  # before any await: a held entry is never evicted
                self._entries.move_to_end(name)
                try:
                    await asyncio.shield(entry.loaded)
                except BaseException:
                    self._release(entry)
                    raise
                return entry
            await self._wait_for_free_slot(record, deadline)

    def _release(self, entry: _Entry) -> None:
        entry.holders -= 1
        entry.last_used = time.monotonic()
        if entry.holders == 0:
            # Recency counts from the end of use: an adapter busy with a long request is not
            # less recently used than one whose short request ended meanwhile.
            name = entry.adapter.engine_name
            if self._entries.get(name) is entry:
                self._entries.move_to_end(name)
            self._wake_waiters()

    async def _wait_for_free_slot(self, record: AdapterRecord, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AdapterCapacityError(
                f"All {self._capacity} adapter slots are busy; '{record.ref}' could not be loaded. "
                "Retry shortly.",
                retry_after_s=1,
            )
        slot_freed = self._slot_freed
        try:
            await asyncio.wait_for(slot_freed.wait(), remaining)
        except TimeoutError:
            pass  # the loop above raises AdapterCapacityError

    def _wake_waiters(self) -> None:
        self._slot_freed.set()
        self._slot_freed = asyncio.Event()

    # -- loading and eviction --------------------------------------------------

    def _can_evict(self) -> bool:
        return any(e.holders == 0 and e.loaded.done() for e in self._entries.values())

    def _start_load(self, record: AdapterRecord) -> _Entry:
        """Reserve a slot now (synchronously, so concurrent requests find it) and load in a task."""
        victim = None
        if len(self._entries) >= self._capacity:
            victim_name = next(n for n, e in self._entries.items() if e.holders == 0 and e.loaded.done())
            victim = self._entries.pop(victim_name)
        adapter = EngineAdapter(next(self._engine_ids), record.versioned_ref, Path())
        entry = _Entry(adapter=adapter, loaded=asyncio.get_running_loop().create_future())
        self._entries[record.versioned_ref] = entry
        task = asyncio.get_running_loop().create_task(self._load(entry, record, victim))
        self._loading.add(task)
        task.add_done_callback(self._loading.discard)
        # A load that fails after every waiter left must not warn "exception never retrieved".
        entry.loaded.add_done_callback(lambda f: f.cancelled() or f.exception())
        return entry

    async def _load(self, entry: _Entry, record: AdapterRecord, victim: _Entry | None) -> None:
        name = record.versioned_ref
        try:
            if victim is not None:
                await self._evict(victim)
            path = await self._local_dir(record)
            entry.adapter = EngineAdapter(entry.adapter.engine_id, name, path)
            await self._engine.add_adapter(entry.adapter)
        except EngineDeadError as exc:
            self._forget(name)
            entry.loaded.set_exception(ServiceUnavailableError(f"The engine is not serving: {exc}"))
        except Exception as exc:
            reason = str(exc) if isinstance(exc, AdapterLoadError) else f"{type(exc).__name__}: {exc}"
            log.warning("adapter %s failed to load: %s", name, reason)
            self._failures[name] = (reason, time.monotonic() + self._failure_ttl_s)
            self._forget(name)
            entry.loaded.set_exception(_failure_error(name, reason))
        else:
            log.info("adapter %s registered as engine id %d", name, entry.adapter.engine_id)
            entry.loaded.set_result(None)
            if entry.holders == 0:
                # Every request for it left while it loaded: it is evictable only now.
                self._wake_waiters()

    async def _evict(self, victim: _Entry) -> None:
        try:
            await self._engine.remove_adapter(victim.adapter)
            log.info("adapter %s evicted (least recently used, idle)", victim.adapter.engine_name)
        except EngineDeadError:
            raise
        except Exception:
            log.exception("removing adapter %s from the engine failed", victim.adapter.engine_name)

    def _forget(self, name: str) -> None:
        self._entries.pop(name, None)
        self._wake_waiters()

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
            ResidentAdapter(name=name, holders=e.holders, loaded=e.loaded.done())
            for name, e in self._entries.items()
        ]


def _failure_error(versioned_name: str, reason: str) -> AdapterLoadFailedError:
    ref = versioned_name.partition("@")[0]
    return AdapterLoadFailedError(f"Adapter '{ref}' could not be loaded: {reason}", param="model")
