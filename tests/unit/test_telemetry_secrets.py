"""No API key, S3 secret or credential ever appears in logs, spans or metrics; the server's JSON
log records carry the trace and span ids of the work they describe.

One app on moto's S3 server with known credentials and API keys, logging as `serve` does (JSON at
INFO) and capturing every request header on spans; flows that touch every path that logs or
traces: cold and warm requests, a wrong key, an admin sync, a store outage during a fetch."""

from __future__ import annotations

import io
import json
import logging
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from adapters_manifest.open_store import open_store
from gateway.app_keys import SETTINGS
from gateway.auth.keys import add_key
from gateway.telemetry.logs import json_handler
from gateway_tools.dev.s3_server import S3Server
from tests.unit.harness import StartGateway

ACCESS_KEY = "AKIAOBSERVABILITYTEST"
SECRET = "s3cr3t-observability-0x5eed-do-not-leak"


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """The root logger as `lora-gateway serve` sets it up: JSON lines at INFO (here into a buffer)."""
    buffer = io.StringIO()
    handler = json_handler(buffer)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield buffer
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def aws_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        **s3_server.client_env(),
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
    }.items():
        monkeypatch.setenv(key, value)
    # An operator capturing every request header on spans: credentials must still not get there.
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", ".*")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS", "x-debug")
    s3_server.create_bucket("secrets")


def span_texts(exporter: InMemorySpanExporter) -> list[str]:
    """Everything a span carries, as text: names, attributes, events, status, links, resource."""
    texts = []
    for span in exporter.get_finished_spans():
        texts += [span.name, json.dumps(dict(span.attributes or {}), default=str), str(span.status.description)]
        texts += [json.dumps(dict(span.resource.attributes), default=str)]
        for event in span.events:
            texts += [event.name, json.dumps(dict(event.attributes or {}), default=str)]
        for link in span.links:
            texts += [json.dumps(dict(link.attributes or {}), default=str)]
    return texts


async def test_no_secret_in_logs_spans_or_metrics(
    aws_env: None, s3_server: S3Server, captured_logs: io.StringIO, tmp_path: Path, start_gateway: StartGateway
) -> None:
    keys_file = tmp_path / "keys.yaml"
    alice_key, _ = add_key(keys_file, "alice")
    admin_key, _ = add_key(keys_file, "root", admin=True)
    guessed_key = "lgw-" + secrets.token_hex(16)
    store_url = f"s3://secrets/{uuid.uuid4().hex[:12]}"
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gw = await start_gateway(
        store=open_store(store_url),
        adapters=("alice/coding", "alice/poems"),
        tracer_provider=provider,
        keys_file=keys_file,
        sync_interval_s=3600,
    )
    assert gw.app[SETTINGS].store == store_url
    client = gw.client

    def as_user(key: str, trace_id: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {key}"}
        if trace_id:
            headers["traceparent"] = f"00-{trace_id}-{secrets.token_hex(8)}-01"
        return headers

    body = {"model": "coding", "prompt": "Hello", "max_tokens": 2}
    cold_trace = secrets.token_hex(16)
    resp = await client.post("/v1/completions", json=body, headers=as_user(alice_key, cold_trace))
    assert resp.status == 200, await resp.text()
    resp = await client.post("/v1/completions", json={**body, "stream": True}, headers=as_user(alice_key))
    assert resp.status == 200
    await resp.read()
    resp = await client.post("/v1/completions", json=body, headers=as_user(guessed_key))
    assert resp.status == 401
    resp = await client.post("/admin/sync", headers=as_user(admin_key))
    assert resp.status == 200
    s3_server.stop()
    try:  # an outage while fetching: errors are logged and traced, with the store named, not its secrets
        resp = await client.post("/v1/completions", json={**body, "model": "poems"}, headers=as_user(alice_key))
        assert resp.status == 503
    finally:
        s3_server.start()
    metrics = await (await client.get("/metrics")).text()

    logs = captured_logs.getvalue()
    spans = span_texts(exporter)
    assert "fetching alice/poems" in logs and store_url in logs  # the flows did log and trace
    assert any(store_url in text for text in spans)
    assert '"http.request.header.authorization": ["[REDACTED]"]' in "\n".join(spans)  # captured, redacted
    for secret in (alice_key, admin_key, guessed_key, SECRET, ACCESS_KEY):
        assert secret not in logs
        assert not [text for text in spans if secret in text], secret
        assert secret not in metrics

    # Every record is a JSON object with trace and span ids; those made inside the cold request carry its trace.
    records = [json.loads(line) for line in logs.splitlines()]
    assert all({"time", "level", "logger", "message", "trace_id", "span_id"} <= set(r) for r in records)
    registered = [r for r in records if "alice/coding" in r["message"] and "registered" in r["message"]]
    assert len(registered) == 1 and registered[0]["trace_id"] == cold_trace
    assert len(registered[0]["span_id"]) == 16
