"""Engine slots through the app, on the fake engine held step by step: a tenant streaming on as many
adapters as there are slots does not shut another tenant's adapter out (issue 16). Each generation
waits for the test to let it go, streams overlap, and the bound is a number of steps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from gateway.app_keys import SERVING
from gateway.auth.keys import add_key
from tests.fakes import FakeEngine, publish_adapter
from tests.unit.harness import BASE, MAX_MODEL_LEN, Gateway, StartGateway, completion, until

# test_api's fixtures: the app on a fake engine, without ambient LORA_GATEWAY_* settings.

HELD = "held"  # prompts starting with this wait for the test before their first token


class SteppedEngine(FakeEngine):
    """Generations of a HELD prompt wait until the test lets that prompt go."""

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        self.gates: dict[tuple[int, ...], asyncio.Event] = {}
        self.generating: set[str] = set()  # held prompts that reached the engine

    def hold(self, prompt: str) -> asyncio.Event:
        return self.gates.setdefault(tuple(self.prompt_ids(prompt)), asyncio.Event())

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], *args: Any, **kwargs: Any
    ) -> AsyncIterator[Any]:
        gate = self.gates.get(tuple(prompt_token_ids))
        if gate is not None:
            self.generating.add(self.client.get_tokenizer().decode(prompt_token_ids))
            await gate.wait()
        async for output in super().generate(request_id, prompt_token_ids, *args, **kwargs):
            yield output


class Stream:
    """One tenant's back-to-back requests for one adapter, overlapping: the next is in the gateway
    (generating, or queued for engine seats or a slot) before the one generating is let go."""

    def __init__(self, gw: Gateway, engine: SteppedEngine, key: str, model: str) -> None:
        self.gw, self.engine, self.key, self.model = gw, engine, key, model
        self.sent: list[tuple[str, asyncio.Task[int]]] = []

    def _queued(self) -> int:
        admission = self.gw.app[SERVING].running_or_raise().admission
        return len(admission.pool.queued()) + (admission.seats.queued() if admission.seats is not None else 0)

    async def send(self) -> None:
        prompt = f"{HELD} {self.model} {len(self.sent)}"
        self.engine.hold(prompt)
        before = self._queued()
        task = asyncio.create_task(post(self.gw, self.key, completion(self.model, prompt)))
        self.sent.append((prompt, task))
        await until(lambda: prompt in self.engine.generating or self._queued() > before, timeout_s=30)

    async def step(self) -> None:
        await self.send()
        oldest = next(
            (p for p, t in self.sent if p in self.engine.generating and not self.engine.hold(p).is_set()), None
        )
        if oldest is not None:
            self.engine.hold(oldest).set()
            await next(t for p, t in self.sent if p == oldest)

    async def stop(self) -> list[int]:
        for prompt, _ in self.sent:
            self.engine.hold(prompt).set()
        return list(await asyncio.gather(*(t for _, t in self.sent)))


async def post(gw: Gateway, key: str, body: dict[str, Any]) -> int:
    resp = await gw.client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    await resp.read()
    return resp.status


async def test_a_tenant_streaming_on_every_slot_leaves_room_for_another_tenant(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.yaml"
    alice, bob = add_key(keys_file, "alice")[0], add_key(keys_file, "bob")[0]
    engine = SteppedEngine(max_model_len=MAX_MODEL_LEN)
    gw = await start_gateway(
        engine,
        keys_file=keys_file,
        max_cpu_loras=2,
        max_loras=2,
        adapter_slot_aging_s=0,  # the bound is then a number of steps, whatever the machine's speed
        adapter_wait_timeout_s=600,
    )
    await publish_adapter(gw.store, gw.scratch, "alice", "second", base_model=BASE)
    streams = [Stream(gw, engine, alice, "alice/coding"), Stream(gw, engine, alice, "alice/second")]
    for stream in streams:
        await stream.send()
        await until(lambda: f"{HELD} {stream.model} 0" in engine.generating, timeout_s=30)

    served = asyncio.create_task(post(gw, bob, completion("bob/poems")))
    steps = 0
    while not served.done():
        steps += 1
        assert steps <= 3, "bob's adapter starved behind alice's streams"
        for stream in streams:
            await stream.step()
        await asyncio.sleep(0)
    assert await served == 200
    for _ in range(3):  # alice's streams go on, on both adapters
        for stream in streams:
            await stream.step()
    for stream in streams:
        assert set(await stream.stop()) == {200}
    assert {"alice/coding", "alice/second", "bob/poems"} <= {n.partition("@")[0] for n in engine.add_calls}


async def test_a_tenant_filling_the_engine_leaves_seats_for_another_tenant(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """vLLM would queue bob's request behind all of alice's, first come first served: the gateway keeps
    alice within her share of the engine's sequences, so bob's goes straight in."""
    keys_file = tmp_path / "keys.yaml"
    alice, bob = add_key(keys_file, "alice")[0], add_key(keys_file, "bob")[0]
    engine = SteppedEngine(max_model_len=MAX_MODEL_LEN)
    gw = await start_gateway(engine, keys_file=keys_file, engine_seats=4, adapter_wait_timeout_s=600)
    seats = gw.app[SERVING].running_or_raise().admission.seats
    assert seats is not None and seats.max_per_user == 3

    async def send(key: str, prompt: str, **body: Any) -> asyncio.Task[int]:
        engine.hold(prompt)
        return asyncio.create_task(post(gw, key, {**completion(BASE, prompt), **body}))

    alice_sent = [await send(alice, f"{HELD} alice {i}") for i in range(3)]
    await until(lambda: len(engine.generating) == 3, timeout_s=30)
    alice_sent.append(await send(alice, f"{HELD} alice 3"))
    await until(lambda: seats.queued() == 1, timeout_s=30)
    metrics = await (await gw.client.get("/metrics")).text()
    assert 'lora_gateway_requests_queued{waiting_for="engine_seat"} 1.0' in metrics
    bob_sent = await send(bob, f"{HELD} bob")
    await until(lambda: f"{HELD} bob" in engine.generating, timeout_s=30)
    assert f"{HELD} alice 3" not in engine.generating  # still waiting in the gateway, not in the engine
    engine.hold(f"{HELD} alice 0").set()
    await until(lambda: f"{HELD} alice 3" in engine.generating, timeout_s=30)
    for prompt in (*(f"{HELD} alice {i}" for i in range(1, 4)), f"{HELD} bob"):
        engine.hold(prompt).set()
    assert await asyncio.gather(*alice_sent, bob_sent) == [200] * 5
    assert seats.in_use == 0


async def test_a_request_for_several_sequences_takes_as_many_seats(start_gateway: StartGateway, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    alice, bob = add_key(keys_file, "alice")[0], add_key(keys_file, "bob")[0]
    engine = SteppedEngine(max_model_len=MAX_MODEL_LEN)
    gw = await start_gateway(engine, keys_file=keys_file, engine_seats=4, max_seqs_per_user=4)
    seats = gw.app[SERVING].running_or_raise().admission.seats
    assert seats is not None
    engine.hold(f"{HELD} alice")
    alice_sent = asyncio.create_task(post(gw, alice, {**completion(BASE, f"{HELD} alice"), "n": 3}))
    await until(lambda: seats.held_by("alice") == 3, timeout_s=30)
    bob_body = {**completion(BASE, ["one", "two"]), "max_tokens": 2}
    bob_sent = asyncio.create_task(post(gw, bob, bob_body))  # two prompts: two seats, one is free
    await until(lambda: seats.queued() == 1, timeout_s=30)
    engine.hold(f"{HELD} alice").set()
    assert await asyncio.gather(alice_sent, bob_sent) == [200, 200]
