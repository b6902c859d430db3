"""The span tree of each adapter path, on the real app with a fake engine and an in-memory exporter:
cold (store -> disk -> engine), warm disk, resident hit, eviction churn, a failed adapter, an S3
error during the fetch, and sync cycles. Each request sends a W3C traceparent, as a client would,
and the test reads that trace back."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from adapters_manifest.open_store import open_store
from adapters_manifest.publish import publish, record_for
from adapters_manifest.record import AdapterRecord
from adapters_manifest.store import AdapterStore
from gateway.telemetry import spans
from gateway_tools.dev.s3_server import S3Server
from tests.fakes import FakeEngine, write_adapter_dir
from tests.unit.harness import BASE, StartGateway, until

ADAPTERS = ("alice/coding", "alice/poems", "alice/notes")


@dataclass
class Traced:
    client: TestClient
    app: web.Application
    engine: FakeEngine
    exporter: InMemorySpanExporter
    store: AdapterStore
    records: dict[str, AdapterRecord]
    scratch: Path

    def finished(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    async def complete(self, model: str, **body: Any) -> tuple[ClientResponse, str, str]:
        """POST /v1/completions under a client span of our own: (response, trace id, client span id)."""
        trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
        resp = await self.client.post(
            "/v1/completions",
            json={"model": model, "prompt": "Hello", "max_tokens": 3, **body},
            headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
        )
        await resp.read()
        await until(lambda: any(s.kind == SpanKind.SERVER for s in self.trace(trace_id)))
        return resp, trace_id, parent_id

    def trace(self, trace_id: str) -> list[ReadableSpan]:
        return [s for s in self.finished() if format(s.context.trace_id, "032x") == trace_id]

    async def publish(self, ref: str, payload: bytes) -> AdapterRecord:
        owner, name = ref.split("/")
        folder = write_adapter_dir(self.scratch / f"src-{uuid.uuid4().hex}", payload=payload)
        record = await publish(self.store, folder, record_for(folder, owner, name, base_model=BASE))
        self.records[ref] = record
        return record


def one(found: list[ReadableSpan], name: str) -> ReadableSpan:
    named = [s for s in found if s.name == name]
    assert len(named) == 1, f"{len(named)} spans named {name}: {[s.name for s in found]}"
    return named[0]


def children(found: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return sorted(
        (s for s in found if s.parent is not None and s.parent.span_id == parent.context.span_id),
        key=lambda s: s.start_time or 0,
    )


def server_span(found: list[ReadableSpan]) -> ReadableSpan:
    (span,) = [s for s in found if s.kind == SpanKind.SERVER]
    return span


def identifies(span: ReadableSpan, record: AdapterRecord) -> bool:
    attributes = span.attributes or {}
    return (
        attributes.get(spans.ADAPTER_OWNER) == record.owner
        and attributes.get(spans.ADAPTER_NAME) == record.name
        and attributes.get(spans.ADAPTER_VERSION) == record.version
    )


StartTraced = Callable[..., Any]


@pytest.fixture
def start_traced(start_gateway: StartGateway) -> StartTraced:
    """The app with ADAPTERS published (each adapter's ref is its payload), its spans in memory."""

    async def start(store: AdapterStore | None = None, **settings: Any) -> Traced:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        gw = await start_gateway(store=store, adapters=ADAPTERS, tracer_provider=provider, **settings)
        return Traced(gw.client, gw.app, gw.engine, exporter, gw.store, gw.records, gw.scratch)

    return start


ENGINE_TRACES = "http://127.0.0.1:4317"  # vLLM's own tracing on (nothing is sent: the engine is a fake)


async def test_cold_load_is_one_trace_store_to_disk_to_engine(start_traced: StartTraced) -> None:
    traced = await start_traced(engine_otlp_traces_endpoint=ENGINE_TRACES)
    record = traced.records["alice/coding"]
    resp, trace_id, client_span_id = await traced.complete("alice/coding")
    assert resp.status == 200
    found = traced.trace(trace_id)

    # The request span continues the client's trace (W3C traceparent) and describes the call.
    request = server_span(found)
    assert format(request.parent.span_id, "016x") == client_span_id
    assert request.name == "POST /v1/completions"
    attributes = request.attributes or {}
    assert attributes["gen_ai.operation.name"] == "text_completion"
    assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"] == "alice/coding"
    assert attributes["gen_ai.usage.input_tokens"] == len(traced.engine.prompt_ids("Hello"))
    assert attributes["gen_ai.usage.output_tokens"] == 3
    usage = (await resp.json())["usage"]  # the span counts as the response does
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(traced.engine.prompt_ids("Hello")), 3)
    assert tuple(attributes["gen_ai.response.finish_reasons"]) == ("length",)
    assert identifies(request, record)

    # Under it: the acquire, whose load fetched, verified and registered, in that order; then the generation.
    acquire, generate = children(found, request)
    assert (acquire.name, generate.name) == (spans.ACQUIRE, spans.GENERATE)
    assert acquire.attributes[spans.ACQUIRE_OUTCOME] == "store"
    assert identifies(acquire, record)
    fetch, verify, register = children(found, acquire)
    assert [fetch.name, verify.name, register.name] == [spans.FETCH, spans.VERIFY, spans.REGISTER]
    assert fetch.end_time <= verify.start_time and verify.end_time <= register.start_time
    assert register.end_time <= acquire.end_time <= generate.start_time
    assert fetch.attributes[spans.FETCH_SOURCE] == "file"
    assert fetch.attributes[spans.FETCH_BYTES] == sum(f.size for f in record.files) > 0
    assert fetch.attributes[spans.FETCH_RETRIES] == 0
    assert fetch.attributes[spans.FETCH_DURATION] > 0
    assert all(identifies(s, record) for s in (fetch, verify, register))
    engine_adapter = next(c.adapter for c in traced.engine.generate_calls if c.adapter.engine_name != "__base__")
    assert register.attributes[spans.ENGINE_ID] == engine_adapter.engine_id
    assert [e.name for e in generate.events] == [spans.FIRST_TOKEN_EVENT]
    assert all(s.status.status_code != StatusCode.ERROR for s in found)

    # The trace context went on into the engine (its tracing is on): the generate span is the parent there.
    (call,) = [c for c in traced.engine.generate_calls if c.adapter is not None and c.adapter.engine_name != "__base__"]
    assert call.trace_headers["traceparent"] == f"00-{trace_id}-{format(generate.context.span_id, '016x')}-01"


