"""AdapterPool against the fake engine: single flight, LRU of idle adapters, refcounts, waiting,
failures remembered for a while, and never more adapters in the engine than it has room for."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vllm.sampling_params import RequestOutputKind, SamplingParams

from adapters_manifest.record import AdapterRecord
from adapters_manifest.store import StoreUnavailableError
from gateway.engine.interface import EngineAdapter
from gateway.engine.vllm_engine import lora_request
from gateway.errors import AdapterCapacityError, AdapterLoadFailedError, ServiceUnavailableError
from gateway.pool import AdapterPool
from tests.fakes import FakeEngine, expected_text, make_record
from tests.unit.harness import FakeFiles, hold_until, holders, until

A, B, C, D = (make_record("alice", name) for name in ("a", "b", "c", "d"))


@pytest.fixture
def make_pool() -> Iterator[Callable[..., tuple[AdapterPool, FakeEngine]]]:

    def make(
        capacity: int = 2,
        wait_timeout_s: float = 5.0,
        failure_ttl_s: float = 60.0,
        files: FakeFiles | None = None,
        **engine_options: object,
    ) -> tuple[AdapterPool, FakeEngine]:
        engine = FakeEngine(capacity=capacity, extra=1, **engine_options)  # +1: the base zero adapter
        files = files or FakeFiles()
        pool = AdapterPool(engine, files, capacity, wait_timeout_s=wait_timeout_s, failure_ttl_s=failure_ttl_s)
        made.append((pool, engine, files))
        return pool, engine

    made: list[tuple[AdapterPool, FakeEngine, FakeFiles]] = []
    yield make
    for pool, engine, files in made:
        engine.check()  # no guarantee the gateway owes the engine was broken, in any test
        # Files stay pinned exactly while the engine holds the version.
        resident = {r.name for r in pool.resident() if r.loaded}
        assert {name for name, n in files.pins.items() if n} <= resident | {r.name for r in pool.resident()}
        assert all(n in (0, 1) for n in files.pins.values()), files.pins


async def use(pool: AdapterPool, record: AdapterRecord | None) -> EngineAdapter | None:
    async with pool.acquire(record) as adapter:
        return adapter


# -- single flight -----------------------------------------------------------------------


async def test_concurrent_first_acquires_share_one_registration(make_pool) -> None:
    pool, engine = make_pool(add_delay_s=0.05)
    inside = asyncio.Event()
    seen: list[EngineAdapter | None] = []

    async def request() -> None:
        async with pool.acquire(A) as adapter:
            seen.append(adapter)
            await inside.wait()

    tasks = [asyncio.create_task(request()) for _ in range(50)]
    await until(lambda: len(seen) == 50)
    assert holders(pool) == {A.versioned_ref: 50}
    inside.set()
    await asyncio.gather(*tasks)

    assert engine.add_calls == [A.versioned_ref]
    assert len({a.engine_id for a in seen if a is not None}) == 1
    assert seen[0] == EngineAdapter(seen[0].engine_id, A.versioned_ref, Path("/adapters") / A.versioned_ref)
    assert holders(pool) == {A.versioned_ref: 0}


async def test_resident_adapter_is_reused_without_reloading(make_pool) -> None:
    pool, engine = make_pool()
    first = await use(pool, A)
    second = await use(pool, A)
    assert first == second
    assert engine.add_calls == [A.versioned_ref]


async def test_a_new_version_is_a_different_engine_adapter(make_pool) -> None:
    pool, engine = make_pool()
    old, new = make_record("alice", "a", b"v1"), make_record("alice", "a", b"v2")
    assert old.version != new.version
    first, second = await use(pool, old), await use(pool, new)
    assert first is not None and second is not None
    assert first.engine_id != second.engine_id
    assert engine.add_calls == [old.versioned_ref, new.versioned_ref]


# -- eviction ----------------------------------------------------------------------------


async def test_least_recently_used_idle_adapter_is_removed_before_the_new_one_is_added(make_pool) -> None:
    pool, engine = make_pool(capacity=2)
    await use(pool, A)
    await use(pool, B)
    await use(pool, A)  # B is now the least recently used
    await use(pool, C)

    kinds = [(e.kind, e.engine_name) for e in engine.events]
    assert kinds == [
        ("add", A.versioned_ref),
        ("add", B.versioned_ref),
        ("remove", B.versioned_ref),
        ("add", C.versioned_ref),
    ]
    assert engine.resident_names() == {A.versioned_ref, C.versioned_ref}
    assert set(holders(pool)) == {A.versioned_ref, C.versioned_ref}


async def test_recency_counts_from_the_end_of_a_request(make_pool) -> None:
    """An adapter busy with a long request was used more recently than one whose short request ended earlier."""
    pool, engine = make_pool(capacity=2)
    long_done = asyncio.Event()

    task = hold_until(pool, A, long_done)
    await until(lambda: holders(pool).get(A.versioned_ref) == 1)
    await use(pool, B)  # starts after A's request, ends before it
    long_done.set()
    await task

    await use(pool, C)
    removed = [e.engine_name for e in engine.events if e.kind == "remove"]
    assert removed == [B.versioned_ref]


async def test_an_adapter_held_by_a_request_is_never_evicted(make_pool) -> None:
    pool, engine = make_pool(capacity=2)
    done = asyncio.Event()

    task = hold_until(pool, A, done)
    await until(lambda: holders(pool).get(A.versioned_ref) == 1)
    for record in (B, C, D, B, C, D):
        await use(pool, record)
        assert A.versioned_ref in engine.resident_names()
    assert A.versioned_ref not in [e.engine_name for e in engine.events if e.kind == "remove"]
    done.set()
    await task
    assert engine.peak_resident == 2


async def test_engine_never_holds_more_than_capacity_plus_base(make_pool, tmp_path: Path) -> None:
    pool, engine = make_pool(capacity=3, add_delay_s=0.001)
    await pool.register_base_adapter(tmp_path)
    records = [make_record("bob", f"x{i}") for i in range(8)]
    rng = random.Random(7)

    async def request(record: AdapterRecord | None) -> None:
        await asyncio.sleep(rng.random() * 0.01)
        async with pool.acquire(record):
            await asyncio.sleep(rng.random() * 0.005)
            assert engine.peak_resident <= 4
            assert len(pool.resident()) <= 3

    population: list[AdapterRecord | None] = [*records, None]
    await asyncio.gather(*(request(rng.choice(population)) for _ in range(300)))
    assert engine.peak_resident == 4  # the three user slots were all used, plus the base adapter
    assert "__base__" in engine.resident_names()
    assert all(r.holders == 0 for r in pool.resident())
    assert len(engine.resident) == len(pool.resident()) + 1


# -- references are released however a request ends --------------------------------------


async def test_reference_released_when_the_body_raises(make_pool) -> None:
    pool, _ = make_pool(capacity=1)
    with pytest.raises(RuntimeError, match="boom"):
        async with pool.acquire(A):
            assert holders(pool) == {A.versioned_ref: 1}
            raise RuntimeError("boom")
    assert holders(pool) == {A.versioned_ref: 0}
    await use(pool, B)  # A was idle again, so it could make room


async def test_reference_released_when_the_request_is_cancelled(make_pool) -> None:
    """A client disconnect cancels the handler while it generates."""
    pool, engine = make_pool(capacity=1, wait_timeout_s=0.5)
    generating = asyncio.Event()

    async def request() -> None:
        async with pool.acquire(A):
            generating.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(request())
    await generating.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert holders(pool) == {A.versioned_ref: 0}
    await use(pool, B)
    assert [e.kind for e in engine.events] == ["add", "remove", "add"]


async def test_request_cancelled_while_its_adapter_loads_leaves_the_load_usable(make_pool) -> None:
    gate = asyncio.Event()
    pool, engine = make_pool(capacity=1, add_gate=gate)
    task = asyncio.create_task(use(pool, A))
    await until(lambda: engine.add_calls == [A.versioned_ref])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert holders(pool) == {A.versioned_ref: 0}
    gate.set()
    assert await use(pool, A) is not None
    assert engine.add_calls == [A.versioned_ref]  # the load went on and is reused


async def test_waiter_proceeds_when_an_abandoned_load_finishes(make_pool) -> None:
    """The only slot's load loses its last request; once it completes it is idle and evictable,
    so a request waiting for a slot must proceed then, not at its timeout."""
    gate = asyncio.Event()
    pool, engine = make_pool(capacity=1, wait_timeout_s=3.0, add_gate=gate)
    abandoned = asyncio.create_task(use(pool, A))
    await until(lambda: engine.add_calls == [A.versioned_ref])
    abandoned.cancel()
    waiter = asyncio.create_task(use(pool, B))
    await asyncio.sleep(0.05)
    assert not waiter.done()  # A is still loading: nothing can be evicted yet
    gate.set()
    started = time.monotonic()
    adapter = await asyncio.wait_for(waiter, 1.0)
    assert adapter is not None and adapter.engine_name == B.versioned_ref
    assert time.monotonic() - started < 1.0


async def test_request_cancelled_while_waiting_for_a_slot_holds_nothing(make_pool) -> None:
    pool, _ = make_pool(capacity=1)
    done = asyncio.Event()

    holder = hold_until(pool, A, done)
    await until(lambda: holders(pool).get(A.versioned_ref) == 1)
    waiter = asyncio.create_task(use(pool, B))
    await asyncio.sleep(0.02)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert holders(pool) == {A.versioned_ref: 1}
    done.set()
    await holder
    assert holders(pool) == {A.versioned_ref: 0}


# -- every slot busy ------------------------------------------------------------------------


async def test_waiting_request_proceeds_as_soon_as_a_slot_is_released(make_pool) -> None:
    pool, engine = make_pool(capacity=1, wait_timeout_s=5.0)
    release = asyncio.Event()

    holder = hold_until(pool, A, release)
    await until(lambda: holders(pool).get(A.versioned_ref) == 1)
    waiter = asyncio.create_task(use(pool, B))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    assert engine.add_calls == [A.versioned_ref]

    released_at = time.monotonic()
    release.set()
    adapter = await asyncio.wait_for(waiter, 1.0)
    assert time.monotonic() - released_at < 0.5
    assert adapter is not None and adapter.engine_name == B.versioned_ref
    await holder
    assert [(e.kind, e.engine_name) for e in engine.events][-2:] == [
        ("remove", A.versioned_ref),
        ("add", B.versioned_ref),
    ]


async def test_waiting_request_gets_capacity_error_after_the_timeout(make_pool) -> None:
    pool, engine = make_pool(capacity=1, wait_timeout_s=0.2)
    release = asyncio.Event()

    holder = hold_until(pool, A, release)
    await until(lambda: holders(pool).get(A.versioned_ref) == 1)
    started = time.monotonic()
    with pytest.raises(AdapterCapacityError) as caught:
        await use(pool, B)
    assert 0.19 <= time.monotonic() - started < 1.0
    assert caught.value.status == 503
    assert caught.value.retry_after_s is not None and caught.value.retry_after_s > 0
    assert "alice/b" in caught.value.message
    assert engine.add_calls == [A.versioned_ref]
    release.set()
    await holder
    await use(pool, B)  # and it works once the slot is free


async def test_requests_for_a_resident_adapter_do_not_wait_when_others_are_busy(make_pool) -> None:
    pool, _ = make_pool(capacity=1, wait_timeout_s=0.2)
    release = asyncio.Event()

    holder = hold_until(pool, A, release)
    await until(lambda: holders(pool).get(A.versioned_ref) == 1)
    assert await asyncio.wait_for(use(pool, A), 0.1) is not None
    release.set()
    await holder


# -- failing loads ------------------------------------------------------------------------


async def test_failed_load_fails_every_concurrent_waiter(make_pool) -> None:
    pool, engine = make_pool(add_delay_s=0.05, fail_loads={A.ref: "rank 64 exceeds max_lora_rank 16"})
    results = await asyncio.gather(*(use(pool, A) for _ in range(20)), return_exceptions=True)
    assert all(isinstance(r, AdapterLoadFailedError) for r in results), results
    error = results[0]
    assert isinstance(error, AdapterLoadFailedError)
    assert error.status == 422 and error.param == "model"
    assert "alice/a" in error.message and "rank 64 exceeds max_lora_rank 16" in error.message
    assert "@" not in error.message  # the user's name for it, not the engine's
    assert engine.add_calls == [A.versioned_ref]
    assert pool.resident() == []


async def test_failed_load_is_remembered_then_retried_after_the_ttl(make_pool) -> None:
    pool, engine = make_pool(failure_ttl_s=0.2, fail_loads={A.ref: "corrupt weights"})
    with pytest.raises(AdapterLoadFailedError):
        await use(pool, A)
    with pytest.raises(AdapterLoadFailedError, match="corrupt weights"):
        await use(pool, A)  # fails fast: no second attempt within the TTL
    assert engine.adds_of(A.ref) == 1

    del engine.fail_loads[A.ref]  # fixed meanwhile; the failure is still remembered
    with pytest.raises(AdapterLoadFailedError):
        await use(pool, A)
    assert engine.adds_of(A.ref) == 1

    await asyncio.sleep(0.25)
    assert await use(pool, A) is not None
    assert engine.adds_of(A.ref) == 2


async def test_failed_load_of_one_adapter_leaves_others_working(make_pool) -> None:
    pool, engine = make_pool(capacity=2, fail_loads={B.ref: "bad"})
    await use(pool, A)
    with pytest.raises(AdapterLoadFailedError):
        await use(pool, B)
    assert await use(pool, C) is not None  # B's failed load gave its slot back
    assert await use(pool, A) is not None
    assert engine.resident_names() == {A.versioned_ref, C.versioned_ref}
    assert engine.adds_of(A.ref) == 1


async def test_failure_is_remembered_per_version(make_pool) -> None:
    pool, engine = make_pool(fail_loads={})
    broken, fixed = make_record("alice", "a", b"v1"), make_record("alice", "a", b"v2")
    engine.fail_loads[broken.versioned_ref] = "bad"
    with pytest.raises(AdapterLoadFailedError):
        await use(pool, broken)
    assert await use(pool, fixed) is not None


async def test_missing_local_files_are_a_load_failure(make_pool) -> None:
    class MissingFiles(FakeFiles):
        async def pin(self, record: AdapterRecord) -> Path:
            raise FileNotFoundError(f"no files for {record.ref}")

    pool, engine = make_pool(files=MissingFiles())
    with pytest.raises(AdapterLoadFailedError, match="could not be loaded") as failure:
        await use(pool, A)
    # What went wrong on the server is for its log (a real FileNotFoundError names a server path).
    assert "FileNotFoundError" not in failure.value.message
    assert engine.add_calls == []
    assert pool.resident() == []


async def test_dead_engine_is_unavailable_not_a_remembered_failure(make_pool) -> None:
    pool, engine = make_pool()
    engine.alive = False
    with pytest.raises(ServiceUnavailableError):
        await use(pool, A)
    assert pool.resident() == []
    engine.alive = True  # (a real dead engine does not come back; this shows nothing was remembered)
    assert await use(pool, A) is not None


# -- the base model -----------------------------------------------------------------------


async def test_base_requests_use_the_base_zero_adapter(make_pool, tmp_path: Path) -> None:
    pool, engine = make_pool(capacity=1)
    assert await use(pool, None) is None  # before registration: plain base model
    await pool.register_base_adapter(tmp_path)
    base = await use(pool, None)
    assert base is not None and base.engine_name == "__base__" and base.path == tmp_path
    assert engine.resident_names() == {"__base__"}

    for record in (A, B, C):
        adapter = await use(pool, record)
        assert adapter is not None and adapter.engine_id != base.engine_id
        assert "__base__" in engine.resident_names()
    assert await use(pool, None) == base
    assert engine.peak_resident == 2  # one user slot + the base adapter
    assert pool.resident()[0].name == C.versioned_ref  # the base adapter is not in the pool's LRU


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        AdapterPool(FakeEngine(), FakeFiles(), 0)


# -- retired versions (superseded or deleted in the store) ---------------------------------


async def test_retiring_an_idle_version_removes_it_and_unpins_its_files(make_pool) -> None:
    files = FakeFiles()
    pool, engine = make_pool(files=files)
    adapter = await use(pool, A)
    await use(pool, B)
    pool.retire(A)
    assert pool.resident()[0].name == B.versioned_ref and len(pool.resident()) == 1
    await until(lambda: A.versioned_ref not in engine.resident_names())
    assert adapter is not None
    assert [(e.kind, e.engine_id) for e in engine.events if e.engine_name == A.versioned_ref] == [
        ("add", adapter.engine_id),
        ("remove", adapter.engine_id),
    ]
    assert files.pins[A.versioned_ref] == 0
    assert files.pins[B.versioned_ref] == 1  # the others stay as they were
    assert engine.resident_names() == {B.versioned_ref}


async def test_retiring_a_version_in_use_serves_the_request_then_removes_it(make_pool) -> None:
    files = FakeFiles()
    pool, engine = make_pool(files=files)
    retired, finish = asyncio.Event(), asyncio.Event()
    texts: list[str] = []

    async def long_request() -> None:
        async with pool.acquire(A) as adapter:
            await retired.wait()
            await finish.wait()
            # Still registered: generating with it is no violation (the fake engine checks).
            params = SamplingParams(max_tokens=3, output_kind=RequestOutputKind.DELTA)
            async for output in engine.generate("r1", [1, 2, 3], params, lora_request(adapter), {}):
                texts.extend(c.text for c in output.outputs)

    task = asyncio.create_task(long_request())
    await until(lambda: holders(pool).get(A.versioned_ref) == 1)
    pool.retire(A)
    retired.set()
    await asyncio.sleep(0.01)
    assert A.versioned_ref in engine.resident_names()
    assert files.pins[A.versioned_ref] == 1
    finish.set()
    await task
    assert "".join(texts) == expected_text(A.versioned_ref, [1, 2, 3], 0, 3) and len(texts) == 3
    await until(lambda: A.versioned_ref not in engine.resident_names())
    assert files.pins[A.versioned_ref] == 0
    assert pool.resident() == []


async def test_the_new_version_loads_beside_the_retired_one_still_in_use(make_pool) -> None:
    files = FakeFiles()
    pool, engine = make_pool(capacity=2, files=files)
    old, new = make_record("alice", "a", b"v1"), make_record("alice", "a", b"v2")
    finish = asyncio.Event()
    held: list[EngineAdapter | None] = []

    async def long_request() -> None:
        async with pool.acquire(old) as adapter:
            held.append(adapter)
            await finish.wait()

    task = asyncio.create_task(long_request())
    await until(lambda: len(held) == 1)
    pool.retire(old)
    fresh = await use(pool, new)
    stale = held[0]
    assert fresh is not None and stale is not None
    assert fresh.engine_id != stale.engine_id and fresh.engine_name == new.versioned_ref
    assert engine.resident_names() == {old.versioned_ref, new.versioned_ref}

    finish.set()
    await task
    await until(lambda: engine.resident_names() == {new.versioned_ref})
    assert files.pins == {old.versioned_ref: 0, new.versioned_ref: 1}
    assert await use(pool, new) == fresh  # the new version stays resident, reused


async def test_the_retired_version_gives_its_slot_to_a_waiting_request(make_pool, tmp_path: Path) -> None:
    """Capacity one, the retired version busy: the new version waits for the slot, and gets it
    when the old version's request ends, without the engine ever holding both (the removal
    takes a while, as a real engine's does: the slot is free only once it returned)."""
    pool, engine = make_pool(capacity=1, wait_timeout_s=2.0, remove_delay_s=0.05)
    await pool.register_base_adapter(tmp_path)
    old, new = make_record("alice", "a", b"v1"), make_record("alice", "a", b"v2")
    finish = asyncio.Event()

    task = hold_until(pool, old, finish)
    await until(lambda: holders(pool).get(old.versioned_ref) == 1)
    pool.retire(old)
    waiter = asyncio.create_task(use(pool, new))
    await asyncio.sleep(0.02)
    assert not waiter.done()
    finish.set()
    await task
    adapter = await asyncio.wait_for(waiter, 1.0)
    assert adapter is not None and adapter.engine_name == new.versioned_ref
    assert engine.resident_names() == {"__base__", new.versioned_ref}
    assert engine.peak_resident == 2


