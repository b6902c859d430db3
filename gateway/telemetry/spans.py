"""Span names and attributes of the adapter paths, in one place so traces and tests agree.

Attributes never carry secrets: a store is named by its public URL (`s3://bucket/prefix`) or
`file`, never by an endpoint with user info, and API keys never reach a span.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, Status, StatusCode, Tracer

from adapters_manifest.record import AdapterRecord

TRACER_NAME = "lora_gateway"

# Span names
ACQUIRE = "adapter.acquire"  # a request gets its adapter into the engine (or finds it there)
FETCH = "adapter.fetch"  # store -> local disk
VERIFY = "adapter.verify"  # validation of the local files before the engine sees them
REGISTER = "adapter.register"  # engine add_lora
EVICT = "adapter.evict"  # engine remove_lora: which adapter left, and why
GENERATE = "engine.generate"  # the generation, with a first_token event
SYNC = "adapter.sync"  # one sync cycle with the store: a trace of its own
ROUTE = "adapter.route"  # model "auto": which of the caller's adapters answers
FIRST_TOKEN_EVENT = "first_token"

# Adapter identity on every adapter span (and on the request span)
ADAPTER_OWNER = "adapter.owner"
ADAPTER_NAME = "adapter.name"
ADAPTER_VERSION = "adapter.version"

ACQUIRE_OUTCOME = "adapter.acquire.outcome"  # resident | disk | store | failed
ACQUIRE_JOINED = "adapter.acquire.joined_load"  # waited for a load another request started
ACQUIRE_QUEUE_POSITION = "adapter.acquire.queue_position"  # 1: first in line for a slot; 0: did not queue
ACQUIRE_SLOT_WAIT = "adapter.acquire.slot_wait_s"  # seconds queued for an engine slot (0: did not queue)
# On the request's span: the engine seats it took (its sequences), its place in their queue and its wait
SEATS_TAKEN = "gateway.engine_seats.taken"
SEATS_QUEUE_POSITION = "gateway.engine_seats.queue_position"  # 0: did not queue
SEATS_WAIT = "gateway.engine_seats.wait_s"
FETCH_SOURCE = "adapter.fetch.source"
FETCH_BYTES = "adapter.fetch.bytes"
FETCH_RETRIES = "adapter.fetch.retries"
FETCH_DURATION = "adapter.fetch.duration_s"
ENGINE_ID = "adapter.engine_id"
EVICT_REASON = "adapter.evict.reason"  # lru | retired
SYNC_SOURCE = "adapter.sync.source"
SYNC_LISTED = "adapter.sync.records_listed"
SYNC_CHANGED = "adapter.sync.records_changed"
SYNC_REMOVED = "adapter.sync.records_removed"
SYNC_ERRORS = "adapter.sync.errors"
ROUTE_CANDIDATES = "adapter.route.candidates"  # owner/name of each adapter scored, in order
ROUTE_SCORES = "adapter.route.scores"  # each candidate's best cosine similarity, same order
ROUTE_CHOSEN = "adapter.route.chosen"  # owner/name, or "" for the base
ROUTE_OUTCOME = "adapter.route.outcome"  # adapter | base
ROUTE_THRESHOLD = "adapter.route.threshold"

# Where an acquired adapter came from (also a metric label: a handful of values)
RESIDENT, DISK, STORE, FAILED = "resident", "disk", "store", "failed"
# What a routing decision served (also a metric label)
ROUTED_ADAPTER, ROUTED_BASE = "adapter", "base"


def tracer_of(provider: trace.TracerProvider) -> Tracer:
    return provider.get_tracer(TRACER_NAME)


def adapter_attributes(record: AdapterRecord) -> dict[str, str]:
    return {ADAPTER_OWNER: record.owner, ADAPTER_NAME: record.name, ADAPTER_VERSION: record.version}


def store_source(store_url: str) -> str:
    """A store as spans name it: `s3://bucket/prefix` without user info, or `file` for a local folder."""
    parts = urlsplit(store_url)
    if parts.scheme in ("", "file"):
        return "file"
    return f"{parts.scheme}://{parts.hostname or ''}{parts.path}"


def fail(span: Span, reason: str) -> None:
    """Mark a span failed with a reason a reader of the trace can act on."""
    span.set_status(Status(StatusCode.ERROR, reason))


def root_context_linked_to_current() -> tuple[Context, list[Link]]:
    """A fresh trace (empty context) linked to the span that caused it, if any (e.g. /admin/sync)."""
    current = trace.get_current_span().get_span_context()
    return Context(), [Link(current)] if current.is_valid else []
