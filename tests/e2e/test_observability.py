"""Observability of the real thing: the gateway process on real vLLM exporting its traces over OTLP
to a receiver on loopback, /metrics with the gateway's and vLLM's metrics, JSON logs with trace ids.

One engine slot for user adapters, so the second user's first request swaps the first one out:
a cold load and an eviction, each a named span with a duration, in the trace of the request that
caused it. vLLM's own tracing is on too: its request span joins the gateway's trace."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gateway.telemetry import spans
from gateway_tools.dev.models import DevModel
from gateway_tools.dev.process import ServerProcess, free_port, gateway_command
from gateway_tools.otlp_receiver import ReceivedSpan, TraceReceiver
from tests.e2e.conftest import ENGINE, Keys, record_of

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def receiver() -> Iterator[TraceReceiver]:
    with TraceReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def metrics_port() -> int:
    """Where the traced gateway serves its whole /metrics page, adapter names included."""
    return free_port()


@pytest.fixture(scope="module")
def traced_gateway(
    tiny: DevModel, keys: Keys, receiver: TraceReceiver, metrics_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    port = free_port()
    flags = {
        "keys_file": keys.file,
        "max_loras": 1,
        "max_cpu_loras": 1,
        "engine_otlp_traces_endpoint": receiver.url,
        "metrics_port": metrics_port,
    }
    command = gateway_command(tiny.base, tiny.store, port, served_model_name=tiny.served_name, **ENGINE, **flags)
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url,
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: export promptly for the test
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=e2e",
    }
    logs = tmp_path_factory.mktemp("observability") / f"gateway-{port}.log"
    server = ServerProcess(command, port, logs, env=env).start()
    yield server
    assert server.stop() == 0, server.log_tail()


def complete(server: ServerProcess, key: str, model: str, trace_id: str) -> dict:
    resp = requests.post(
        server.base_url + "/v1/completions",
        json={"model": model, "prompt": "def parse(value):", "max_tokens": 4, "temperature": 0},
        headers={"Authorization": f"Bearer {key}", "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def trace_of(receiver: TraceReceiver, trace_id: str, wanted: set[str], timeout_s: float = 20) -> list[ReceivedSpan]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = [s for s in receiver.spans if s.trace_id == trace_id]
        if wanted <= {s.name for s in found}:
            return found
        assert time.monotonic() < deadline, f"missing spans {wanted - {s.name for s in found}} in {found}"
        time.sleep(0.1)


def one(found: list[ReceivedSpan], name: str) -> ReceivedSpan:
    (span,) = [s for s in found if s.name == name]
    return span


def test_cold_load_swap_and_eviction_are_named_spans_and_metrics(
    traced_gateway: ServerProcess, receiver: TraceReceiver, keys: Keys, tiny: DevModel, metrics_port: int
) -> None:
    alice, bob = record_of(tiny, "alice/chat"), record_of(tiny, "bob/chat")
    cold, swap = secrets.token_hex(16), secrets.token_hex(16)
    body = complete(traced_gateway, keys.by_user["alice"], "chat", cold)
    assert body["usage"]["completion_tokens"] == 4
    complete(traced_gateway, keys.by_user["bob"], "chat", swap)  # the one slot: alice's adapter leaves

    loaded = {spans.ACQUIRE, spans.FETCH, spans.VERIFY, spans.REGISTER, spans.GENERATE}
    found = trace_of(receiver, cold, loaded | {"POST /v1/completions"})
    request = one(found, "POST /v1/completions")
    assert request.attributes["gen_ai.operation.name"] == "text_completion"
    assert request.attributes["gen_ai.usage.output_tokens"] == 4
    assert request.attributes[spans.ADAPTER_VERSION] == alice.version
    acquire = one(found, spans.ACQUIRE)
    assert acquire.parent_span_id == request.span_id and acquire.attributes[spans.ACQUIRE_OUTCOME] == "store"
    for name in (spans.FETCH, spans.VERIFY, spans.REGISTER):
        child = one(found, name)
        assert child.parent_span_id == acquire.span_id and child.duration_s > 0, child
    generate = one(found, spans.GENERATE)
    assert [name for name, _ in generate.events] == [spans.FIRST_TOKEN_EVENT]
    # The context went into vLLM (trace_headers): vLLM's own span of this request is a child of engine.generate.
    vllm_request = one(trace_of(receiver, cold, {"llm_request"}), "llm_request")
    assert vllm_request.parent_span_id == generate.span_id
    assert vllm_request.attributes["gen_ai.usage.completion_tokens"] == 4
    assert request.resource["service.name"] == "lora-gateway"
    assert request.resource["deployment.environment.name"] == "e2e"

    swapped = trace_of(receiver, swap, loaded | {spans.EVICT})
    evict = one(swapped, spans.EVICT)
    assert evict.parent_span_id == one(swapped, spans.ACQUIRE).span_id and evict.duration_s > 0
    assert (evict.attributes[spans.ADAPTER_OWNER], evict.attributes[spans.ADAPTER_VERSION]) == ("alice", alice.version)
    assert evict.attributes[spans.EVICT_REASON] == "lru"
    assert one(swapped, spans.ACQUIRE).attributes[spans.ADAPTER_VERSION] == bob.version

    # /metrics: the gateway's own and vLLM's, among them the LoRA info the Inference Extension routes by,
    # on the metrics port; the open page on the API port names no adapter.
    open_page = requests.get(traced_gateway.base_url + "/metrics", timeout=10).text
    assert "lora_gateway_resident_adapters" in open_page and alice.ref not in open_page
    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    ours = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples}
    assert ours[("lora_gateway_adapter_loads_total", (("outcome", "ok"), ("tier", "engine")))] == 2
    assert ours[("lora_gateway_adapter_evictions_total", (("reason", "lru"),))] == 1
    assert ours[("lora_gateway_resident_adapters", ())] == 1
    assert any(s.name == "vllm:num_requests_running" for s in samples)
    lora_info = [s for s in samples if s.name == "vllm:lora_requests_info"]
    assert any(alice.versioned_ref in s.labels["running_lora_adapters"] for s in lora_info), lora_info
    assert all(s.labels["max_lora"] == "1" for s in lora_info)  # one user slot: base requests need none here

    # The server's log lines are JSON; those about the cold load carry its trace id.
    records = [
        json.loads(line) for line in Path(traced_gateway.log_path).read_text().splitlines() if line.startswith("{")
    ]
    registered = [r for r in records if alice.versioned_ref in r["message"] and "registered" in r["message"]]
    assert [r["trace_id"] for r in registered] == [cold]
    assert any(r["logger"].startswith("vllm") for r in records)  # vLLM's own loggers write JSON too