async def test_retiring_a_version_the_pool_does_not_hold_is_a_no_op(make_pool) -> None:
    files = FakeFiles()
    pool, engine = make_pool(files=files)
    current, other_version = make_record("alice", "a", b"v2"), make_record("alice", "a", b"v1")
    pool.retire(A)  # never loaded
    adapter = await use(pool, current)
    pool.retire(other_version)  # the same adapter, another version
    pool.retire(B)
    await asyncio.sleep(0.01)
    assert [e.kind for e in engine.events] == ["add"]
    assert files.pins == {current.versioned_ref: 1}
    assert await use(pool, current) == adapter


async def test_retiring_a_version_while_it_loads_removes_it_once_loaded_and_unused(make_pool) -> None:
    gate = asyncio.Event()
    files = FakeFiles()
    pool, engine = make_pool(files=files, add_gate=gate)
    loading = asyncio.create_task(use(pool, A))
    await until(lambda: engine.add_calls == [A.versioned_ref])
    pool.retire(A)
    gate.set()
    assert await loading is not None  # the request that was waiting for it is still served
    await until(lambda: A.versioned_ref not in engine.resident_names())
    assert files.pins[A.versioned_ref] == 0
    assert pool.resident() == []


async def test_store_unavailable_while_pinning_is_503_and_not_remembered(make_pool) -> None:
    class FlakyFiles(FakeFiles):
        def __init__(self) -> None:
            super().__init__()
            self.outages = 1
            self.attempts = 0

        async def pin(self, record: AdapterRecord) -> Path:
            self.attempts += 1
            if self.outages:
                self.outages -= 1
                raise StoreUnavailableError("s3://bucket: connection refused")
            return await super().pin(record)

    files = FlakyFiles()
    pool, engine = make_pool(files=files)
    with pytest.raises(ServiceUnavailableError) as caught:
        await use(pool, A)
    assert caught.value.status == 503
    assert caught.value.retry_after_s is not None and caught.value.retry_after_s > 0
    assert engine.add_calls == []
    assert pool.resident() == []

    assert await use(pool, A) is not None  # not remembered as the adapter's failure: tried again
    assert files.attempts == 2
    assert engine.add_calls == [A.versioned_ref]


