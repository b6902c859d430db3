"""What the gateway measures: its Prometheus instruments and the gauges read at scrape time, on a
registry of the app's own (no process-wide state); GET /metrics serves them (api/metrics_page.py).

Labels stay bounded whatever the number of adapters or users: endpoint, stream, outcome, tier
and reason take a handful of values each. Adapter and user names are never labels (thousands
of adapters would mean thousands of series per metric); per-adapter detail lives in traces. The
one exception is `lora_gateway:lora_requests_info`: it restates vLLM's LoRA gauge with the names
clients send (`owner/name`) instead of the engine's (`owner/name@version`), so that the Gateway API
Inference Extension's endpoint picker (`--lora-info-metric=lora_gateway:lora_requests_info`) can
match a request's `model` to the pods already serving that adapter; it is served only to
authorised scrapers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from gateway.auth.middleware import ApiKeyAuthenticator, Authenticator

if TYPE_CHECKING:  # the objects measured import the instruments
    from gateway.catalog import AdapterCatalog
    from gateway.disk_cache import DiskCache
    from gateway.engine_seats import EngineSeats
    from gateway.pool import AdapterPool, LoraActivity

LORA_REQUESTS_INFO = "lora_gateway:lora_requests_info"


# Seconds: from a resident hit (microseconds) to a cold load from a slow store (tens of seconds).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# Tiers an adapter moves into: `disk` (fetched from the store), `engine` (registered with add_lora).
TIER_DISK, TIER_ENGINE = "disk", "engine"


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "lora_gateway_requests",
            "Completion requests by endpoint, stream and outcome (ok, invalid, not_found, rate_limited, "
            "adapter_failed, unavailable, error, cancelled).",
            ["endpoint", "stream", "outcome"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "lora_gateway_request_duration_seconds",
            "Completion request latency, to the last byte, by endpoint, stream and outcome.",
            ["endpoint", "stream", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "lora_gateway_time_to_first_token_seconds",
            "From the request's arrival to the engine's first token, by endpoint, stream and where the "
            "adapter came from (base, resident, disk, store).",
            ["endpoint", "stream", "adapter_source"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.adapter_acquires = Counter(
            "lora_gateway_adapter_acquires",
            "Adapters acquired for a request, by outcome: resident, disk (registered from local disk), "
            "store (fetched first), failed.",
            ["outcome"],
            registry=registry,
        )
        self.adapter_acquire_seconds = Histogram(
            "lora_gateway_adapter_acquire_seconds",
            "Time a request waited for its adapter, by outcome.",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.adapter_slot_wait_seconds = Histogram(
            "lora_gateway_adapter_slot_wait_seconds",
            "Time a request queued for an engine adapter slot (requests that queued, served or timed out).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.engine_seat_wait_seconds = Histogram(
            "lora_gateway_engine_seat_wait_seconds",
            "Time a request queued for seats in the engine (its sequences; requests that queued, served or not).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.admission_refusals = Counter(
            "lora_gateway_admission_refusals",
            "Requests refused with 503 by admission, by what for (engine_seat, adapter_slot) and why (the queue "
            "could not serve them in time: estimate; they waited past the deadline: timeout; the queue is full).",
            ["waiting_for", "reason"],
            registry=registry,
        )
        self.adapter_loads = Counter(
            "lora_gateway_adapter_loads",
            "Adapter moves into a tier (disk: fetched from the store; engine: add_lora), by outcome (ok, error).",
            ["tier", "outcome"],
            registry=registry,
        )
        self.adapter_load_seconds = Histogram(
            "lora_gateway_adapter_load_seconds",
            "Duration of an adapter's move into a tier (disk: fetch and verify; engine: add_lora).",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.adapter_evictions = Counter(
            "lora_gateway_adapter_evictions",
            "Adapters removed from the engine, by reason (lru: room for another; retired: new version or deleted).",
            ["reason"],
            registry=registry,
        )
        self.queued = Gauge(
            "lora_gateway_requests_queued",
            "Requests waiting, by what for: fair_share (the user's running limit), engine_seat (room for "
            "their sequences in the engine) or adapter_slot (a free engine adapter slot).",
            ["waiting_for"],
            registry=registry,
        )
        self.syncs = Counter(
            "lora_gateway_adapter_syncs",
            "Sync cycles with the adapter store, by outcome (ok, error).",
            ["outcome"],
            registry=registry,
        )
        self.route_decisions = Counter(
            "lora_gateway_route_decisions",
            "Routing decisions of model 'auto', by outcome (adapter: one of the caller's adapters; base: none "
            "reached the threshold).",
            ["outcome"],
            registry=registry,
        )
        self.route_seconds = Histogram(
            "lora_gateway_route_seconds",
            "Time a routing decision took (embedding the prompt, and any routes not embedded yet).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # Series of the small fixed label sets exist (at 0) from the start: rates work from the first event.
        for waiting_for in ("fair_share", "engine_seat", "adapter_slot"):
            self.queued.labels(waiting_for)
        for waiting_for in ("engine_seat", "adapter_slot"):
            for reason in ("estimate", "timeout", "full"):
                self.admission_refusals.labels(waiting_for, reason)
        for outcome in ("resident", "disk", "store", "failed"):
            self.adapter_acquires.labels(outcome)
        for tier in (TIER_DISK, TIER_ENGINE):
            for outcome in ("ok", "error"):
                self.adapter_loads.labels(tier, outcome)
        for reason in ("lru", "retired"):
            self.adapter_evictions.labels(reason)
        for outcome in ("ok", "error"):
            self.syncs.labels(outcome)
        for outcome in ("adapter", "base"):
            self.route_decisions.labels(outcome)

    def load_finished(self, tier: str, seconds: float, ok: bool) -> None:
        self.adapter_loads.labels(tier, "ok" if ok else "error").inc()
        if ok:
            self.adapter_load_seconds.labels(tier).observe(seconds)

    @contextmanager
    def waiting(self, waiting_for: str) -> Iterator[None]:
        gauge = self.queued.labels(waiting_for)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()


def detached_metrics() -> GatewayMetrics:
    """Instruments on a registry nobody scrapes: for parts used outside an app (tests, benchmarks)."""
    return GatewayMetrics(CollectorRegistry())


def elapsed_since(started: float) -> float:
    return time.perf_counter() - started


def state_families(
    catalog: AdapterCatalog,
    disk_cache: DiskCache | None,
    pool: AdapterPool | None,
    activity: LoraActivity | None,
    max_loras: int,
    authenticator: Authenticator,
    seats: EngineSeats | None = None,
) -> Iterator[Metric]:
    """The gauges read from the live objects at scrape time."""
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
    if disk_cache is not None:
        yield GaugeMetricFamily(
            "lora_gateway_disk_cache_bytes",
            "Bytes of adapter files in the local disk cache.",
            value=disk_cache.used_bytes,
        )
    yield GaugeMetricFamily(
        "lora_gateway_resident_adapters",
        "User adapters registered in the engine.",
        value=0 if pool is None else len(pool.resident()),
    )
    yield lora_requests_info(activity, max_loras)
    if seats is not None:
        yield GaugeMetricFamily(
            "lora_gateway_engine_seats", "The engine's sequences the gateway admits at once.", value=seats.seats
        )
        yield GaugeMetricFamily(
            "lora_gateway_engine_seats_in_use",
            "Of those, the sequences of requests admitted into the engine and not yet ended.",
            value=seats.in_use,
        )
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


def lora_requests_info(activity: LoraActivity | None, max_lora: int) -> GaugeMetricFamily:
    """vLLM's `vllm:lora_requests_info` format (labels `max_lora`, `running_lora_adapters`,
    `waiting_lora_adapters`, comma-joined; value: the current unix time), with `owner/name` refs.
    Made afresh at each scrape, so there is one series at a time: the picker takes the newest anyway."""
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
