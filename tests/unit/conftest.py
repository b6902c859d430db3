"""The unit tests' fixtures: the real app on a fake engine (`start_gateway`, `gw`), every store kind
(`store`), and no ambient settings. The plain helpers they build on are in tests/unit/harness.py."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import TracerProvider

from adapters_manifest.local_store import LocalFolderStore
from adapters_manifest.open_store import open_store
from adapters_manifest.store import AdapterStore
from gateway.engine.interface import Engine
from gateway.routing.encoder import SentenceEncoder
from gateway.settings import ServeSettings
from tests.fakes import FakeEngine, publish_adapter
from tests.unit.harness import (
    ADAPTERS,
    BASE,
    MAX_MODEL_LEN,
    Gateway,
    StartGateway,
    fresh_s3_url,
    gateway_app,
    gateway_settings,
    use_aws_env,
)


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LORA_GATEWAY_* or OTEL_* variable of the machine running the tests reaches a test."""
    for name in list(os.environ):
        if name.upper().startswith(("LORA_GATEWAY_", "OTEL_")):
            monkeypatch.delenv(name)


@pytest.fixture
async def start_gateway(tmp_path: Path, aiohttp_client: Any) -> AsyncIterator[StartGateway]:
    """Start the app on a fake engine: `await start_gateway(engine=None, **settings)` -> Gateway.

    Publishes `adapters` (refs, default ADAPTERS) into `store` (default: a local folder under
    tmp_path) first, and waits until /readyz says ready unless `ready=False`. Settings are
    ServeSettings fields (see harness.gateway_settings). At the end, every engine it started must
    have had every guarantee the gateway owes it kept (FakeEngine.check).
    """
    engines: list[FakeEngine] = []

    async def start(
        engine: FakeEngine | None = None,
        *,
        factory: Callable[[ServeSettings], Engine] | None = None,
        encoder: SentenceEncoder | None = None,
        tracer_provider: TracerProvider | None = None,
        store: AdapterStore | None = None,
        adapters: Iterable[str] = ADAPTERS,
        ready: bool = True,
        **settings: Any,
    ) -> Gateway:
        engine = engine or FakeEngine(max_model_len=MAX_MODEL_LEN)
        engines.append(engine)
        store = store or LocalFolderStore(tmp_path / "store")
        records = {}
        for ref in adapters:
            owner, name = ref.split("/")
            records[ref] = await publish_adapter(store, tmp_path, owner, name, base_model=BASE)
        app = gateway_app(
            gateway_settings(tmp_path, store, **settings),
            engine,
            factory=factory,
            encoder=encoder,
            tracer_provider=tracer_provider,
        )
        client = await aiohttp_client(app)
        gateway = Gateway(client, app, engine, store, records, tmp_path)  # type: ignore[arg-type]
        if ready:
            await gateway.wait_ready()
        return gateway

    yield start
    for engine in engines:
        engine.check()


@pytest.fixture
async def gw(start_gateway: StartGateway) -> Gateway:
    """The app with its defaults: ADAPTERS published, no authentication."""
    return await start_gateway()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AdapterStore:
    """Each store kind in turn, empty: a local folder, and S3 on moto's server (its own prefix).
    A module that wants a store of its own kind defines its own `store` fixture."""
    if request.param == "local":
        return LocalFolderStore(tmp_path / "store")
    use_aws_env(monkeypatch, request.getfixturevalue("s3_server"))
    return open_store(fresh_s3_url())  # endpoint from AWS_ENDPOINT_URL, as in a gateway