async def test_a_retired_idle_version_keeps_its_slot_until_the_engine_removed_it(make_pool, tmp_path: Path) -> None:
    pool, engine = make_pool(capacity=1, remove_delay_s=0.05)
    await pool.register_base_adapter(tmp_path)
    old, new = make_record("alice", "a", b"v1"), make_record("alice", "a", b"v2")
    await use(pool, old)
    pool.retire(old)
    adapter = await use(pool, new)  # waits for the removal rather than overfilling the engine
    assert adapter is not None and adapter.engine_name == new.versioned_ref
    assert [(e.kind, e.engine_name) for e in engine.events][-2:] == [
        ("remove", old.versioned_ref),
        ("add", new.versioned_ref),
    ]
    assert engine.peak_resident == 2


async def test_lora_activity_names_adapters_by_ref_while_loading_waiting_and_running(make_pool) -> None:
    gate = asyncio.Event()
    pool, engine = make_pool(capacity=1, add_gate=gate)
    release = asyncio.Event()

    async def request(record: AdapterRecord) -> None:
        async with pool.acquire(record):
            await release.wait()

    idle = pool.lora_activity()
    assert (idle.running, idle.waiting) == (frozenset(), frozenset())
    a = asyncio.create_task(request(A))
    await until(lambda: engine.add_calls == [A.versioned_ref])
    b = asyncio.create_task(request(B))  # the only slot is A's: B waits for it
    await asyncio.sleep(0.02)
    loading = pool.lora_activity()
    assert (loading.running, loading.waiting) == (frozenset(), {"alice/a", "alice/b"})  # refs, not versions
    gate.set()
    await until(lambda: pool.lora_activity().running == {"alice/a"})
    assert pool.lora_activity().waiting == {"alice/b"}
    release.set()
    await asyncio.gather(a, b)
    done = pool.lora_activity()
    assert (done.running, done.waiting) == (frozenset(), frozenset())


async def test_a_version_republished_while_its_removal_runs_is_registered_again_once_removed(make_pool) -> None:
    """Retired (deleted, or superseded), then the same bytes published again while the engine is
    still removing it: the new registration waits for the removal, so the engine never sees
    the same adapter added twice, and the request is served."""
    pool, engine = make_pool(remove_delay_s=0.2)
    await use(pool, A)
    pool.retire(A)  # removal under way in the background
    adapter = await use(pool, A)  # republished: resolved as current again
    assert adapter is not None and adapter.engine_name == A.versioned_ref
    assert [(e.kind, e.engine_name) for e in engine.events] == [
        ("add", A.versioned_ref),
        ("remove", A.versioned_ref),
        ("add", A.versioned_ref),
    ]
    await until(lambda: engine.resident_names() == {A.versioned_ref})
