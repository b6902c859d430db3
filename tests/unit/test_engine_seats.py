"""EngineSeats: the engine's sequences shared across callers. Proven by steps: requests hold their
seats until the test ends them; the one clock-dependent rule (the estimate) runs on a fake clock."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from gateway import service_rate
from gateway.admission import sequences_of
from gateway.engine_seats import EngineSeats, default_seats_per_user
from gateway.errors import AdapterCapacityError, EngineCapacityError
from gateway.metrics import GatewayMetrics
from gateway.service_rate import ServiceRate
from tests.unit.harness import FakeClock, until

PATIENT = 3600.0


class Request:
    """A request that takes its seats, notes when it got them, and holds them until `end()`."""

    def __init__(
        self,
        seats: EngineSeats,
        user: str,
        sequences: int = 1,
        log: list[str] | None = None,
        adapter: str | None = None,
    ) -> None:
        self.user, self.log = user, log
        self._inside, self._end = asyncio.Event(), asyncio.Event()
        self.task = asyncio.create_task(self._run(seats, sequences, adapter))

    async def _run(self, seats: EngineSeats, sequences: int, adapter: str | None) -> None:
        async with seats.take(self.user, sequences, adapter):
            self._inside.set()
            if self.log is not None:
                self.log.append(self.user)
            await self._end.wait()

    @property
    def inside(self) -> bool:
        return self._inside.is_set()

    async def end(self) -> None:
        assert self.inside
        self._end.set()
        await self.task


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def arrive(
    seats: EngineSeats, user: str, sequences: int = 1, log: list[str] | None = None, adapter: str | None = None
) -> Request:
    request = Request(seats, user, sequences, log, adapter)
    await settle()
    return request


def test_default_share_keeps_room_for_another_caller() -> None:
    assert default_seats_per_user(256) == 224
    assert default_seats_per_user(8) == 7
    assert default_seats_per_user(2) == 1
    assert default_seats_per_user(1) == 1


async def test_a_caller_alone_stops_at_its_share_and_another_gets_in_at_once() -> None:
    seats = EngineSeats(4, PATIENT, max_per_user=3)
    alice = [await arrive(seats, "alice") for _ in range(5)]
    assert [r.inside for r in alice] == [True, True, True, False, False]
    assert seats.queued() == 2 and seats.in_use == 3
    bob = await arrive(seats, "bob")
    assert bob.inside, "bob waited behind alice's backlog"
    await bob.end()
    assert not alice[3].inside, "a seat alice is past her share for went to her"
    await alice[0].end()
    await settle()
    assert alice[3].inside and not alice[4].inside
    for request in alice[1:4]:
        await request.end()
    await settle()
    await alice[4].end()
    assert seats.in_use == 0 and seats.queued() == 0


async def test_a_freed_seat_goes_to_the_caller_holding_fewest_before_older_waiters() -> None:
    seats = EngineSeats(2, PATIENT, max_per_user=2)
    log: list[str] = []
    alice = [await arrive(seats, "alice", log=log) for _ in range(2)]
    alice_waiting = [await arrive(seats, "alice", log=log) for _ in range(2)]  # older waiters
    bob = await arrive(seats, "bob", log=log)
    carol = await arrive(seats, "carol", log=log)
    assert log == ["alice", "alice"]
    await alice[0].end()
    await settle()
    assert log[2:] == ["bob"]  # bob holds none, alice one: bob first though alice waited longer
    await alice[1].end()
    await settle()
    assert log[3:] == ["alice"]  # alice and carol hold none now: alice waited longer
    await bob.end()
    await settle()
    assert log[4:] == ["carol"]  # carol holds none, alice one
    await carol.end()
    await settle()
    assert log[5:] == ["alice"]
    for request in alice_waiting:
        await request.end()


async def test_sequences_count_and_a_large_request_is_not_passed_by_smaller_ones() -> None:
    seats = EngineSeats(4, PATIENT, max_per_user=4)
    small = await arrive(seats, "alice", 2)
    assert small.inside and seats.in_use == 2
    big = await arrive(seats, "bob", 3)
    assert not big.inside
    later = await arrive(seats, "carol", 1)
    assert not later.inside, "a small request passed the large one first in line: it could starve"
    await small.end()
    await settle()
    assert big.inside and later.inside and seats.in_use == 4
    huge = await arrive(seats, "dave", 50)  # more than a share: it takes the whole share, and waits for it
    await big.end()
    await later.end()
    await settle()
    assert huge.inside and seats.in_use == 4
    await huge.end()


async def test_while_a_step_s_adapters_are_inside_seats_go_to_their_requests_and_a_new_one_enters_as_one_drains() -> (
    None
):
    seats = EngineSeats(8, PATIENT, max_per_user=8, adapters_per_step=2, max_passes=100)
    a1, b1 = await arrive(seats, "alice", adapter="a"), await arrive(seats, "alice", adapter="b")
    c1 = await arrive(seats, "alice", adapter="c")
    assert a1.inside and b1.inside and not c1.inside, "vLLM would leave c's request idle in its queue, holding a seat"
    a2 = await arrive(seats, "alice", adapter="a")
    base = await arrive(seats, "alice")
    bob_b = await arrive(seats, "bob", adapter="b")
    assert a2.inside and base.inside and bob_b.inside, "a request vLLM runs at once waited behind one it would not"
    assert seats.adapters_inside() == {"a", "b"} and seats.in_use == 5
    await b1.end()
    await settle()
    assert not c1.inside, "b still has bob's request inside"
    await bob_b.end()
    await settle()
    assert c1.inside and seats.adapters_inside() == {"a", "c"}
    for request in (a1, a2, base, c1):
        await request.end()


async def test_a_request_passed_by_enough_later_ones_makes_the_adapter_holding_fewest_seats_drain_for_it() -> None:
    seats = EngineSeats(8, PATIENT, max_per_user=8, adapters_per_step=2, max_passes=2)
    a1, b1 = await arrive(seats, "alice", adapter="a"), await arrive(seats, "alice", adapter="b")
    c1 = await arrive(seats, "alice", adapter="c")
    a2, a3 = await arrive(seats, "alice", adapter="a"), await arrive(seats, "alice", adapter="a")
    assert a2.inside and a3.inside and not c1.inside  # c1 passed twice: aged
    b2 = await arrive(seats, "alice", adapter="b")
    assert not b2.inside, "b (one seat, against a's three) kept taking requests past the aged one"
    a4 = await arrive(seats, "alice", adapter="a")
    assert a4.inside, "only the adapter draining stops taking requests"
    await b1.end()
    await settle()
    assert c1.inside and not b2.inside and seats.adapters_inside() == {"a", "c"}
    for request in (a1, a2, a3, a4, c1):
        await request.end()
    await settle()
    assert b2.inside
    await b2.end()


async def test_a_caller_with_no_adapter_inside_is_not_held_back_by_another_s() -> None:
    """Alice's adapters fill a step; bob's first goes in (the adapter pool's per-caller shares decide
    then, as for one request of each caller), alice's next new adapter waits for one of hers to drain."""
    seats = EngineSeats(8, PATIENT, max_per_user=8, adapters_per_step=2, max_passes=100)
    alice = [await arrive(seats, "alice", adapter=name) for name in "ab"]
    bob = await arrive(seats, "bob", adapter="c")
    assert bob.inside, "alice's adapters shut bob's out"
    alice_e = await arrive(seats, "alice", adapter="e")
    assert not alice_e.inside
    await alice[1].end()
    await settle()
    assert not alice_e.inside, "a, b and c were inside for a step of two: one more must drain"
    await bob.end()
    await settle()
    assert alice_e.inside and seats.adapters_inside() == {"a", "e"}
    for request in (alice[0], alice_e):
        await request.end()