async def test_resident_hit_is_an_acquire_without_children(start_traced: StartTraced) -> None:
    traced = await start_traced()
    await traced.complete("alice/coding")
    resp, trace_id, _ = await traced.complete("alice/coding")
    assert resp.status == 200
    found = traced.trace(trace_id)
    acquire = one(found, spans.ACQUIRE)
    assert acquire.attributes[spans.ACQUIRE_OUTCOME] == "resident"
    assert children(found, acquire) == []
    assert {s.name for s in found} == {"POST /v1/completions", spans.ACQUIRE, spans.GENERATE}
    # vLLM's own tracing is off: no trace context goes into the engine (vLLM would warn on each request).
    assert traced.engine.generate_calls[-1].trace_headers == {}


async def test_warm_disk_registers_without_a_fetch(start_traced: StartTraced) -> None:
    traced = await start_traced(max_loras=1, max_cpu_loras=1)
    await traced.complete("alice/coding")
    await traced.complete("alice/poems")  # takes the only slot: coding leaves the engine, stays on disk
    resp, trace_id, _ = await traced.complete("alice/coding")
    assert resp.status == 200
    found = traced.trace(trace_id)
    acquire = one(found, spans.ACQUIRE)
    assert acquire.attributes[spans.ACQUIRE_OUTCOME] == "disk"
    assert [s.name for s in children(found, acquire)] == [spans.EVICT, spans.VERIFY, spans.REGISTER]
    assert not [s for s in found if s.name == spans.FETCH]


