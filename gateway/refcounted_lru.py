"""RefcountedLRU: keyed entries loaded once, held by refcount, evicted idle and least recently used first.

The one machine under both adapter tiers: the disk cache's versions and the pool's engine-resident
adapters. Each tier keeps its own policy on top (what to evict and when, what leaving costs).
Guarantees:
- one load per key: `start` adds the entry with its `loaded` future before anything awaits, so
  concurrent acquirers of the key find it and share that load (a second `start` is refused);
- a failed load leaves at once (`set_failed`): it is never handed out again, the next acquirer
  loads anew; so an entry here whose load is done loaded fine;
- an entry held (refcount above 0) or still loading is never evicted; idle ones are listed least
  recently used first, recency counting from the last release;
- a retired entry is dropped when its last holder releases (at once if idle); holding it again
  takes the retirement back (a caller resolved it as current: it was published again);
- the tasks it spawns stay referenced until done (the loop keeps only weak references to tasks).

It never awaits and does no I/O: each change returns the entry's `EntryState`, and the tier does
what that costs (remove the adapter from the engine, delete a folder, hand a slot on).
"""

from __future__ import annotations

import asyncio
import enum
from collections import OrderedDict
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar


class EntryState(enum.Enum):
    """Where an entry stands after a change: what, if anything, the tier has to act on."""

    HELD = "held"  # requests hold it
    LOADING = "loading"  # no holders, its load still running: the load's end decides
    IDLE = "idle"  # loaded, no holders: evictable
    DROPPED = "dropped"  # retired and idle: out of the LRU now, the tier cleans up after it
    ABSENT = "absent"  # not in the LRU: never added, failed, or already dropped or evicted


def _new_future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


@dataclass(kw_only=True)
class LruEntry:
    """What the LRU keeps per key; a tier subclasses it with its own fields."""

    key: str
    loaded: asyncio.Future[None] = field(default_factory=_new_future)
    holders: int = 0
    retired: bool = False

    @property
    def idle(self) -> bool:
        """Loaded and held by nobody: evictable."""
        return self.holders == 0 and self.loaded.done()


E = TypeVar("E", bound=LruEntry)


class RefcountedLRU(Mapping[str, E]):
    """Entries by key, least recently used first (as a mapping: iteration, `get`, `in`, `len`)."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, E] = OrderedDict()
        self.tasks: set[asyncio.Task[None]] = set()

    def __getitem__(self, key: str) -> E:
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def _is_current(self, entry: E) -> bool:
        return self._entries.get(entry.key) is entry

    def start(self, entry: E, load: Coroutine[Any, Any, None]) -> E:
        """Add `entry` (loading, most recently used) and run `load` in a task (in this context), which
        ends with `set_loaded` or `set_failed`."""
        if entry.key in self._entries:
            load.close()
            raise ValueError(f"{entry.key} is loaded or loading already")
        # A load that fails after every holder left must not warn "exception never retrieved".
        entry.loaded.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._entries[entry.key] = entry
        self.spawn(load)
        return entry

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def hold(self, entry: E) -> bool:
        """Count a holder in (synchronously: a held entry is never evicted); whether it is loaded."""
        entry.holders += 1
        entry.retired = False
        self._entries.move_to_end(entry.key)
        return entry.loaded.done()

    def release(self, entry: E) -> EntryState:
        """Count a holder out: the last one makes a loaded entry idle (most recently used), or drops it
        if retired."""
        entry.holders -= 1
        if entry.holders > 0:
            return EntryState.HELD
        if not self._is_current(entry):
            return EntryState.ABSENT
        if not entry.loaded.done():
            return EntryState.LOADING
        if entry.retired:
            del self._entries[entry.key]
            return EntryState.DROPPED
        self._entries.move_to_end(entry.key)
        return EntryState.IDLE

    def touch(self, entry: E) -> None:
        """Make it the most recently used."""
        self._entries.move_to_end(entry.key)

    def set_loaded(self, entry: E) -> EntryState:
        """Its load succeeded: holders go on with it; without any it is idle, or dropped if retired."""
        entry.loaded.set_result(None)
        if entry.holders > 0:
            return EntryState.HELD
        if not self._is_current(entry):
            return EntryState.ABSENT
        if entry.retired:
            del self._entries[entry.key]
            return EntryState.DROPPED
        return EntryState.IDLE

    def set_failed(self, entry: E, error: Exception | None) -> None:
        """Its load failed (None: it was cancelled): out now, so that the next acquirer loads anew; its
        holders get `error`."""
        if self._is_current(entry):
            del self._entries[entry.key]
        if error is None:
            entry.loaded.cancel()
        else:
            entry.loaded.set_exception(error)

    def retire(self, entry: E) -> EntryState:
        """No longer current: dropped now if idle, else when its last holder releases (or its load ends)."""
        entry.retired = True
        if not self._is_current(entry):
            return EntryState.ABSENT
        if entry.idle:
            del self._entries[entry.key]
            return EntryState.DROPPED
        return EntryState.HELD if entry.holders > 0 else EntryState.LOADING

    def idle(self) -> Iterator[E]:
        """The idle entries, least recently used first."""
        return (e for e in self._entries.values() if e.idle)

    def evict(self, entry: E) -> None:
        """Take an idle entry out (which one is the tier's policy)."""
        if not (self._is_current(entry) and entry.idle):
            raise ValueError(f"{entry.key} is held, loading or gone: only idle entries are evicted")
        del self._entries[entry.key]