async def test_many_callers_each_on_one_adapter_do_not_starve_a_caller_s_second_one() -> None:
    """Callers with no adapter inside always go in, so more adapters than a step runs can be inside, and
    none of them may ever drain; a caller's request for a second adapter still enters after its passes."""
    seats = EngineSeats(16, PATIENT, max_per_user=16, adapters_per_step=2, max_passes=2)
    held = [await arrive(seats, user, adapter=user) for user in ("alice", "u1", "u2")]
    second = await arrive(seats, "alice", adapter="alice-2")
    assert all(r.inside for r in held) and not second.inside
    held += [await arrive(seats, user, adapter=user) for user in ("u1", "u2")]
    assert second.inside, "passed by two requests, alice's second adapter waited on"
    for request in (*held, second):
        await request.end()


async def test_another_caller_s_requests_passing_a_cold_one_count_too() -> None:
    seats = EngineSeats(8, PATIENT, max_per_user=8, adapters_per_step=2, max_passes=3)
    hot = [await arrive(seats, "alice", adapter="a") for _ in range(2)]
    bob_b = await arrive(seats, "bob", adapter="b")
    cold = await arrive(seats, "bob", adapter="c")  # bob holds a place: his cold request waits its passes
    passing = [await arrive(seats, "alice", adapter="a") for _ in range(3)]
    assert all(r.inside for r in passing) and not cold.inside
    alice_b = await arrive(seats, "alice", adapter="b")
    assert not alice_b.inside, "bob's request was passed three times by alice's: b (fewest seats) should drain"
    await bob_b.end()
    await settle()
    assert cold.inside and not alice_b.inside
    for request in (*hot, *passing, cold):
        await request.end()
    await settle()
    assert alice_b.inside
    await alice_b.end()


