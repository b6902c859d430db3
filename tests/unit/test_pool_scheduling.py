"""AdapterPool's hand-over of engine slots: arrival order, aging (busy adapters drain for a waiter),
per-tenant shares. Proven by steps, not by speed: requests hold their adapter until the test
releases them, streams overlap (the next request arrives before the previous one ends, so a hot
adapter is never idle), and every bound is a number of steps; the only clock waits are generous
ceilings on conditions that follow at once from a step."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from adapters_manifest.record import AdapterRecord
from gateway import service_rate
from gateway.engine.interface import EngineAdapter
from gateway.errors import AdapterCapacityError
from gateway.metrics import GatewayMetrics
from gateway.pool import AdapterPool, QueuedRequest, default_slots_per_user
from gateway.telemetry import spans
from tests.fakes import FakeEngine, make_record
from tests.unit.harness import FakeClock, FakeFiles, holders, until

A, B, C, D = (make_record("alice", name) for name in ("a", "b", "c", "d"))
X, Y = make_record("bob", "x"), make_record("carol", "y")
PATIENT = 3600.0  # a wait timeout no test reaches: a 503 would be a bug, never the machine's speed
NEVER = 3600.0  # an aging bound no test reaches


@pytest.fixture
def make_pool() -> Iterator[Callable[..., tuple[AdapterPool, FakeEngine]]]:
    made: list[tuple[AdapterPool, FakeEngine]] = []

    def make(capacity: int = 2, **options: object) -> tuple[AdapterPool, FakeEngine]:
        engine = FakeEngine(capacity=capacity, extra=1)
        options.setdefault("wait_timeout_s", PATIENT)
        pool = AdapterPool(engine, FakeFiles(), capacity, **options)  # type: ignore[arg-type]
        made.append((pool, engine))
        return pool, engine

    yield make
    for pool, engine in made:
        engine.check()  # never more adapters than slots, never generate or add out of turn
        assert pool.queued() == []


class Request:
    """One request: acquires its adapter for its caller and holds it until `end()`."""

    def __init__(self, pool: AdapterPool, record: AdapterRecord, user: str | None = None) -> None:
        self.record, self.user = record, user
        self.adapter: EngineAdapter | None = None
        self._holding, self._end = asyncio.Event(), asyncio.Event()
        self.task = asyncio.create_task(self._run(pool))

    async def _run(self, pool: AdapterPool) -> None:
        async with pool.acquire(self.record, self.user) as adapter:
            self.adapter = adapter
            self._holding.set()
            await self._end.wait()

    @property
    def holding(self) -> bool:
        return self._holding.is_set()

    def end(self) -> None:
        assert self.holding, f"{self.record.ref} ended before it held its adapter"
        self._end.set()


def queued(pool: AdapterPool, request: Request) -> bool:
    return QueuedRequest(request.record.versioned_ref, request.user) in pool.queued()


async def arrive(pool: AdapterPool, record: AdapterRecord, user: str | None = None) -> Request:
    """A request, once it holds its adapter or stands in the queue."""
    request = Request(pool, record, user)
    await until(lambda: request.holding or queued(pool, request), timeout_s=30)
    return request


async def holding(*requests: Request) -> None:
    await until(lambda: all(r.holding for r in requests), timeout_s=30)


async def settle() -> None:
    """Let every task that can run do so (the fake engine's calls never sleep)."""
    for _ in range(50):
        await asyncio.sleep(0)


async def finish(*requests: Request) -> None:
    """End every request (each once it holds its adapter: none may fail or time out)."""
    pending = list(requests)
    while pending:
        await until(lambda: any(r.holding for r in pending), timeout_s=30)
        for request in [r for r in pending if r.holding]:
            request.end()
            await request.task
            pending.remove(request)


class Stream:
    """Back-to-back requests for one adapter that overlap: the next one arrives before the one in
    flight ends, so the adapter always has a request in flight while the stream runs."""

    def __init__(self, pool: AdapterPool, record: AdapterRecord, user: str | None = None) -> None:
        self.pool, self.record, self.user = pool, record, user
        self.requests: list[Request] = []

    async def start(self) -> None:
        self.requests.append(await arrive(self.pool, self.record, self.user))
        await holding(self.requests[-1])

    async def step(self) -> None:
        """The next request arrives; then the oldest one holding its adapter ends."""
        self.requests.append(await arrive(self.pool, self.record, self.user))
        oldest = next((r for r in self.requests if r.holding and not r.task.done()), None)
        if oldest is not None:
            oldest.end()
            await oldest.task
        await settle()

    async def stop(self) -> None:
        await finish(*(r for r in self.requests if not r.task.done()))


# -- arrival order ---------------------------------------------------------------------------


async def test_slots_go_to_waiters_in_arrival_order(make_pool) -> None:
    pool, engine = make_pool(capacity=1, slot_aging_s=NEVER)
    first = await arrive(pool, A)
    await holding(first)
    waiters = [await arrive(pool, record) for record in (B, C, D)]
    assert [q.name for q in pool.queued()] == [B.versioned_ref, C.versioned_ref, D.versioned_ref]

    previous = first
    for index, waiter in enumerate(waiters):
        previous.end()
        await holding(waiter)
        await settle()
        assert not any(w.holding for w in waiters[index + 1 :])  # the slot went to the oldest waiter only
        await previous.task
        previous = waiter
    previous.end()
    await previous.task
    assert engine.add_calls == [A.versioned_ref, B.versioned_ref, C.versioned_ref, D.versioned_ref]


async def test_a_newcomer_does_not_take_a_free_slot_ahead_of_a_waiter(make_pool) -> None:
    """The slot a request ends is handed to the waiter at once: no newer request can slip in between."""
    pool, engine = make_pool(capacity=1, slot_aging_s=NEVER)
    first = await arrive(pool, A)
    await holding(first)
    waiter = await arrive(pool, B)
    first.end()
    newcomer = await arrive(pool, C)  # arrives while B's load is under way
    await holding(waiter)
    assert not newcomer.holding and queued(pool, newcomer)
    await finish(waiter, newcomer, first)
    assert engine.add_calls == [A.versioned_ref, B.versioned_ref, C.versioned_ref]


async def test_requests_for_the_adapter_a_waiter_loads_join_that_load(make_pool) -> None:
    pool, engine = make_pool(capacity=1, slot_aging_s=NEVER)
    first = await arrive(pool, A)
    await holding(first)
    waiters = [await arrive(pool, B) for _ in range(3)]
    first.end()
    await holding(*waiters)
    assert holders(pool) == {B.versioned_ref: 3}
    await finish(first, *waiters)
    assert engine.adds_of(B.ref) == 1


# -- aging: busy adapters drain for a waiter -------------------------------------------------


async def test_before_the_aging_bound_requests_for_busy_adapters_join_them(make_pool) -> None:
    pool, _ = make_pool(capacity=1, slot_aging_s=NEVER)
    hot = Stream(pool, A)
    await hot.start()
    cold = await arrive(pool, B)
    for _ in range(5):
        await hot.step()
        assert hot.requests[-1].holding  # joined at once: residency extends while the waiter is young
    assert queued(pool, cold) and not cold.holding
    await hot.stop()
    await finish(cold)


async def test_a_cold_adapter_gets_a_slot_while_hot_adapters_stay_busy(make_pool) -> None:
    """Two slots, two streams that never leave their adapter idle: the cold request is served within
    two steps of each stream (one drain), and every stream request is served too (no 503)."""
    pool, engine = make_pool(capacity=2, slot_aging_s=0)
    streams = [Stream(pool, A), Stream(pool, B)]
    for stream in streams:
        await stream.start()
    cold = await arrive(pool, C)
    assert queued(pool, cold)
    steps = 0
    while not cold.holding:
        steps += 1
        assert steps <= 2, "the cold adapter starved behind the hot ones"
        for stream in streams:
            await stream.step()
    assert cold.adapter is not None and cold.adapter.engine_name == C.versioned_ref
    for _ in range(6):  # the hot streams go on beside it, sharing the slots in turn
        for stream in streams:
            await stream.step()
    await finish(cold)
    for stream in streams:
        await stream.stop()
    assert all(
        r.adapter is not None and r.adapter.engine_name == r.record.versioned_ref for s in streams for r in s.requests
    )
    assert engine.peak_resident == 2


async def test_only_the_adapter_with_the_fewest_requests_in_flight_drains(make_pool) -> None:
    pool, engine = make_pool(capacity=2, slot_aging_s=0)
    busy = [await arrive(pool, A), await arrive(pool, A)]
    light = await arrive(pool, B)
    await holding(*busy, light)
    cold = await arrive(pool, C)

    joined = await arrive(pool, A)  # A has more in flight: it keeps taking newcomers
    draining = await arrive(pool, B)  # B drains for the cold request: its newcomer queues
    assert joined.holding
    assert [q.name for q in pool.queued()] == [C.versioned_ref, B.versioned_ref]

    light.end()
    await holding(cold)  # B went idle: its slot went to the oldest waiter
    assert not draining.holding
    assert (A.versioned_ref in engine.resident_names()) and (B.versioned_ref not in engine.resident_names())
    cold.end()
    await holding(draining)  # and B came back for its queued request, in its turn
    await finish(*busy, joined, light, cold, draining)
    assert engine.adds_of(B.ref) == 2


async def test_a_drain_is_called_off_when_its_waiter_leaves(make_pool) -> None:
    pool, _ = make_pool(capacity=1, slot_aging_s=0)
    first = await arrive(pool, A)
    await holding(first)
    cold = await arrive(pool, B)
    newcomer = await arrive(pool, A)
    assert queued(pool, newcomer)  # A drains for B
    cold.task.cancel()  # B's client hangs up
    with pytest.raises(asyncio.CancelledError):
        await cold.task
    await holding(newcomer)  # A takes newcomers again, and the queued one joins it
    assert holders(pool) == {A.versioned_ref: 2}
    await finish(first, newcomer)


async def test_a_waiter_cancelled_as_its_slot_is_handed_over_passes_the_slot_on(make_pool) -> None:
    pool, engine = make_pool(capacity=1, slot_aging_s=NEVER)
    first = await arrive(pool, A)
    await holding(first)
    cancelled, after = await arrive(pool, B), await arrive(pool, C)
    first.end()  # A's request ends in its next step and hands the slot to B's waiter ...
    cancelled.task.cancel()  # ... whose client has hung up by the time it runs
    with pytest.raises(asyncio.CancelledError):
        await cancelled.task
    await holding(after)  # B's load ended unheld: its slot went on to the next waiter
    await finish(first, after)
    assert engine.add_calls == [A.versioned_ref, B.versioned_ref, C.versioned_ref]
    assert holders(pool) == {C.versioned_ref: 0}


async def test_a_waiter_that_times_out_leaves_the_queue_and_holds_nothing(make_pool) -> None:
    pool, _ = make_pool(capacity=1, slot_aging_s=NEVER, wait_timeout_s=0)
    first = await arrive(pool, A)
    await holding(first)
    refused = Request(pool, B)
    with pytest.raises(Exception, match="adapter slots are busy"):
        await refused.task
    assert pool.queued() == [] and holders(pool) == {A.versioned_ref: 1}
    await finish(first)


# -- tenants ---------------------------------------------------------------------------------


def test_a_tenant_may_hold_all_slots_but_one_by_default() -> None:
    assert [default_slots_per_user(n) for n in (1, 2, 3, 8)] == [1, 1, 2, 7]


async def test_a_tenant_streaming_on_every_slot_does_not_shut_another_tenant_out(make_pool) -> None:
    """alice keeps a stream on as many adapters as there are slots; bob's own adapter is served."""
    pool, engine = make_pool(capacity=2, slot_aging_s=0)
    streams = [Stream(pool, A, "alice"), Stream(pool, B, "alice")]
    for stream in streams:
        await stream.start()
    bob = await arrive(pool, X, "bob")
    steps = 0
    while not bob.holding:
        steps += 1
        assert steps <= 2, "bob starved behind alice's streams"
        for stream in streams:
            await stream.step()
    for _ in range(4):
        for stream in streams:
            await stream.step()
    await finish(bob)
    for stream in streams:
        await stream.stop()
    assert bob.adapter is not None and bob.adapter.engine_name == X.versioned_ref
    engine.check()


async def test_a_tenant_at_its_share_waits_behind_other_tenants(make_pool) -> None:
    """Two slots (a share of one each): alice holds one alone and queued first for another, bob
    second; the slot that frees goes to bob, and alice gets the next one (nobody else waiting)."""
    pool, engine = make_pool(capacity=2, slot_aging_s=NEVER)
    alice_a, carol = await arrive(pool, A, "alice"), await arrive(pool, Y, "carol")
    await holding(alice_a, carol)
    alice_b = await arrive(pool, B, "alice")
    bob = await arrive(pool, X, "bob")
    assert [q.user for q in pool.queued()] == ["alice", "bob"]

    carol.end()
    await holding(bob)
    await settle()
    assert not alice_b.holding  # at her share: behind bob although she came first
    bob.end()
    await holding(alice_b)  # nobody else waits: she may go past her share (work-conserving)
    assert engine.resident_names() == {A.versioned_ref, B.versioned_ref}
    await finish(alice_a, carol, bob, alice_b)


async def test_a_tenant_alone_may_use_every_slot(make_pool) -> None:
    pool, engine = make_pool(capacity=3)
    requests = [await arrive(pool, record, "alice") for record in (A, B, C)]
    await holding(*requests)
    assert pool.queued() == [] and len(engine.resident_names()) == 3
    await finish(*requests)


async def test_the_share_counts_callers_not_owners(make_pool) -> None:
    """alice's public adapter held by bob's requests is bob's slot: alice is below her share."""
    pool, engine = make_pool(capacity=2, slot_aging_s=NEVER)
    bob_a, carol = await arrive(pool, A, "bob"), await arrive(pool, Y, "carol")
    await holding(bob_a, carol)
    bob_x = await arrive(pool, X, "bob")  # bob holds A alone: at his share of one
    alice_b = await arrive(pool, B, "alice")
    carol.end()
    await holding(alice_b)
    await settle()
    assert not bob_x.holding
    await finish(bob_a, carol, alice_b, bob_x)


# -- no stall, whatever the mix -----------------------------------------------------------------


@pytest.mark.parametrize("aging_s", [0.0, NEVER])
@pytest.mark.parametrize("share", [None, 1, 3])
async def test_a_random_mix_of_tenants_and_adapters_is_all_served(make_pool, aging_s: float, share: int | None) -> None:
    """Many callers, more adapters than slots, requests of random lengths (in loop steps): every
    request is served (none waits forever: the hand-over never leaves a slot free while one waits)."""
    rng = random.Random(f"{aging_s}-{share}")
    pool, engine = make_pool(capacity=3, slot_aging_s=aging_s, max_slots_per_user=share)
    records = [make_record(f"owner{i % 3}", f"x{i}") for i in range(8)]
    served: list[str] = []

    async def request(record: AdapterRecord, user: str) -> None:
        for _ in range(rng.randrange(20)):
            await asyncio.sleep(0)
        async with pool.acquire(record, user) as adapter:
            assert adapter is not None and adapter.engine_name == record.versioned_ref
            for _ in range(rng.randrange(1, 40)):
                await asyncio.sleep(0)
                assert len(engine.resident) <= 3
        served.append(record.ref)

    users = ["alice", "bob", "carol", "dan"]
    jobs = [request(rng.choice(records), rng.choice(users)) for _ in range(400)]
    await asyncio.wait_for(asyncio.gather(*jobs), 120)  # a ceiling on a stall, not a speed
    assert len(served) == 400
    assert all(r.holders == 0 for r in pool.resident())


# -- observed --------------------------------------------------------------------------------


async def test_the_acquire_span_and_the_metrics_tell_the_queue_position_and_the_wait() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    engine = FakeEngine(capacity=1, extra=1)
    registry = CollectorRegistry()
    tracer = provider.get_tracer("test")
    pool = AdapterPool(engine, FakeFiles(), 1, wait_timeout_s=PATIENT, tracer=tracer, metrics=GatewayMetrics(registry))
    first = await arrive(pool, A)
    await holding(first)
    second, third = await arrive(pool, B), await arrive(pool, C)
    assert registry.get_sample_value("lora_gateway_requests_queued", {"waiting_for": "adapter_slot"}) == 2
    await finish(first, second, third)
    assert registry.get_sample_value("lora_gateway_requests_queued", {"waiting_for": "adapter_slot"}) == 0
    assert registry.get_sample_value("lora_gateway_adapter_slot_wait_seconds_count") == 2  # the two that queued

    acquires = {
        s.attributes[spans.ADAPTER_NAME]: s.attributes for s in exporter.get_finished_spans() if s.name == spans.ACQUIRE
    }
    assert acquires["a"][spans.ACQUIRE_QUEUE_POSITION] == 0 and acquires["a"][spans.ACQUIRE_SLOT_WAIT] == 0
    assert acquires["b"][spans.ACQUIRE_QUEUE_POSITION] == 1 and acquires["c"][spans.ACQUIRE_QUEUE_POSITION] == 2
    assert acquires["b"][spans.ACQUIRE_SLOT_WAIT] > 0 and acquires["c"][spans.ACQUIRE_SLOT_WAIT] > 0
    # The load B's waiter started when A's slot was handed to it is a child of B's acquire.
    by_id = {s.context.span_id: s for s in exporter.get_finished_spans()}
    register_b = next(
        s for s in exporter.get_finished_spans() if s.name == spans.REGISTER and s.attributes[spans.ADAPTER_NAME] == "b"
    )
    assert register_b.parent is not None and by_id[register_b.parent.span_id].attributes[spans.ADAPTER_NAME] == "b"
    assert by_id[register_b.parent.span_id].name == spans.ACQUIRE


# -- a bounded queue with a deadline ----------------------------------------------------------


async def test_a_full_queue_refuses_at_once_with_retry_after(make_pool) -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    pool, _ = make_pool(capacity=1, slot_aging_s=NEVER, max_queued=2, metrics=metrics)
    first = await arrive(pool, A)
    waiters = [await arrive(pool, record) for record in (B, C)]
    with pytest.raises(AdapterCapacityError) as refused:
        async with pool.acquire(D, "alice"):
            pass
    assert refused.value.status == 503 and refused.value.retry_after_s == 1
    assert "2 requests wait" in str(refused.value)
    assert metrics.admission_refusals.labels("adapter_slot", "full")._value.get() == 1
    assert len(pool.queued()) == 2  # those in line keep their place
    await finish(first, *waiters)


async def test_a_newcomer_the_slots_cannot_serve_in_time_is_refused_at_once(make_pool, monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(service_rate, "time", SimpleNamespace(monotonic=clock.monotonic))
    metrics = GatewayMetrics(CollectorRegistry())
    pool, _ = make_pool(capacity=1, slot_aging_s=NEVER, wait_timeout_s=30.0, metrics=metrics)
    # One slot, handed to the next waiter every 10 s of waiting.
    holder = await arrive(pool, A)
    await holding(holder)
    records = [make_record("alice", f"m{i}") for i in range(12)]
    for record in records[:9]:
        waiter = await arrive(pool, record)
        clock.now += 10
        holder.end()
        await holder.task
        await holding(waiter)
        holder = waiter
    backlog = [await arrive(pool, record) for record in records[9:12]]  # 3 in line: a 4th waits ~40 s
    with pytest.raises(AdapterCapacityError) as refused:
        async with pool.acquire(B, "bob"):
            pass
    assert refused.value.retry_after_s == 40
    assert "3 requests wait ahead" in str(refused.value)
    assert metrics.admission_refusals.labels("adapter_slot", "estimate")._value.get() == 1
    assert len(pool.queued()) == 3
    await finish(holder, *backlog)


# -- warm adapters pinned -------------------------------------------------------------------------


async def test_warm_adapters_are_loaded_before_anyone_asks_and_never_evicted(make_pool) -> None:
    warm_a, warm_b, warm_c = (make_record("alice", name, warm=True) for name in ("w1", "w2", "w3"))
    pool, engine = make_pool(capacity=3, slot_aging_s=0, warm_slots=2)
    pool.keep_warm([warm_c, B, warm_b, warm_a])  # two of three warm ones fit: by ref
    await until(lambda: all(r.loaded for r in pool.resident()) and len(pool.resident()) == 2, timeout_s=30)
    assert {r.name for r in pool.resident() if r.pinned} == {warm_a.versioned_ref, warm_b.versioned_ref}
    # Cold adapters churn through the one slot left; the warm ones stay, and serve at once.
    for record in (B, C, D, X, Y):
        request = await arrive(pool, record, "bob")
        await finish(request)
    assert {warm_a.versioned_ref, warm_b.versioned_ref} <= {r.name for r in pool.resident()}
    adds = len(engine.add_calls)
    hot = await arrive(pool, warm_a, "carol")
    assert hot.holding and len(engine.add_calls) == adds
    # A waiter past the aging bound drains a busy cold adapter, never a pinned one.
    cold = await arrive(pool, C, "dave")
    await holding(cold)
    waiter = await arrive(pool, D, "erin")
    await settle()
    assert not pool._entries[warm_a.versioned_ref].draining
    await finish(cold, waiter, hot)


async def test_an_adapter_no_longer_warm_is_an_ordinary_one_again(make_pool) -> None:
    warm = make_record("alice", "w1", warm=True)
    pool, _ = make_pool(capacity=2, slot_aging_s=NEVER, warm_slots=1)
    pool.keep_warm([warm])
    await until(lambda: [r.pinned for r in pool.resident()] == [True], timeout_s=30)
    pool.keep_warm([make_record("alice", "w1", warm=False)])  # the same version, flag cleared
    assert [r.pinned for r in pool.resident()] == [False]
    for record in (B, C):  # it is evicted like any idle adapter
        await finish(await arrive(pool, record))
    assert warm.versioned_ref not in {r.name for r in pool.resident()}


async def test_warm_adapters_wait_their_turn_behind_queued_requests(make_pool) -> None:
    warm = make_record("alice", "w1", warm=True)
    pool, engine = make_pool(capacity=2, slot_aging_s=NEVER, warm_slots=1)
    held = [await arrive(pool, record) for record in (A, B)]
    waiter = await arrive(pool, C)
    pool.keep_warm([warm])
    assert warm.versioned_ref not in engine.add_calls  # no slot taken ahead of the waiter
    await finish(*held, waiter)
    for _ in range(600):  # the syncs after: once a slot is free (the grace of the adapters just used over)
        pool.keep_warm([warm])
        if warm.versioned_ref in {r.name for r in pool.resident() if r.pinned}:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the warm adapter never got a free slot")


# -- a tenant past its share keeps off the slots of tenants below theirs ------------------------------


async def test_between_its_requests_a_tenants_adapter_is_kept_from_a_tenant_past_its_share(make_pool) -> None:
    pool, _ = make_pool(capacity=3, slot_aging_s=30.0, max_slots_per_user=2)
    alice = [await arrive(pool, record, "alice") for record in (A, B)]  # alice at her share
    await holding(*alice)
    bob = await arrive(pool, X, "bob")
    await holding(bob)
    bob.end()
    await bob.task  # bob's adapter idle between his requests
    third = await arrive(pool, C, "alice")
    assert queued(pool, third), "alice, past her share, took the slot bob had just used"
    again = await arrive(pool, X, "bob")
    assert again.holding  # his next request finds his adapter resident
    await finish(again)
    # Once the grace is over (at most MAX_SHARE_GRACE_S), alice gets the slot bob left: never left idle.
    await until(lambda: third.holding, timeout_s=30)
    await finish(third, *alice)


async def test_a_waiter_past_its_share_drains_its_own_adapter_not_another_tenants(make_pool) -> None:
    pool, _ = make_pool(capacity=3, slot_aging_s=0, max_slots_per_user=2)
    alice = [Stream(pool, record, "alice") for record in (A, B)]
    bob = Stream(pool, X, "bob")
    for stream in (*alice, bob):
        await stream.start()
    extra = [await arrive(pool, record, "alice") for record in (A, B)]  # bob's has the fewest requests in flight
    await holding(*extra)
    waiter = await arrive(pool, C, "alice")
    for step in range(6):
        await settle()
        assert not pool._entries[X.versioned_ref].draining, "bob's adapter drained for alice past her share"
        if step == 0:
            await finish(*extra)
        for stream in (*alice, bob):
            await stream.step()
        if waiter.holding:
            break
    assert waiter.holding, "alice's waiter got none of her own slots"
    for stream in (*alice, bob):
        await stream.stop()
    await finish(waiter)
