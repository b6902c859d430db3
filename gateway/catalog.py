"""AdapterCatalog: which adapters exist (synced from the store), and what a request's `model` names.

Sync: a full listing at start, then polling. Each poll is one cheap listing of record stamps
(ETags); only records whose stamp changed are read. A version that changed or a record that
disappeared is handed to `on_retired`, which takes it out of the engine and off the disk once
its last request ends. A failed poll changes nothing: what is known keeps being served.
Each sync is a trace of its own (`adapter.sync`), linked to the request that asked for it, if any.

A name not yet synced, in the caller's own namespace, is looked up in the store. Those look-ups
are admitted per user first (a few at once, then a queue, then 429: `lookups`), concurrent ones
for one name share one read, and a miss is remembered for `miss_ttl_s` (a flood of misses costs
the store next to nothing; a name published meanwhile on another replica waits that long).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.trace import Tracer

from adapters_manifest.record import AdapterRecord, check_name
from adapters_manifest.store import AdapterStore
from gateway.auth.keys import Principal
from gateway.errors import ModelNotFoundError
from gateway.fair_share import UserLimiter
from gateway.metrics import GatewayMetrics, detached_metrics
from gateway.telemetry import spans

log = logging.getLogger(__name__)

MAX_PARALLEL_READS = 16
MAX_REMEMBERED_MISSES = 10_000  # names sprayed at random must not grow memory without bound


@dataclass(frozen=True)
class SyncResult:
    listed: int
    changed: int
    removed: int


class AdapterCatalog:
    def __init__(
        self,
        store: AdapterStore,
        base_model_name: str,
        on_retired: Callable[[AdapterRecord], None] = lambda record: None,
        tracer: Tracer | None = None,
        metrics: GatewayMetrics | None = None,
        lookups: UserLimiter | None = None,
        miss_ttl_s: float = 5.0,
    ) -> None:
        self._store = store
        self._lookups = lookups or UserLimiter(max_running=4, max_queued=64, queue_timeout_s=30.0)
        self._miss_ttl_s = miss_ttl_s
        self._misses: OrderedDict[str, float] = OrderedDict()  # ref -> forgotten at (monotonic)
        self._reading: dict[str, asyncio.Future[AdapterRecord | None]] = {}  # ref -> the read in flight
        self.base_model_name = base_model_name
        self._on_retired = on_retired
        self._records: dict[str, AdapterRecord] = {}
        self._sorted_refs: list[str] | None = None  # rebuilt on the first listing after a change
        self._stamps: dict[str, str] = {}
        self.last_success: float | None = None  # time.monotonic() of the last good sync
        self.last_error: str | None = None
        self._tracer = tracer or trace.NoOpTracer()
        self._metrics = metrics or detached_metrics()

    @property
    def synced(self) -> bool:
        return self.last_success is not None

    def seconds_since_sync(self) -> float | None:
        return None if self.last_success is None else time.monotonic() - self.last_success

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[AdapterRecord]:
        return sorted(self._records.values(), key=lambda r: r.ref)

    async def sync(self) -> SyncResult:
        """One poll; raises (and remembers the error) when the store fails, changing nothing."""
        context, links = spans.root_context_linked_to_current()
        attributes = {spans.SYNC_SOURCE: spans.store_source(self._store.url)}
        with self._tracer.start_as_current_span(spans.SYNC, context, links=links, attributes=attributes) as span:
            try:
                result = await self._sync()
            except Exception:  # the span records the exception; its status says why
                span.set_attribute(spans.SYNC_ERRORS, 1)
                self._metrics.syncs.labels("error").inc()
                raise
            span.set_attributes(
                {
                    spans.SYNC_LISTED: result.listed,
                    spans.SYNC_CHANGED: result.changed,
                    spans.SYNC_REMOVED: result.removed,
                    spans.SYNC_ERRORS: 0,
                }
            )
        self._metrics.syncs.labels("ok").inc()
        return result

    async def _sync(self) -> SyncResult:
        try:
            # Judged by this listing: what a look-up adds while it runs is left to the next poll.
            known = set(self._records)
            stamps = await self._store.list_stamps()
            changed = [ref for ref, stamp in stamps.items() if self._stamps.get(ref) != stamp]
            reads = asyncio.Semaphore(MAX_PARALLEL_READS)

            async def read(ref: str) -> AdapterRecord | None:
                async with reads:
                    return await self._store.get_record(*ref.split("/", 1))

            fresh = await asyncio.gather(*(read(ref) for ref in changed))
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise
        for ref, record in zip(changed, fresh):
            if record is None:  # deleted between the listing and the read
                stamps.pop(ref)
            else:
                self._replace(ref, record)
        removed = [ref for ref in self._records if ref not in stamps and ref in known]
        for ref in removed:
            self._replace(ref, None)
        self._stamps = stamps
        self.last_success, self.last_error = time.monotonic(), None
        return SyncResult(listed=len(stamps), changed=len(changed), removed=len(removed))

    def _replace(self, ref: str, record: AdapterRecord | None) -> None:
        old = self._records.pop(ref, None)
        if record is not None:
            self._records[ref] = record
            self._misses.pop(ref, None)
        if (old is None) != (record is None):
            self._sorted_refs = None
        if old is not None and (record is None or record.version != old.version):
            log.info(
                "catalog: %s version %s retired (%s)",
                ref,
                old.version,
                "deleted" if record is None else f"now {record.version}",
            )
            self._on_retired(old)

    def may_use(self, principal: Principal, record: AdapterRecord) -> bool:
        """Own adapters, public ones, and (for admins) every one."""
        return principal.admin or record.owner == principal.user or record.visibility == "public"

    def visible_records(self, principal: Principal) -> list[AdapterRecord]:
        return [r for r in self.records() if self.may_use(principal, r)]

    def owned_by(self, owner: str) -> list[AdapterRecord]:
        """`owner`'s records in ref order; a slice of the sorted refs, not a walk of the catalog."""
        refs = self._refs_in_order()
        start = bisect.bisect_left(refs, f"{owner}/")
        end = bisect.bisect_left(refs, f"{owner}0")  # '0' follows '/': past every `owner/...`
        return [self._records[ref] for ref in refs[start:end]]

    def _refs_in_order(self) -> list[str]:
        if self._sorted_refs is None:
            self._sorted_refs = sorted(self._records)
        return self._sorted_refs

    def visible_page(self, principal: Principal, after: str | None, limit: int) -> tuple[list[AdapterRecord], bool]:
        """Up to `limit` records `principal` may use, in ref order, after ref `after`; and whether
        more follow. Stops at the first one past the page: a page costs its size, not the catalog's."""
        refs = self._refs_in_order()
        page: list[AdapterRecord] = []
        for ref in itertools.islice(refs, bisect.bisect_right(refs, after) if after else 0, None):
            record = self._records[ref]
            if self.may_use(principal, record):
                if len(page) == limit:
                    return page, True
                page.append(record)
        return page, False

    async def resolve(self, model: str, principal: Principal) -> AdapterRecord | None:
        """None for the base model; the record `model` names if `principal` may use it; else
        ModelNotFoundError, the same answer whether the adapter is missing or someone else's.

        `name` alone means the caller's own `principal.user/name`."""
        if model == self.base_model_name:
            return None
        owner, slash, name = model.rpartition("/")
        owner = owner if slash else principal.user
        try:
            check_name(owner, "owner")
            check_name(name)
        except ValueError:
            # Never touch the store with a name that could not exist (traversal, odd bytes).
            raise ModelNotFoundError(model) from None
        ref = f"{owner}/{name}"
        record = self._records.get(ref)
        if record is None and (owner == principal.user or principal.admin):
            # Not seen yet: it may have been published since the last poll. Only in one's own
            # namespace: a look-up elsewhere would answer faster for names that exist (an
            # existence oracle); other users' public adapters appear with the next poll.
            record = await self._look_up(owner, name, principal.user)
        if record is None or not self.may_use(principal, record):
            raise ModelNotFoundError(model)
        return record

    async def _look_up(self, owner: str, name: str, user: str) -> AdapterRecord | None:
        """One store read per name at a time, admitted for `user`; a miss is remembered a while."""
        ref = f"{owner}/{name}"
        forgotten_at = self._misses.get(ref)
        if forgotten_at is not None and time.monotonic() < forgotten_at:
            return None
        self._misses.pop(ref, None)
        reading = self._reading.get(ref)
        if reading is None:
            # A task of its own: a caller that hangs up does not cancel the read others wait for.
            reading = asyncio.ensure_future(self._admitted_read(owner, name, user))
            self._reading[ref] = reading
            reading.add_done_callback(lambda done: self._reading.pop(ref, None))
            reading.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved
        return await asyncio.shield(reading)

    async def _admitted_read(self, owner: str, name: str, user: str) -> AdapterRecord | None:
        async with self._lookups.admit(user):  # RateLimitError (429) beyond the user's queue
            record = await self._store.get_record(owner, name)  # an outage: 503 (errors.py)
        ref = f"{owner}/{name}"
        if record is None:
            self._remember_miss(ref)
        elif ref not in self._records:  # a sync may have brought it meanwhile
            self._replace(ref, record)
        return record

    def _remember_miss(self, ref: str) -> None:
        if self._miss_ttl_s <= 0:
            return
        self._misses[ref] = time.monotonic() + self._miss_ttl_s
        self._misses.move_to_end(ref)
        while len(self._misses) > MAX_REMEMBERED_MISSES:
            self._misses.popitem(last=False)

    def add(self, record: AdapterRecord) -> None:
        """This replica published the adapter itself: serve it without waiting for a poll."""
        self._replace(record.ref, record)

    def forget(self, ref: str) -> None:
        """This replica deleted the adapter itself: stop serving it without waiting for a poll."""
        self._stamps.pop(ref, None)
        self._replace(ref, None)

    async def poll_forever(self, interval_s: float) -> None:
        """Sync every `interval_s`; the first attempt at once, failures retried at the same pace."""
        while True:
            started = time.monotonic()
            try:
                result = await self.sync()
                if result.changed or result.removed:
                    log.info("sync: %d listed, %d changed, %d removed", result.listed, result.changed, result.removed)
            except Exception:
                log.warning("sync of %s failed; serving what is known: %s", self._store.url, self.last_error)
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))
