"""GET /metrics: Prometheus text, the gateway's and the engine's.

The gateway's metrics live in a registry of this app's own (no process-wide state): gauges read
from the live objects at scrape time, and the instruments in `telemetry/instruments.py`. vLLM's
in-process AsyncLLM registers its own metrics (`vllm:*`, among them `vllm:lora_requests_info`)
in prometheus_client's default registry; they are served from there, on the same endpoint.

`lora_gateway:lora_requests_info` restates vLLM's LoRA gauge with the names clients send
(`owner/name`) instead of the engine's (`owner/name@version`), so that the Gateway API Inference
Extension's endpoint picker (`--lora-info-metric=lora_gateway:lora_requests_info`) can match a
request's `model` to the pods already serving that adapter.

Adapter names are tenants' data: the page on the API port is open (no API key), so it leaves out
every series whose labels name adapters (these LoRA gauges, the gateway's and vLLM's). Scrapers
that need them are authorised one of two ways: `Authorization: Bearer <--metrics-token>` on the
API port, or the separate `--metrics-port`, which serves the whole page and nothing else (for the
endpoint picker's `--model-server-metrics-port`; who may reach it is the network's business).
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.app_keys import CATALOG, DISK_CACHE, METRICS_REGISTRY, SERVING, SETTINGS
from gateway.auth.middleware import AUTHENTICATOR, ApiKeyAuthenticator
from gateway.errors import AuthenticationError, error_middleware
from gateway.pool import AdapterPool

LORA_REQUESTS_INFO = "lora_gateway:lora_requests_info"
# Labels whose values are adapter names (vLLM's lora_requests_info and the gateway's restatement).
ADAPTER_NAME_LABELS = frozenset({"running_lora_adapters", "waiting_lora_adapters"})

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayStateCollector(Collector):
    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self) -> Iterator[Metric]:
        catalog = self._app[CATALOG]
        since = catalog.seconds_since_sync()
        yield GaugeMetricFamily(
            "lora_gateway_adapter_sync_age_seconds",
            "Seconds since the last successful sync with the adapter store (NaN before the first).",
            value=float("nan") if since is None else since,
        )
        yield GaugeMetricFamily(
            "lora_gateway_adapter_sync_failing",
            "1 while the last sync attempt failed (the store is unreachable), else 0.",
            value=0.0 if catalog.last_error is None else 1.0,
        )
        yield GaugeMetricFamily("lora_gateway_adapters_known", "Adapters in the synced catalog.", value=len(catalog))
        if DISK_CACHE in self._app:
            yield GaugeMetricFamily(
                "lora_gateway_disk_cache_bytes",
                "Bytes of adapter files in the local disk cache.",
                value=self._app[DISK_CACHE].used_bytes,
            )
        pool = self._app[SERVING].pool
        yield GaugeMetricFamily(
            "lora_gateway_resident_adapters",
            "User adapters registered in the engine.",
            value=0 if pool is None else len(pool.resident()),
        )
        yield lora_requests_info(pool, self._app[SETTINGS].max_loras)
        authenticator = self._app[AUTHENTICATOR]
        if isinstance(authenticator, ApiKeyAuthenticator):
            status = authenticator.keys.status
            yield GaugeMetricFamily(
                "lora_gateway_keys_file_valid",
                "1 while the keys file was read whole and valid; 0: entries refused, or the file (see the log).",
                value=1.0 if status.valid else 0.0,
            )
            yield GaugeMetricFamily(
                "lora_gateway_keys_file_refused_entries",
                "Entries of the keys file that let no one in (invalid, or a hash in two entries).",
                value=status.refused_entries,
            )


def lora_requests_info(pool: AdapterPool | None, max_lora: int) -> GaugeMetricFamily:
    """vLLM's `vllm:lora_requests_info` format (labels `max_lora`, `running_lora_adapters`,
    `waiting_lora_adapters`, comma-joined; value: the current unix time), with `owner/name` refs.
    Made afresh at each scrape, so there is one series at a time: the picker takes the newest anyway."""
    activity = None if pool is None else pool.lora_activity()
    family = GaugeMetricFamily(
        LORA_REQUESTS_INFO,
        "Adapters (owner/name) with requests running or waiting, in vLLM's lora_requests_info format "
        "(the Inference Extension's --lora-info-metric); the value is the unix time of the scrape.",
        labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
    )
    family.add_metric(
        [
            str(max_lora),
            "" if activity is None else ",".join(sorted(activity.running)),
            "" if activity is None else ",".join(sorted(activity.waiting)),
        ],
        time.time(),
    )
    return family


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
