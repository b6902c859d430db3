"""Names not yet synced are looked up in the store (one's own namespace only): misses are
remembered for a short time, concurrent look-ups of one name share one store read, and each user
has a bounded number of look-ups at once (then a queue, then 429), so a flood of misses neither
hammers the store nor waits in line with everyone else's."""

from __future__ import annotations

import asyncio
import time

from adapters_manifest.record import AdapterRecord
from gateway.app_keys import CATALOG, STORE
from tests.fakes import publish_adapter
from tests.unit.harness import BASE, Gateway, StartGateway, assert_error, completion


class CountingReads:
    """Wraps the store's get_record: counts reads, and those running at once; can hold them."""

    def __init__(self, gw: Gateway) -> None:
        self._read = gw.app[STORE].get_record
        self.reads: list[tuple[str, str]] = []
        self.running = self.peak = 0
        self.gate: asyncio.Event | None = None
        gw.app[STORE].get_record = self.get_record  # type: ignore[method-assign]

    async def get_record(self, owner: str, name: str) -> AdapterRecord | None:
        self.reads.append((owner, name))
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            return await self._read(owner, name)
        finally:
            self.running -= 1


async def statuses(gw: Gateway, models: list[str]) -> list[int]:
    async def one(model: str) -> int:
        resp = await gw.post("/v1/completions", completion(model))
        await resp.read()
        return resp.status

    return await asyncio.gather(*(one(model) for model in models))


async def test_concurrent_misses_of_one_name_are_one_store_read(start_gateway: StartGateway) -> None:
    gw = await start_gateway(adapter_miss_ttl_s=60)
    store = CountingReads(gw)
    assert await statuses(gw, ["dev/missing"] * 200) == [404] * 200
    assert store.reads == [("dev", "missing")]
    assert await statuses(gw, ["missing"] * 50) == [404] * 50  # remembered: no read at all
    assert len(store.reads) == 1


async def test_a_remembered_miss_is_read_again_after_its_time(start_gateway: StartGateway) -> None:
    gw = await start_gateway(adapter_miss_ttl_s=0.2)
    store = CountingReads(gw)
    resp = await gw.post("/v1/completions", completion("dev/later"))
    await assert_error(resp, 404, param="model", code="model_not_found")
    # Published by another replica meanwhile: served once the miss is forgotten.
    await publish_adapter(gw.store, gw.scratch, "dev", "later", base_model=BASE)
    deadline = time.monotonic() + 10
    while (await gw.post("/v1/completions", completion("dev/later"))).status != 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert 2 <= len(store.reads) <= 3


async def test_an_upload_here_is_served_at_once_despite_a_remembered_miss(start_gateway: StartGateway) -> None:
    gw = await start_gateway(adapter_miss_ttl_s=60)
    assert (await gw.post("/v1/completions", completion("dev/fresh"))).status == 404
    record = await publish_adapter(gw.store, gw.scratch, "dev", "fresh", base_model=BASE)
    gw.app[CATALOG].add(record)  # what POST /v1/adapters does
    resp = await gw.post("/v1/completions", completion("dev/fresh"))
    assert resp.status == 200, await resp.text()


async def test_a_flood_of_distinct_misses_is_admitted_before_it_reaches_the_store(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(max_store_lookups_per_user=4, max_queued_per_user=16, queue_timeout_s=30)
    store = CountingReads(gw)
    store.gate = asyncio.Event()
    flood = [asyncio.create_task(statuses(gw, [f"dev/miss-{i}"])) for i in range(200)]
    deadline = time.monotonic() + 10
    while sum(task.done() for task in flood) < 200 - 4 - 16:  # those beyond the queue: at once
        assert time.monotonic() < deadline, (store.running, sum(task.done() for task in flood))
        await asyncio.sleep(0.01)
    assert store.running == 4 and len(store.reads) == 4  # the rest wait, not read
    assert [task.result() for task in flood if task.done()] == [[429]] * (200 - 4 - 16)
    store.gate.set()
    answers = [status for [status] in await asyncio.gather(*flood)]
    assert answers.count(404) == 4 + 16 and answers.count(429) == 200 - 4 - 16
    assert store.peak == 4 and len(store.reads) == 4 + 16
