"""/metrics as a scraper sees it, on the real app with a fake engine: request counts, latency and
time to first token by outcome; adapter loads by tier; evictions; queued requests; label sets
that stay the same however many adapters are served; the engine's metrics on the same page;
`lora_gateway:lora_requests_info`, the adapters in flight in vLLM's format, for the Inference Extension."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY, Gauge

from adapters_manifest.local_store import LocalFolderStore
from tests.fakes import FakeEngine, GatedEngine, publish_adapter
from tests.unit.harness import BASE, LORA_INFO, Samples, StartGateway, parse, until


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: TestClient) -> Samples:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(await resp.text())


@pytest.fixture
def start(start_gateway: StartGateway) -> Any:
    """The app with `adapters` adapters published: user0/adapter0, user1/adapter1, ..."""

    async def start_app(
        adapters: int = 3, engine: FakeEngine | None = None, **settings: Any
    ) -> tuple[TestClient, web.Application, FakeEngine]:
        refs = [f"user{i}/adapter{i}" for i in range(adapters)]
        gw = await start_gateway(engine, adapters=refs, **settings)
        return gw.client, gw.app, gw.engine

    return start_app


async def complete(client: TestClient, model: str, **body: Any) -> int:
    resp = await client.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2, **body})
    await resp.read()
    return resp.status


async def test_requests_loads_and_first_tokens_by_outcome(start: Any) -> None:
    client, _, engine = await start(max_loras=1, max_cpu_loras=1)
    engine.fail_loads["user2/adapter2"] = "broken on purpose"
    assert await complete(client, "user0/adapter0") == 200  # cold: from the store
    assert await complete(client, "user0/adapter0", stream=True) == 200  # resident
    assert await complete(client, BASE) == 200
    assert await complete(client, "user1/adapter1") == 200  # evicts adapter0 (one slot)
    assert await complete(client, "user0/adapter0") == 200  # back from disk, evicting adapter1
    assert await complete(client, "user2/adapter2") == 422  # the engine refuses it
    assert await complete(client, "nobody/nothing") == 404
    assert await complete(client, BASE, max_tokens=0) == 400
    metrics = await scrape(client)

    def requests(outcome: str, stream: str = "false") -> float:
        return value(metrics, "lora_gateway_requests_total", endpoint="completions", stream=stream, outcome=outcome)

    assert (requests("ok"), requests("ok", "true")) == (4, 1)
    assert (requests("adapter_failed"), requests("not_found"), requests("invalid")) == (1, 1, 1)
    latency = "lora_gateway_request_duration_seconds_count"
    assert value(metrics, latency, endpoint="completions", stream="false", outcome="ok") == 4
    ttft = "lora_gateway_time_to_first_token_seconds_count"
    for source, count in {"store": 2, "disk": 1, "base": 1}.items():
        assert value(metrics, ttft, endpoint="completions", stream="false", adapter_source=source) == count
    assert value(metrics, ttft, endpoint="completions", stream="true", adapter_source="resident") == 1

    acquires = {o: value(metrics, "lora_gateway_adapter_acquires_total", outcome=o) for o in ("store", "disk")}
    assert acquires == {"store": 2, "disk": 1}
    assert value(metrics, "lora_gateway_adapter_acquires_total", outcome="resident") == 1
    assert value(metrics, "lora_gateway_adapter_acquires_total", outcome="failed") == 1
    assert value(metrics, "lora_gateway_adapter_acquire_seconds_count", outcome="store") == 2
    # Moves into each tier: three versions fetched to disk; four add_lora calls, one refused.
    assert value(metrics, "lora_gateway_adapter_loads_total", tier="disk", outcome="ok") == 3
    assert value(metrics, "lora_gateway_adapter_loads_total", tier="engine", outcome="ok") == 3
    assert value(metrics, "lora_gateway_adapter_loads_total", tier="engine", outcome="error") == 1
    assert value(metrics, "lora_gateway_adapter_load_seconds_count", tier="disk") == 3
    # adapter0 made room for adapter1, adapter1 for adapter0, adapter0 for the broken adapter2.
    assert value(metrics, "lora_gateway_adapter_evictions_total", reason="lru") == 3
    assert value(metrics, "lora_gateway_resident_adapters") == 0
    assert value(metrics, "lora_gateway_disk_cache_bytes") > 0
    assert value(metrics, "lora_gateway_adapter_syncs_total", outcome="ok") >= 1
    assert 0 <= value(metrics, "lora_gateway_adapter_sync_age_seconds") < 60


async def test_every_inference_endpoint_is_counted_under_its_own_label(start: Any) -> None:
    client, _, _ = await start(adapters=1)
    calls = {  # endpoint label -> (path, body)
        "chat_completions": (
            "/v1/chat/completions",
            {"model": "user0/adapter0", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        ),
        "responses": ("/v1/responses", {"model": "user0/adapter0", "input": "Hi", "max_output_tokens": 2}),
        "tokenize": ("/tokenize", {"model": BASE, "prompt": "Hi"}),
        "detokenize": ("/detokenize", {"model": BASE, "tokens": [44, 77]}),
    }
    for path, body in calls.values():
        resp = await client.post(path, json=body)
        assert resp.status == 200, await resp.text()
    metrics = await scrape(client)
    for endpoint in calls:
        labels = {"endpoint": endpoint, "stream": "false", "outcome": "ok"}
        assert value(metrics, "lora_gateway_requests_total", **labels) == 1, endpoint
        assert value(metrics, "lora_gateway_request_duration_seconds_count", **labels) == 1, endpoint
    ttft = "lora_gateway_time_to_first_token_seconds_count"
    assert value(metrics, ttft, endpoint="chat_completions", stream="false", adapter_source="store") == 1
    assert value(metrics, ttft, endpoint="responses", stream="false", adapter_source="resident") == 1
    # Tokenizing generates nothing: no first token to time.
    assert not [key for key in metrics if key[0] == ttft and ("endpoint", "tokenize") in key[1]]
    assert not [key for key in metrics if key[0] == ttft and ("endpoint", "detokenize") in key[1]]


async def test_label_sets_do_not_grow_with_the_number_of_adapters(start: Any) -> None:
    client, _, _ = await start(adapters=12, max_loras=2, max_cpu_loras=2)
    for i in range(3):  # cold loads and an eviction
        assert await complete(client, f"user{i}/adapter{i}") == 200
    before = {key for key in await scrape(client) if key[0].startswith("lora_gateway_")}
    for i in range(3, 12):
        assert await complete(client, f"user{i}/adapter{i}") == 200
    after = await scrape(client)
    assert {key for key in after if key[0].startswith("lora_gateway_")} == before
    # (Not `lora_gateway:lora_requests_info`: it names adapters for the picker, one series at a time.)
    labels = {v for name, pairs in after if name.startswith("lora_gateway_") for _, v in pairs}
    assert not [v for v in labels if v.startswith("user")]  # no user or adapter names


async def test_requests_waiting_for_their_fair_share_are_counted(start: Any) -> None:
    engine = FakeEngine(max_model_len=256, token_delay_s=0.05)
    client, _, _ = await start(engine=engine, max_running_per_user=1)
    queued = "lora_gateway_requests_queued"
    metrics = await scrape(client)
    assert value(metrics, queued, waiting_for="fair_share") == value(metrics, queued, waiting_for="adapter_slot") == 0

    # Two requests of one user (without auth every caller is `dev`): the second waits for the running one.
    first = asyncio.create_task(complete(client, "user0/adapter0", max_tokens=20))
    await until(lambda: engine.active_generations == 1)
    second = asyncio.create_task(complete(client, "user1/adapter1", max_tokens=1))
    await asyncio.sleep(0.05)
    metrics = await scrape(client)
    assert value(metrics, queued, waiting_for="fair_share") == 1
    assert value(metrics, queued, waiting_for="adapter_slot") == 0
    assert await asyncio.gather(first, second) == [200, 200]
    assert value(await scrape(client), queued, waiting_for="fair_share") == 0


async def test_requests_waiting_for_an_engine_slot_are_counted(start: Any) -> None:
    engine = FakeEngine(max_model_len=256, token_delay_s=0.05)
    client, _, _ = await start(engine=engine, max_loras=1, max_cpu_loras=1, adapter_wait_timeout_s=10)
    queued = "lora_gateway_requests_queued"

    # Another adapter while the only engine slot is in use: it waits for the slot.
    busy = asyncio.create_task(complete(client, "user0/adapter0", max_tokens=20))
    await until(lambda: engine.active_generations == 1)
    other = asyncio.create_task(complete(client, "user1/adapter1", max_tokens=1))
    await asyncio.sleep(0.05)
    metrics = await scrape(client)
    assert value(metrics, queued, waiting_for="adapter_slot") == 1
    assert value(metrics, queued, waiting_for="fair_share") == 0
    assert await asyncio.gather(busy, other) == [200, 200]
    assert value(await scrape(client), queued, waiting_for="adapter_slot") == 0


async def test_the_engine_seats_in_use_are_the_sequences_admitted_and_not_yet_ended(start: Any) -> None:
    engine = FakeEngine(max_model_len=256, token_delay_s=0.05)
    client, _, _ = await start(engine=engine, engine_seats=6)
    in_use = "lora_gateway_engine_seats_in_use"
    metrics = await scrape(client)
    assert value(metrics, "lora_gateway_engine_seats") == 6 and value(metrics, in_use) == 0

    running = [
        asyncio.create_task(complete(client, "user0/adapter0", max_tokens=20, n=2)),
        asyncio.create_task(complete(client, BASE, max_tokens=20)),
    ]
    await until(lambda: engine.active_generations == 2)
    assert value(await scrape(client), in_use) == 3  # n=2 takes two seats, the base request one
    assert await asyncio.gather(*running) == [200, 200]
    assert value(await scrape(client), in_use) == 0


async def test_the_engines_default_registry_is_served_alongside(start: Any) -> None:
    # vLLM's in-process engine records its metrics (vllm:*) in prometheus_client's default registry.
    client, _, _ = await start(adapters=0)
    engine_gauge = Gauge("lora_gateway_test_engine_side", "Stands for vLLM's metrics.", registry=REGISTRY)
    try:
        engine_gauge.set(7)
        metrics = await scrape(client)
    finally:
        REGISTRY.unregister(engine_gauge)
    assert value(metrics, "lora_gateway_test_engine_side") == 7
    assert ("lora_gateway_resident_adapters", frozenset()) in metrics


def lora_info(samples: Samples) -> tuple[dict[str, str], float]:
    """The one series of the LoRA info gauge: its labels and value."""
    series = [(dict(labels), v) for (name, labels), v in samples.items() if name == LORA_INFO]
    assert len(series) == 1, series  # one series at a time, however the adapters in flight change
    return series[0]


async def test_lora_requests_info_names_the_adapters_in_flight_as_clients_do(start: Any, tmp_path: Path) -> None:
    # The endpoint picker matches a request's `model` (`owner/name`) with these names.
    await publish_adapter(LocalFolderStore(tmp_path / "store"), tmp_path, "alice", "chat", base_model=BASE)
    engine = GatedEngine(max_model_len=256)
    client, _, _ = await start(adapters=0, engine=engine, max_loras=3)
    labels, _ = lora_info(await scrape(client))
    assert labels == {"max_lora": "3", "running_lora_adapters": "", "waiting_lora_adapters": ""}

    request = asyncio.create_task(complete(client, "alice/chat"))
    await until(lambda: engine.active_generations == 1)
    labels, stamp = lora_info(await scrape(client))
    assert labels == {"max_lora": "3", "running_lora_adapters": "alice/chat", "waiting_lora_adapters": ""}
    assert abs(stamp - time.time()) < 60  # a unix timestamp, as vLLM sets it

    engine.release.set()
    assert await request == 200
    labels, _ = lora_info(await scrape(client))
    assert labels["running_lora_adapters"] == labels["waiting_lora_adapters"] == ""


async def test_lora_requests_info_lists_adapters_waiting_for_a_slot_or_their_load(start: Any) -> None:
    engine = GatedEngine(max_model_len=256)
    client, _, _ = await start(engine=engine, max_loras=1, max_cpu_loras=1, adapter_wait_timeout_s=10)

    def adapters(samples: Samples) -> tuple[str, str]:
        labels, _ = lora_info(samples)
        return labels["running_lora_adapters"], labels["waiting_lora_adapters"]

    busy = asyncio.create_task(complete(client, "user0/adapter0"))
    await until(lambda: engine.active_generations == 1)
    # The only engine slot is busy: both others wait for it (sorted, comma-joined, once each).
    refs = ("user2/adapter2", "user1/adapter1", "user1/adapter1")
    others = [asyncio.create_task(complete(client, ref)) for ref in refs]
    await asyncio.sleep(0.05)
    assert adapters(await scrape(client)) == ("user0/adapter0", "user1/adapter1,user2/adapter2")

    # Once the slot frees, the next adapter's load is in flight: its requests still wait.
    engine.add_gate = asyncio.Event()
    engine.release.set()
    assert await busy == 200
    await until(lambda: engine.add_calls[-1].startswith(("user1/", "user2/")))
    running, waiting = adapters(await scrape(client))
    assert running == "" and waiting == "user1/adapter1,user2/adapter2"

    engine.add_gate.set()
    assert await asyncio.gather(*others) == [200, 200, 200]
    assert adapters(await scrape(client)) == ("", "")