async def test_a_request_held_back_for_its_adapter_past_its_deadline_gets_the_adapter_capacity_503() -> None:
    seats = EngineSeats(8, 0.05, max_per_user=8, adapters_per_step=1)
    hot = await arrive(seats, "alice", adapter="alice/hot@0123456789abcdef")
    with pytest.raises(AdapterCapacityError) as refused:
        async with seats.take("alice", 1, "alice/cold@0123456789abcdef"):
            pass
    assert refused.value.status == 503 and refused.value.retry_after_s is not None
    assert "'alice/cold'" in str(refused.value) and "@" not in str(refused.value)
    assert seats.queued() == 0
    await hot.end()


async def test_without_a_step_limit_adapters_do_not_group() -> None:
    seats = EngineSeats(8, PATIENT, max_per_user=8)
    held = [await arrive(seats, "alice", adapter=name) for name in "abcdefgh"]
    assert all(r.inside for r in held)
    for request in held:
        await request.end()


async def test_a_waiter_past_its_deadline_gets_503_with_retry_after_and_leaves_the_queue() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    seats = EngineSeats(1, 0.05, max_per_user=1, metrics=metrics)
    holder = await arrive(seats, "alice")
    with pytest.raises(EngineCapacityError) as refused:
        async with seats.take("bob", 1):
            pass
    assert refused.value.status == 503 and refused.value.retry_after_s is not None
    assert "waited" in str(refused.value)
    assert seats.queued() == 0
    assert metrics.admission_refusals.labels("engine_seat", "timeout")._value.get() == 1
    await holder.end()
    async with seats.take("bob", 1):  # the seat freed is there for the next one
        assert seats.in_use == 1


async def test_a_cancelled_waiter_frees_its_place_and_a_cancelled_holder_its_seats() -> None:
    seats = EngineSeats(1, PATIENT, max_per_user=1)
    holder = await arrive(seats, "alice")
    gone = await arrive(seats, "bob")
    behind = await arrive(seats, "carol")
    gone.task.cancel()
    await settle()
    assert seats.queued() == 1
    await holder.end()
    await settle()
    assert behind.inside
    behind.task.cancel()
    await settle()
    assert seats.in_use == 0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(service_rate, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


def test_the_service_rate_counts_only_time_with_someone_waiting(clock: FakeClock) -> None:
    rate = ServiceRate(samples=8, min_samples=4)
    assert rate.wait_s(10) is None  # no estimate before enough were served
    for _ in range(4):
        rate.queue_changed(1)
        clock.now += 0.5  # served after half a second of waiting
        rate.served()
        rate.queue_changed(0)
        clock.now += 100  # idle: not slowness
    assert rate.per_second() == pytest.approx(2.0)  # 3 intervals over 1.5 busy seconds
    assert rate.wait_s(3) == pytest.approx(2.0)  # 3 ahead, then itself


async def test_a_newcomer_the_seats_cannot_serve_in_time_is_refused_at_once(clock: FakeClock) -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    seats = EngineSeats(1, 30.0, max_per_user=1, metrics=metrics)
    # The seats serve one waiter every 10 s of waiting.
    holder = await arrive(seats, "u0")
    for i in range(1, 10):
        waiter = await arrive(seats, f"u{i}")
        clock.now += 10
        await holder.end()
        await settle()
        assert waiter.inside
        holder = waiter
    backlog = [await arrive(seats, f"w{i}") for i in range(3)]  # 3 waiting: the next waits ~40 s
    assert all(not r.task.done() for r in backlog)
    with pytest.raises(EngineCapacityError) as refused:
        async with seats.take("late", 1):
            pass
    assert refused.value.retry_after_s == 40
    assert "3 requests wait ahead" in str(refused.value)
    assert metrics.admission_refusals.labels("engine_seat", "estimate")._value.get() == 1
    assert seats.queued() == 3
    for request in (holder, *backlog):
        await until(lambda r=request: r.inside, timeout_s=30)
        await request.end()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"prompt": "one"}, 1),
        ({"prompt": "one", "n": 3}, 3),
        ({"prompt": ["a", "b"], "n": 2}, 4),
        ({"prompt": [[1, 2], [3]]}, 2),
        ({"prompt": [1, 2, 3]}, 1),  # one prompt of token ids
        ({"messages": [], "n": None}, 1),
        ({"input": "responses"}, 1),
    ],
)
def test_sequences_of_a_request(body: dict[str, object], expected: int) -> None:
    assert sequences_of(SimpleNamespace(**body)) == expected
