"""Tracing set-up from the standard OTEL_* variables: service resource, sampler, exporters off unless
configured, and a real OTLP/HTTP export of a request's spans to a receiver on loopback. JSON logs
for vLLM's own loggers."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
import secrets
from datetime import datetime, timedelta

import pytest
from aiohttp.test_utils import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.telemetry import spans
from gateway.telemetry.logs import vllm_logging_config
from gateway.telemetry.tracing import build_resource, build_tracer_provider, exporter_names, service_version
from gateway_tools.otlp_receiver import TraceReceiver
from tests.unit.harness import StartGateway


def test_nothing_is_exported_unless_configured() -> None:
    assert exporter_names({}) == []
    assert exporter_names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}) == ["otlp"]
    assert exporter_names({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}) == ["otlp"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "console"}) == ["console"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == []
    assert exporter_names({"OTEL_TRACES_EXPORTER": "otlp,console"}) == ["otlp", "console"]
    with pytest.raises(ValueError, match="unsupported exporter 'zipkin'"):
        exporter_names({"OTEL_TRACES_EXPORTER": "zipkin"})
    assert build_tracer_provider()._active_span_processor._span_processors == ()


def test_resource_names_the_service_and_honours_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    attributes = build_resource().attributes
    assert attributes["service.name"] == "lora-gateway"
    assert attributes["service.version"] == service_version() != ""
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=staging,k8s.pod.name=gw-0")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-eu")
    attributes = build_resource().attributes
    assert attributes["deployment.environment.name"] == "staging" and attributes["k8s.pod.name"] == "gw-0"
    assert attributes["service.name"] == "gateway-eu"


async def start_app(start_gateway: StartGateway, provider: TracerProvider) -> TestClient:
    return (await start_gateway(adapters=["alice/coding"], tracer_provider=provider)).client


@pytest.mark.parametrize(
    "sampler, argument, client_sampled, expect_spans",
    [
        ("always_off", None, True, False),
        ("traceidratio", "0", True, False),
        ("parentbased_always_on", None, False, False),  # the client's trace was not sampled
        ("parentbased_always_on", None, True, True),
    ],
)
async def test_the_sampler_is_set_by_the_standard_variables(
    sampler: str,
    argument: str | None,
    client_sampled: bool,
    expect_spans: bool,
    monkeypatch: pytest.MonkeyPatch,
    start_gateway: StartGateway,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    if argument is not None:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", argument)
    provider = build_tracer_provider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    client = await start_app(start_gateway, provider)
    exporter.clear()
    flags = "01" if client_sampled else "00"
    traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-{flags}"
    resp = await client.post(
        "/v1/completions",
        json={"model": "alice/coding", "prompt": "Hi", "max_tokens": 2},
        headers={"traceparent": traceparent},
    )
    assert resp.status == 200
    names = {s.name for s in exporter.get_finished_spans()}
    assert (spans.ACQUIRE in names) is expect_spans, names


async def test_a_request_trace_is_exported_over_otlp(
    monkeypatch: pytest.MonkeyPatch, start_gateway: StartGateway
) -> None:
    with TraceReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test")
        provider = build_tracer_provider()
        client = await start_app(start_gateway, provider)
        trace_id = secrets.token_hex(16)
        resp = await client.post(
            "/v1/completions",
            json={"model": "alice/coding", "prompt": "Hi", "max_tokens": 2},
            headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
        )
        assert resp.status == 200
        await asyncio.to_thread(provider.force_flush)
        received = [s for s in receiver.spans if s.trace_id == trace_id]
        await asyncio.to_thread(provider.shutdown)
    names = {s.name for s in received}
    assert {spans.ACQUIRE, spans.FETCH, spans.VERIFY, spans.REGISTER, spans.GENERATE} <= names, names
    assert all(s.resource["service.name"] == "lora-gateway" for s in received)
    assert all(s.resource["deployment.environment.name"] == "test" for s in received)
    fetch = next(s for s in received if s.name == spans.FETCH)
    assert fetch.attributes[spans.FETCH_SOURCE] == "file" and fetch.duration_s > 0


def test_vllm_loggers_write_json_with_trace_ids(capsys: pytest.CaptureFixture[str]) -> None:
    vllm_logger = logging.getLogger("vllm")
    saved = (list(vllm_logger.handlers), vllm_logger.level, vllm_logger.propagate)
    try:
        logging.config.dictConfig(vllm_logging_config(logging.INFO))  # as vLLM applies the file we point it at
        logging.getLogger("vllm.engine").info("engine started with %d slots", 3)
        logging.getLogger("vllm.engine").debug("not at INFO")
    finally:
        for handler in list(vllm_logger.handlers):
            vllm_logger.removeHandler(handler)
        for handler in saved[0]:
            vllm_logger.addHandler(handler)
        vllm_logger.setLevel(saved[1])
        vllm_logger.propagate = saved[2]
    (line,) = capsys.readouterr().err.splitlines()
    record = json.loads(line)
    assert record["message"] == "engine started with 3 slots"
    assert record["logger"] == "vllm.engine" and record["level"] == "INFO"
    assert record["trace_id"] is None and record["span_id"] is None  # outside any span
    assert datetime.fromisoformat(record["time"]).utcoffset() == timedelta(0)  # ISO 8601, UTC
