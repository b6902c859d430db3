"""GET /metrics: Prometheus text, the gateway's and the engine's.

vLLM's in-process AsyncLLM registers its own metrics (`vllm:*`, among them `vllm:lora_requests_info`)
in prometheus_client's default registry; they are served from there, on the same endpoint.

Adapter names are tenants' data: the page on the API port is open (no API key), so it leaves out
every series whose labels name adapters (the LoRA gauges, the gateway's and vLLM's). Scrapers
that need them are authorised one of two ways: `Authorization: Bearer <--metrics-token>` on the
API port, or the separate `--metrics-port`, which serves the whole page and nothing else (for the
endpoint picker's `--model-server-metrics-port`; who may reach it is the network's business).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from gateway.app_keys import CATALOG, DISK_CACHE, METRICS_REGISTRY, SERVING, SETTINGS
from gateway.auth.middleware import AUTHENTICATOR
from gateway.errors import AuthenticationError, error_middleware
from gateway.metrics import state_families

# Labels whose values are adapter names (vLLM's lora_requests_info and the gateway's restatement).
ADAPTER_NAME_LABELS = frozenset({"running_lora_adapters", "waiting_lora_adapters"})

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayStateCollector(Collector):
    """The app's state gauges; the disk cache and the engine's pool arrive at start-up, so they are
    looked up at each scrape."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self) -> Iterator[Metric]:
        app = self._app
        serving = app[SERVING]
        admission = serving.admission
        yield from state_families(
            app[CATALOG],
            app.get(DISK_CACHE),
            serving.pool,
            None if admission is None else admission.lora_activity(),
            app[SETTINGS].max_loras,
            app[AUTHENTICATOR],
            None if admission is None else admission.seats,
        )


def register_state_collector(app: web.Application) -> None:
    """Once the objects it reads (catalog, serving state) are in the app."""
    app[METRICS_REGISTRY].register(GatewayStateCollector(app))


def engine_registry() -> CollectorRegistry:
    """Where vLLM's in-process engine records its metrics (vllm.v1.metrics.prometheus does the same)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


class WithoutAdapterNames:
    """A registry as an unauthorised scraper sees it: no family with a label that names adapters."""

    def __init__(self, registry: Collector) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            if not any(ADAPTER_NAME_LABELS.intersection(sample.labels) for sample in family.samples):
                yield family


def page(app: web.Application, *, with_adapter_names: bool) -> web.Response:
    registries: list[Any] = [app[METRICS_REGISTRY], engine_registry()]
    if not with_adapter_names:
        registries = [WithoutAdapterNames(registry) for registry in registries]
    body = b"".join(generate_latest(registry) for registry in registries)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def is_authorised_scraper(request: web.Request) -> bool:
    """True with the metrics token (or with authentication off); False without credentials;
    AuthenticationError for a wrong token (its scraper should hear so, not get the public page)."""
    settings = request.app[SETTINGS]
    if settings.insecure_no_auth:  # every caller is an admin, who may list every adapter anyway
        return True
    token = settings.metrics_token
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if token is None or not presented:
        return False
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), expected):
        raise AuthenticationError("Incorrect metrics token.")
    return True


async def metrics(request: web.Request) -> web.Response:
    return page(request.app, with_adapter_names=is_authorised_scraper(request))


def metrics_only_app(serving_app: web.Application) -> web.Application:
    """What `--metrics-port` serves: GET /metrics of `serving_app`, adapter names included."""
    app = web.Application(middlewares=[error_middleware])

    async def whole_page(request: web.Request) -> web.Response:
        return page(serving_app, with_adapter_names=True)

    app.router.add_get("/metrics", whole_page)
    return app
