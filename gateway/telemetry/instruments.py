"""The gateway's Prometheus instruments, on a registry of the app's own (see gateway/metrics.py).

Labels stay bounded whatever the number of adapters or users: endpoint, stream, outcome, tier
and reason take a handful of values each. Adapter and user names are never labels (thousands
of adapters would mean thousands of series per metric); per-adapter detail lives in traces.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
