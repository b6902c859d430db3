"""GET /metrics: Prometheus text, from a registry of this app's own (no process-wide state).

Gauges are read from the live objects at scrape time, so nothing has to be kept in step.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.app_keys import CATALOG, DISK_CACHE, METRICS_REGISTRY, SERVING


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


def build_registry(app: web.Application) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(GatewayStateCollector(app))
    return registry


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
