"""/metrics names no user's adapter to a scraper that is not authorised: the default page (open,
on the API port) leaves out every series whose labels name adapters, the gateway's and vLLM's.
Authorised scrapers get them: with the metrics token, or on the separate metrics port."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY, Gauge

from gateway.api.metrics_page import metrics_only_app
from gateway.auth.keys import add_key
from tests.fakes import FakeEngine, GatedEngine
from tests.unit.harness import LORA_INFO, StartGateway, parse, until

TOKEN = "metrics-scraper-token-0123456789"
ADAPTER = "user0/adapter0"


@pytest.fixture
def start(start_gateway: StartGateway, tmp_path: Path) -> Any:
    """The app with ADAPTER published, and API keys: the way a gateway is run. Gives the user's key."""
    keys_file = tmp_path / "keys.yaml"
    key, _ = add_key(keys_file, "user0")

    async def start_app(engine: FakeEngine, **settings: Any) -> tuple[TestClient, web.Application, str]:
        gw = await start_gateway(engine, adapters=[ADAPTER], keys_file=keys_file, **settings)
        return gw.client, gw.app, key

    return start_app


async def in_flight(start: Any, **settings: Any) -> tuple[Any, Any, GatedEngine, asyncio.Task[Any], Gauge]:
    """A gateway generating with ADAPTER, and vLLM's own LoRA gauge naming it as the engine does."""
    engine = GatedEngine(max_model_len=256)
    client, app, key = await start(engine, **settings)
    request = asyncio.create_task(
        client.post(
            "/v1/completions",
            json={"model": ADAPTER, "prompt": "Hi", "max_tokens": 2},
            headers={"Authorization": f"Bearer {key}"},
        )
    )
    await until(lambda: engine.active_generations == 1)
    vllm_gauge = Gauge(
        "vllm:lora_requests_info",
        "Stands for vLLM's gauge.",
        ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        registry=REGISTRY,
    )
    vllm_gauge.labels("4", f"{ADAPTER}@0123abcd", "").set_to_current_time()
    return client, app, engine, request, vllm_gauge


async def finish(engine: GatedEngine, request: asyncio.Task[Any], vllm_gauge: Gauge) -> None:
    REGISTRY.unregister(vllm_gauge)
    engine.release.set()
    resp = await request
    assert resp.status == 200, await resp.text()


async def test_an_anonymous_scrape_names_no_adapter(start: Any) -> None:
    client, _, engine, request, vllm_gauge = await in_flight(start)
    try:
        resp = await client.get("/metrics")
        text = await resp.text()
    finally:
        await finish(engine, request, vllm_gauge)
    assert resp.status == 200
    assert "user0" not in text and "adapter0" not in text
    samples = parse(text)
    assert not [name for name, _ in samples if name in (LORA_INFO, "vllm:lora_requests_info")]
    assert ("lora_gateway_resident_adapters", frozenset()) in samples  # the rest of the page is there


async def test_the_metrics_token_unlocks_the_adapter_names(start: Any) -> None:
    client, _, engine, request, vllm_gauge = await in_flight(start, metrics_token=TOKEN)
    try:
        authorised = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        full = await authorised.text()
        anonymous = await (await client.get("/metrics")).text()
        wrong = await client.get("/metrics", headers={"Authorization": "Bearer not-the-token"})
    finally:
        await finish(engine, request, vllm_gauge)
    assert authorised.status == 200
    labels = next(dict(labels) for (name, labels) in parse(full) if name == LORA_INFO)
    assert labels["running_lora_adapters"] == ADAPTER
    assert f"{ADAPTER}@0123abcd" in full  # vLLM's own gauge too
    assert ADAPTER not in anonymous
    assert wrong.status == 401 and ADAPTER not in await wrong.text()


async def test_the_metrics_port_serves_the_whole_page_and_nothing_else(start: Any, aiohttp_client: Any) -> None:
    client, app, engine, request, vllm_gauge = await in_flight(start)
    try:
        scraper = await aiohttp_client(metrics_only_app(app))
        resp = await scraper.get("/metrics")
        full = await resp.text()
        others = [(await scraper.get(path)).status for path in ("/v1/models", "/readyz", "/admin/resident")]
    finally:
        await finish(engine, request, vllm_gauge)
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    labels = next(dict(labels) for (name, labels) in parse(full) if name == LORA_INFO)
    assert labels["running_lora_adapters"] == ADAPTER
    assert others == [404, 404, 404]
