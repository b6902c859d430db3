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
from gateway.pool import AdapterPool
from tests.fakes import FakeEngine, publish_adapter
from tests.unit import test_api
from tests.unit.test_api import BASE, MAX_MODEL_LEN, StartGateway, completion, until

# test_api's fixtures: the app on a fake engine, without ambient LORA_GATEWAY_* settings.
start_gateway = test_api.start_gateway
_no_ambient_settings = test_api._no_ambient_settings

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
    (generating, or queued for a slot) before the one generating is let go."""

    def __init__(self, gw: test_api.Gateway, engine: SteppedEngine, key: str, model: str) -> None:
        self.gw, self.engine, self.key, self.model = gw, engine, key, model
        self.sent: list[tuple[str, asyncio.Task[int]]] = []

    def _pool(self) -> AdapterPool:
        return self.gw.app[SERVING].pool_or_raise()

    async def send(self) -> None:
        prompt = f"{HELD} {self.model} {len(self.sent)}"
        self.engine.hold(prompt)
        before = len(self._pool().queued())
        task = asyncio.create_task(post(self.gw, self.key, completion(self.model, prompt)))
        self.sent.append((prompt, task))
        await until(lambda: prompt in self.engine.generating or len(self._pool().queued()) > before, timeout_s=30)

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


async def post(gw: test_api.Gateway, key: str, body: dict[str, Any]) -> int:
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
