"""Per-user fair share: each user has `max_running` slots and a bounded FIFO queue; one user's
backlog never blocks another user, and a request whose client is gone never keeps a slot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.auth.keys import add_key
from gateway.errors import RateLimitError
from gateway.fair_share import UserLimiter
from tests.fakes import FakeEngine
from tests.unit.harness import (
    BASE,
    MAX_MODEL_LEN,
    StartGateway,
    assert_error,
    completion,
    until,
)


class Holder:
    """A request in the limiter: enters, records that it did, and leaves when released."""

    def __init__(self, limiter: UserLimiter, user: str, entered: list[str], tag: str) -> None:
        self.leave = asyncio.Event()
        self.inside = asyncio.Event()

        async def run() -> None:
            async with limiter.admit(user):
                entered.append(tag)
                self.inside.set()
                await self.leave.wait()

        self.task = asyncio.create_task(run())

    async def done(self) -> None:
        self.leave.set()
        await self.task


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def waiting(limiter: UserLimiter, user: str) -> int:
    state = limiter._users.get(user)
    return 0 if state is None else len(state.waiting)


async def test_each_user_runs_at_most_max_running_at_once() -> None:
    limiter = UserLimiter(max_running=2, max_queued=10, queue_timeout_s=10)
    entered: list[str] = []
    holders = [Holder(limiter, "alice", entered, f"a{i}") for i in range(3)]
    await settle()
    assert entered == ["a0", "a1"] and limiter.running("alice") == 2 and waiting(limiter, "alice") == 1
    await holders[0].done()
    await settle()
    assert entered == ["a0", "a1", "a2"] and limiter.running("alice") == 2
    for holder in holders[1:]:
        await holder.done()
    assert limiter.running("alice") == 0


async def test_waiters_of_a_user_are_served_first_come_first_served() -> None:
    limiter = UserLimiter(max_running=1, max_queued=10, queue_timeout_s=10)
    entered: list[str] = []
    holders = []
    for i in range(6):
        holders.append(Holder(limiter, "alice", entered, str(i)))
        await settle()  # queued in this order
    assert entered == ["0"]
    for i, holder in enumerate(holders):
        assert limiter.running("alice") == 1  # handed over, never two at once
        await holder.done()
        await settle()
        assert entered == [str(j) for j in range(min(i + 2, 6))]
    assert limiter._users == {}


async def test_a_newcomer_does_not_overtake_the_queue() -> None:
    """A slot freed while others wait goes to the first waiter, not to whoever asks next."""
    limiter = UserLimiter(max_running=1, max_queued=10, queue_timeout_s=10)
    entered: list[str] = []
    first = Holder(limiter, "alice", entered, "first")
    await settle()
    queued = Holder(limiter, "alice", entered, "queued")
    await settle()
    first.leave.set()
    newcomer = Holder(limiter, "alice", entered, "newcomer")  # created in the same tick as the release
    await first.task
    await settle()
    assert entered == ["first", "queued"]
    await queued.done()
    await settle()
    assert entered == ["first", "queued", "newcomer"]
    await newcomer.done()


async def test_a_full_queue_is_a_rate_limit_error_with_retry_after() -> None:
    limiter = UserLimiter(max_running=1, max_queued=2, queue_timeout_s=10)
    entered: list[str] = []
    holders = [Holder(limiter, "alice", entered, str(i)) for i in range(3)]
    await settle()
    assert waiting(limiter, "alice") == 2
    with pytest.raises(RateLimitError) as refused:
        async with limiter.admit("alice"):
            pytest.fail("admitted beyond running + queued")
    assert refused.value.status == 429 and refused.value.retry_after_s and refused.value.retry_after_s > 0
    assert "alice" in refused.value.message
    assert limiter.running("alice") == 1 and waiting(limiter, "alice") == 2  # the refusal changed nothing
    for holder in holders:
        await holder.done()
    assert limiter._users == {}


async def test_no_queue_at_all() -> None:
    limiter = UserLimiter(max_running=1, max_queued=0, queue_timeout_s=10)
    holder = Holder(limiter, "alice", [], "a")
    await settle()
    with pytest.raises(RateLimitError):
        async with limiter.admit("alice"):
            pass
    await holder.done()
    async with limiter.admit("alice"):
        assert limiter.running("alice") == 1
    assert limiter._users == {}


async def test_waiting_too_long_is_a_rate_limit_error_and_frees_the_queue_place() -> None:
    limiter = UserLimiter(max_running=1, max_queued=1, queue_timeout_s=0.05)
    holder = Holder(limiter, "alice", [], "a")
    await settle()
    started = asyncio.get_running_loop().time()
    with pytest.raises(RateLimitError) as refused:
        async with limiter.admit("alice"):
            pytest.fail("admitted while the slot was held")
    assert 0.04 < asyncio.get_running_loop().time() - started < 2
    assert refused.value.status == 429 and refused.value.retry_after_s
    assert "waited" in refused.value.message
    assert waiting(limiter, "alice") == 0 and limiter.running("alice") == 1
    await holder.done()
    assert limiter._users == {}


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    """The client hung up while queued: its place is gone, and the slot is not leaked."""
    limiter = UserLimiter(max_running=1, max_queued=5, queue_timeout_s=10)
    entered: list[str] = []
    holder = Holder(limiter, "alice", entered, "holder")
    await settle()
    gone = Holder(limiter, "alice", entered, "gone")
    await settle()
    next_one = Holder(limiter, "alice", entered, "next")
    await settle()
    gone.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone.task
    assert waiting(limiter, "alice") == 1
    await holder.done()
    await settle()
    assert entered == ["holder", "next"]  # the slot skipped the cancelled waiter
    await next_one.done()
    assert limiter.running("alice") == 0 and limiter._users == {}


@pytest.mark.parametrize("others_waiting", [0, 1])
async def test_a_waiter_cancelled_just_as_the_slot_is_handed_over_passes_it_on(others_waiting: int) -> None:
    """The slot was handed over, and in the same tick the client hung up: the cancelled
    request must end (not run anyway) and the slot go to the next waiter, or back."""
    limiter = UserLimiter(max_running=1, max_queued=5, queue_timeout_s=10)
    entered: list[str] = []
    admission = limiter.admit("alice")
    await admission.__aenter__()
    gone = Holder(limiter, "alice", entered, "gone")
    await settle()
    others = [Holder(limiter, "alice", entered, f"other{i}") for i in range(others_waiting)]
    await settle()

    await admission.__aexit__(None, None, None)  # hands the slot to `gone` without a scheduling point
    gone.task.cancel()  # ... which the client's disconnect cancels before it ever runs
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(gone.task, 2)
    await settle()
    assert "gone" not in entered
    if others:
        assert entered == ["other0"] and limiter.running("alice") == 1
        await others[0].done()
    assert limiter.running("alice") == 0 and limiter._users == {}
    async with limiter.admit("alice"):  # the slot is usable again
        assert limiter.running("alice") == 1


async def test_a_waiter_timing_out_just_as_the_slot_is_handed_over_leaks_nothing() -> None:
    """The queue timeout fires in the same tick as the hand-over: whichever wins (admitted, or
    a 429 that passes the slot on), no slot may leak."""
    limiter = UserLimiter(max_running=1, max_queued=5, queue_timeout_s=1e-9)
    admission = limiter.admit("alice")
    await admission.__aenter__()

    async def late() -> str:
        async with limiter.admit("alice"):
            assert limiter.running("alice") == 1
            return "admitted"

    task = asyncio.create_task(late())
    await asyncio.sleep(0)  # it queues and arms its (already due) timeout
    assert waiting(limiter, "alice") == 1
    await admission.__aexit__(None, None, None)  # the hand-over, before the timeout is handled
    (outcome,) = await asyncio.gather(task, return_exceptions=True)
    assert outcome == "admitted" or isinstance(outcome, RateLimitError), outcome
    assert limiter.running("alice") == 0 and limiter._users == {}


async def test_one_users_full_queue_never_blocks_another_user() -> None:
    limiter = UserLimiter(max_running=1, max_queued=3, queue_timeout_s=10)
    entered: list[str] = []
    alice = [Holder(limiter, "alice", entered, f"alice{i}") for i in range(4)]
    await settle()
    with pytest.raises(RateLimitError):
        async with limiter.admit("alice"):
            pass
    bob = [Holder(limiter, f"bob{i}", entered, f"bob{i}") for i in range(3)]
    await settle()
    assert entered == ["alice0", "bob0", "bob1", "bob2"]
    for holder in bob:
        await holder.done()
    assert set(limiter._users) == {"alice"}
    for holder in alice:
        await holder.done()


async def test_idle_users_are_forgotten() -> None:
    """Thousands of users: the limiter keeps state only for users with requests in it."""
    limiter = UserLimiter(max_running=1, max_queued=1, queue_timeout_s=0.02)
    for i in range(100):
        async with limiter.admit(f"user{i}"):
            pass
    assert limiter._users == {}
    holder = Holder(limiter, "alice", [], "a")
    await settle()
    queued = Holder(limiter, "alice", [], "q")
    await settle()
    with pytest.raises(RateLimitError):  # queue full
        async with limiter.admit("alice"):
            pass
    queued.task.cancel()
    await asyncio.gather(queued.task, return_exceptions=True)
    with pytest.raises(RateLimitError):  # timed out
        async with limiter.admit("alice"):
            pass
    await holder.done()
    assert limiter._users == {}

    async def fails() -> None:
        async with limiter.admit("carol"):
            raise ValueError("the request failed")

    with pytest.raises(ValueError):
        await fails()
    assert limiter._users == {}


# -- through the app ---------------------------------------------------------------------------


HOLD = "HOLD on"


class HeldEngine(FakeEngine):
    """Generations of the prompt HOLD wait for `release` before their first token."""

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        self.release = asyncio.Event()
        self.held = 0

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], *args: Any, **kwargs: Any
    ) -> AsyncIterator[Any]:
        if list(prompt_token_ids) == self.prompt_ids(HOLD):
            self.held += 1
            await self.release.wait()
        async for delta in super().generate(request_id, prompt_token_ids, *args, **kwargs):
            yield delta


async def test_a_users_second_request_is_429_while_another_user_is_served(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.yaml"
    alice, bob = add_key(keys_file, "alice")[0], add_key(keys_file, "bob")[0]
    engine = HeldEngine(max_model_len=MAX_MODEL_LEN)
    gw = await start_gateway(engine, keys_file=keys_file, max_running_per_user=1, max_queued_per_user=0)

    def post(key: str, body: dict[str, Any]) -> Any:
        return gw.client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})

    first = asyncio.create_task(post(alice, completion("alice/coding", HOLD)))
    await until(lambda: engine.held == 1, timeout_s=10)
    resp = await post(alice, completion(BASE))
    error = await assert_error(resp, 429, code="rate_limit_exceeded")
    assert error["type"] == "rate_limit_error"
    assert int(resp.headers["Retry-After"]) >= 1

    for model in (BASE, "bob/poems"):  # bob is not held up by alice's backlog
        served = await post(bob, completion(model))
        assert served.status == 200, await served.text()
    assert not first.done()

    engine.release.set()
    assert (await first).status == 200
    again = await post(alice, completion(BASE))  # alice's slot came back
    assert again.status == 200, await again.text()