async def test_eviction_churn_names_who_left_and_why(start_traced: StartTraced) -> None:
    traced = await start_traced(max_loras=1, max_cpu_loras=1)
    order = ["alice/coding", "alice/poems", "alice/notes", "alice/coding"]
    traces = [(await traced.complete(ref))[1] for ref in order]
    first = traced.trace(traces[0])
    assert not [s for s in first if s.name == spans.EVICT]  # room for it: nobody left
    for previous, ref, trace_id in zip(order, order[1:], traces[1:]):
        found = traced.trace(trace_id)
        acquire = one(found, spans.ACQUIRE)
        evict = one(found, spans.EVICT)
        # The eviction happened for this request: a child of its acquire, before the new one registered.
        assert evict.parent.span_id == acquire.context.span_id
        assert evict.end_time <= one(found, spans.REGISTER).start_time
        assert identifies(evict, traced.records[previous]), (previous, evict.attributes)
        assert evict.attributes[spans.EVICT_REASON] == "lru"
        assert identifies(acquire, traced.records[ref])
        assert evict.end_time - evict.start_time >= 0


async def test_failed_adapter_marks_its_spans_with_the_reason(start_traced: StartTraced) -> None:
    traced = await start_traced()
    reason = "target module q_proj: rank 8 too large for this engine"
    traced.engine.fail_loads["alice/coding"] = reason
    resp, trace_id, _ = await traced.complete("alice/coding")
    assert resp.status == 422
    found = traced.trace(trace_id)
    acquire = one(found, spans.ACQUIRE)
    assert acquire.attributes[spans.ACQUIRE_OUTCOME] == "failed"
    assert acquire.status.status_code == StatusCode.ERROR and reason in acquire.status.description
    register = one(found, spans.REGISTER)
    assert register.status.status_code == StatusCode.ERROR and reason in register.status.description
    assert register.parent.span_id == acquire.context.span_id
    assert not [s for s in found if s.name == spans.GENERATE]

    # Remembered for a while: the next request fails at once, with the reason, and loads nothing.
    resp, trace_id, _ = await traced.complete("alice/coding")
    assert resp.status == 422
    again = traced.trace(trace_id)
    acquire = one(again, spans.ACQUIRE)
    assert reason in acquire.status.description and children(again, acquire) == []


async def test_requests_joining_a_load_get_their_own_acquire(start_traced: StartTraced) -> None:
    traced = await start_traced()
    traced.engine.add_gate = asyncio.Event()
    calls = [asyncio.create_task(traced.complete("alice/coding")) for _ in range(3)]
    await until(lambda: traced.engine.adds_of("alice/coding") == 1)
    await asyncio.sleep(0.05)  # every request is waiting on the one load
    traced.engine.add_gate.set()
    results = await asyncio.gather(*calls)
    acquires = [one(traced.trace(trace_id), spans.ACQUIRE) for _, trace_id, _ in results]
    assert [a.attributes[spans.ACQUIRE_OUTCOME] for a in acquires] == ["store"] * 3
    (leader,) = [a for a in acquires if not a.attributes.get(spans.ACQUIRE_JOINED)]
    joined = [a for a in acquires if a.attributes.get(spans.ACQUIRE_JOINED)]
    assert len(joined) == 2
    for follower in joined:  # linked to the load they waited for, in the leader's trace
        assert [link.context.span_id for link in follower.links] == [leader.context.span_id]
    assert sum(1 for s in traced.finished() if s.name == spans.REGISTER) == 1


async def test_sync_cycles_are_traces_of_their_own(start_traced: StartTraced) -> None:
    traced = await start_traced(sync_interval_s=3600)
    (first,) = [s for s in traced.finished() if s.name == spans.SYNC]
    assert first.parent is None
    assert first.attributes[spans.SYNC_LISTED] == 3
    assert first.attributes[spans.SYNC_CHANGED] == 3
    assert first.attributes[spans.SYNC_REMOVED] == 0
    assert first.attributes[spans.SYNC_ERRORS] == 0
    assert first.attributes[spans.SYNC_SOURCE] == "file"

    old = traced.records["alice/coding"]
    await traced.complete("alice/coding")  # resident: the new version retires it from the engine
    await traced.publish("alice/coding", b"version 2")
    await traced.store.delete_adapter("alice", "notes")
    resp = await traced.client.post("/admin/sync", headers={"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"})
    assert resp.status == 200, await resp.text()
    await until(lambda: any(s.name == spans.EVICT for s in traced.finished()))
    sync = [s for s in traced.finished() if s.name == spans.SYNC][-1]
    assert sync.parent is None and sync.context.trace_id != int("ab" * 16, 16)  # its own trace ...
    assert [link.context.trace_id for link in sync.links] == [int("ab" * 16, 16)]  # ... linked to the request
    assert (sync.attributes[spans.SYNC_CHANGED], sync.attributes[spans.SYNC_REMOVED]) == (1, 1)
    evict = one(traced.finished(), spans.EVICT)
    assert evict.context.trace_id == sync.context.trace_id  # the retirement happened in the sync
    assert identifies(evict, old) and evict.attributes[spans.EVICT_REASON] == "retired"


