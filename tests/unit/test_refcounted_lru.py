"""RefcountedLRU, the machine under both adapter tiers, tested once here: one load per key, a failed
load not kept, holders keep an entry from eviction, retirement drops on the last release, idle
entries least recently used first, background tasks kept referenced. (The tiers' own tests cover
their policies on top: test_disk_cache, test_pool, test_pool_scheduling.)"""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.refcounted_lru import EntryState, LruEntry, RefcountedLRU


@dataclass(kw_only=True)
class Item(LruEntry):
    value: str = ""


@dataclass
class Loader:
    """Loads items when the test lets them go (`gate`), failing those named in `failing`."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    failing: set[str] = field(default_factory=set)
    loads: list[str] = field(default_factory=list)

    async def load(self, lru: RefcountedLRU[Item], item: Item) -> None:
        self.loads.append(item.key)
        await self.gate.wait()
        if item.key in self.failing:
            lru.set_failed(item, RuntimeError(f"{item.key} is broken"))
        else:
            item.value = f"loaded {item.key}"
            lru.set_loaded(item)


async def acquire(lru: RefcountedLRU[Item], loader: Loader, key: str) -> Item:
    """An acquirer as the tiers write it: find the key's entry or start its load, hold it, await it."""
    item = lru.get(key)
    if item is None:
        item = Item(key=key)
        lru.start(item, loader.load(lru, item))
    lru.hold(item)
    try:
        await asyncio.shield(item.loaded)
    except BaseException:
        lru.release(item)
        raise
    return item


async def loaded(lru: RefcountedLRU[Item], *keys: str) -> list[Item]:
    """Entries loaded and idle, added in this order (so least recently used first)."""
    loader = Loader()
    loader.gate.set()
    items = [await acquire(lru, loader, key) for key in keys]
    for item in items:
        assert lru.release(item) is EntryState.IDLE
    return items


async def test_concurrent_acquirers_of_a_key_share_one_load() -> None:
    lru: RefcountedLRU[Item] = RefcountedLRU()
    loader = Loader()
    waiting = [asyncio.create_task(acquire(lru, loader, "a")) for _ in range(3)]
    await asyncio.sleep(0)
    assert lru["a"].holders == 3 and not lru["a"].loaded.done()
    loader.gate.set()
    items = await asyncio.gather(*waiting)
    assert loader.loads == ["a"]
    assert all(item is items[0] for item in items) and items[0].value == "loaded a"


async def test_a_second_load_of_a_loading_key_is_refused() -> None:
    lru: RefcountedLRU[Item] = RefcountedLRU()
    loader = Loader()
    lru.start(Item(key="a"), loader.load(lru, Item(key="a")))
    second = loader.load(lru, Item(key="a"))
    with pytest.raises(ValueError):
        lru.start(Item(key="a"), second)
    assert second.cr_frame is None  # closed, never run: no "coroutine was never awaited" either
    loader.gate.set()
    await asyncio.gather(*lru.tasks)
    assert loader.loads == ["a"]


async def test_a_failed_load_is_not_kept_and_the_next_acquirer_loads_again() -> None:
    lru: RefcountedLRU[Item] = RefcountedLRU()
    loader = Loader(failing={"a"})
    waiting = [asyncio.create_task(acquire(lru, loader, "a")) for _ in range(2)]
    await asyncio.sleep(0)
    loader.gate.set()
    for outcome in await asyncio.gather(*waiting, return_exceptions=True):
        assert isinstance(outcome, RuntimeError)  # every holder of the failed load hears it
    assert "a" not in lru and len(lru) == 0

    loader.failing.clear()
    item = await acquire(lru, loader, "a")
    assert loader.loads == ["a", "a"] and item.value == "loaded a"


async def test_a_failed_or_cancelled_load_nobody_holds_raises_no_unretrieved_warning() -> None:
    lru: RefcountedLRU[Item] = RefcountedLRU()
    unhandled: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: unhandled.append(context))
    failed, cancelled = Item(key="a"), Item(key="b")
    lru.start(failed, asyncio.sleep(0))
    lru.start(cancelled, asyncio.sleep(0))
    lru.set_failed(failed, RuntimeError("nobody asked"))
    lru.set_failed(cancelled, None)
    await asyncio.gather(*lru.tasks)
    assert cancelled.loaded.cancelled() and len(lru) == 0
    del failed, cancelled
    gc.collect()
    await asyncio.sleep(0)
    assert unhandled == []