@pytest.fixture
def s3_store(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> AdapterStore:
    for key, value in s3_server.client_env().items():
        monkeypatch.setenv(key, value)
    s3_server.create_bucket("traces")
    return open_store(f"s3://traces/{uuid.uuid4().hex[:12]}")


async def test_s3_error_during_fetch_is_an_error_fetch_span_with_retries(
    start_traced: StartTraced, s3_server: S3Server, s3_store: AdapterStore
) -> None:
    traced = await start_traced(store=s3_store, sync_interval_s=3600)
    s3_server.stop()
    try:
        resp, trace_id, _ = await traced.complete("alice/coding")
        sync = await traced.client.post("/admin/sync")
    finally:
        s3_server.start()
    assert resp.status == 503, await resp.text()
    found = traced.trace(trace_id)
    acquire = one(found, spans.ACQUIRE)
    assert acquire.attributes[spans.ACQUIRE_OUTCOME] == "failed"
    fetch = one(found, spans.FETCH)
    assert fetch.parent.span_id == acquire.context.span_id
    assert fetch.status.status_code == StatusCode.ERROR and "StoreUnavailableError" in fetch.status.description
    assert fetch.attributes[spans.FETCH_SOURCE] == s3_store.url and fetch.attributes[spans.FETCH_SOURCE].startswith(
        "s3://traces/"
    )
    assert fetch.attributes[spans.FETCH_RETRIES] == 2  # three attempts
    assert [e.name for e in fetch.events if e.name == "retry"] == ["retry", "retry"]
    assert not [s for s in found if s.name in (spans.VERIFY, spans.REGISTER, spans.GENERATE)]

    # A sync during the outage: its trace says it failed, and why.
    assert sync.status == 503
    failed = [s for s in traced.finished() if s.name == spans.SYNC][-1]
    assert failed.status.status_code == StatusCode.ERROR and failed.attributes[spans.SYNC_ERRORS] == 1
    assert "StoreUnavailableError" in failed.status.description

    # Once the store is back, the same adapter loads cold from it.
    resp, trace_id, _ = await traced.complete("alice/coding")
    assert resp.status == 200
    assert one(traced.trace(trace_id), spans.ACQUIRE).attributes[spans.ACQUIRE_OUTCOME] == "store"


async def test_streamed_chat_request_span_describes_the_call(start_traced: StartTraced) -> None:
    traced = await start_traced()
    trace_id = secrets.token_hex(16)
    resp = await traced.client.post(
        "/v1/chat/completions",
        json={"model": "alice/poems", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True},
        headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
    )
    assert resp.status == 200
    first_event = (await resp.text()).split("\n\n")[0]
    response_id = json.loads(first_event.removeprefix("data: "))["id"]  # the id the client saw
    await until(lambda: any(s.kind == SpanKind.SERVER for s in traced.trace(trace_id)))
    found = traced.trace(trace_id)
    request = server_span(found)
    assert request.name == "POST /v1/chat/completions"
    assert request.attributes["gen_ai.operation.name"] == "chat"
    assert request.attributes["gen_ai.usage.output_tokens"] == 4
    assert tuple(request.attributes["gen_ai.response.finish_reasons"]) == ("length",)
    assert response_id.startswith("chatcmpl-") and request.attributes["gen_ai.response.id"] == response_id
    generate = one(found, spans.GENERATE)
    assert generate.parent.span_id == request.context.span_id
    assert [e.name for e in generate.events] == [spans.FIRST_TOKEN_EVENT]
    assert generate.events[0].timestamp <= generate.end_time