async def test_held_and_loading_entries_are_never_evicted() -> None:
    lru: RefcountedLRU[Item] = RefcountedLRU()
    (a,) = await loaded(lru, "a")
    loading = Item(key="b")
    lru.start(loading, asyncio.sleep(3600))
    lru.hold(a)
    assert list(lru.idle()) == []
    for item in (a, loading):
        with pytest.raises(ValueError):
            lru.evict(item)
    assert set(lru) == {"a", "b"}

    assert lru.release(a) is EntryState.IDLE
    lru.evict(a)
    assert "a" not in lru
    with pytest.raises(ValueError):
        lru.evict(a)  # gone already
    for task in lru.tasks:
        task.cancel()


async def test_a_loading_entry_without_holders_becomes_idle_when_loaded() -> None:
    lru: RefcountedLRU[Item] = RefcountedLRU()
    loader = Loader()
    waiting = asyncio.create_task(acquire(lru, loader, "a"))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert lru["a"].holders == 0 and list(lru.idle()) == []  # (its acquirer released it: LOADING)
    loader.gate.set()
    await asyncio.gather(*lru.tasks)
    assert list(lru.idle()) == [lru["a"]]


async def test_a_retired_entry_is_dropped_when_its_last_holder_releases() -> None:
    lru: RefcountedLRU[Item] = RefcountedLRU()
    (a,) = await loaded(lru, "a")
    lru.hold(a)
    lru.hold(a)
    assert lru.retire(a) is EntryState.HELD and "a" in lru
    assert lru.release(a) is EntryState.HELD and "a" in lru
    assert lru.release(a) is EntryState.DROPPED and "a" not in lru
    assert lru.retire(a) is EntryState.ABSENT


async def test_an_idle_entry_retired_is_dropped_at_once() -> None:
    lru: RefcountedLRU[Item] = RefcountedLRU()
    a, b = await loaded(lru, "a", "b")
    assert lru.retire(a) is EntryState.DROPPED
    assert list(lru) == ["b"]


async def test_an_entry_retired_while_loading_is_dropped_when_loaded_if_nobody_holds_it() -> None:
    lru: RefcountedLRU[Item] = RefcountedLRU()
    kept, dropped = Item(key="kept"), Item(key="dropped")
    for item in (kept, dropped):
        lru.start(item, asyncio.sleep(0))
    lru.hold(kept)
    assert lru.retire(kept) is EntryState.HELD
    assert lru.retire(dropped) is EntryState.LOADING
    assert lru.set_loaded(kept) is EntryState.HELD
    assert lru.set_loaded(dropped) is EntryState.DROPPED
    assert list(lru) == ["kept"]
    assert lru.release(kept) is EntryState.DROPPED and len(lru) == 0
    await asyncio.gather(*lru.tasks)


async def test_holding_a_retired_entry_again_takes_the_retirement_back() -> None:
    """A caller that resolved the version as current holds it: it was published again."""
    lru: RefcountedLRU[Item] = RefcountedLRU()
    (a,) = await loaded(lru, "a")
    lru.hold(a)
    lru.retire(a)
    lru.hold(a)
    lru.release(a)
    assert lru.release(a) is EntryState.IDLE and "a" in lru


async def test_idle_entries_are_listed_least_recently_used_first_counting_from_the_last_release() -> None:
    lru: RefcountedLRU[Item] = RefcountedLRU()
    a, b, c = await loaded(lru, "a", "b", "c")
    assert list(lru.idle()) == [a, b, c]
    lru.hold(a)
    lru.hold(b)
    lru.release(b)  # b's use ended before a's: a is the more recently used
    assert list(lru.idle()) == [c, b]
    lru.release(a)
    assert list(lru.idle()) == [c, b, a]
    lru.touch(c)
    assert list(lru.idle()) == [b, a, c] and list(lru) == ["b", "a", "c"]


async def test_set_loaded_leaves_recency_where_the_acquirers_left_it() -> None:
    lru: RefcountedLRU[Item] = RefcountedLRU()
    early = Item(key="early")
    lru.start(early, asyncio.sleep(0))
    (later,) = await loaded(lru, "later")
    assert lru.set_loaded(early) is EntryState.IDLE
    assert list(lru.idle()) == [early, later]


async def test_spawned_tasks_stay_referenced_until_done() -> None:
    lru: RefcountedLRU[Item] = RefcountedLRU()
    release = asyncio.Event()
    done: list[str] = []

    async def work() -> None:
        await release.wait()
        done.append("work")

    task = lru.spawn(work())
    del task
    gc.collect()
    assert len(lru.tasks) == 1
    release.set()
    await asyncio.gather(*lru.tasks)
    await asyncio.sleep(0)  # the done callback runs after the task's waiters
    assert done == ["work"] and lru.tasks == set()
