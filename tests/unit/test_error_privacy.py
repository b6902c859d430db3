"""What a client learns from a failure: a stable message and a request id, never the store's
bucket, endpoint or object URLs, nor a server path. The details are in the log under that id."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from adapters_manifest.record import AdapterRecord
from adapters_manifest.store import StoreUnavailableError
from gateway.app_keys import CATALOG, DISK_CACHE, SERVING, STORE
from gateway.engine.interface import Engine
from gateway.settings import ServeSettings
from tests.unit.harness import Gateway, StartGateway, assert_error, completion, until

BUCKET, ENDPOINT = "tenant-adapters-prod", "http://10.20.30.40:9000"
OBJECT_URL = f"{ENDPOINT}/{BUCKET}/adapters/records/alice/not-seen-yet.json"
SERVER_PATH = "/var/cache/lora-gateway/alice/coding"
# What S3Store says when its endpoint does not answer (adapters_manifest/s3_store.py).
S3_OUTAGE = (
    f"S3 store s3://{BUCKET}/adapters (endpoint {ENDPOINT}) is unreachable: "
    f'Could not connect to the endpoint URL: "{OBJECT_URL}"'
)
SECRETS = (BUCKET, ENDPOINT, "10.20.30.40", OBJECT_URL, SERVER_PATH, "/var/cache")


def assert_private(text: str) -> None:
    leaked = [secret for secret in SECRETS if secret in text]
    assert leaked == [], text


async def test_a_store_outage_tells_the_client_neither_bucket_nor_endpoint(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    async def outage(owner: str, name: str) -> AdapterRecord | None:
        raise StoreUnavailableError(S3_OUTAGE)

    gw.app[STORE].get_record = outage  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING):
        resp = await gw.post("/v1/completions", completion("alice/not-seen-yet"))
    error = await assert_error(resp, 503, code="service_unavailable")
    assert_private(await resp.text())
    request_id = resp.headers["X-Request-Id"]
    assert request_id.startswith("req_") and request_id in error["message"]
    # The operator finds the details under the id the client quotes.
    assert any(request_id in r.getMessage() and OBJECT_URL in r.getMessage() for r in caplog.records)


async def test_readyz_says_the_store_is_unreachable_but_not_where_it_is(gw: Gateway) -> None:
    async def outage() -> dict[str, str]:
        raise StoreUnavailableError(S3_OUTAGE)

    gw.app[STORE].list_stamps = outage  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailableError):
        await gw.app[CATALOG].sync()
    resp = await gw.client.get("/readyz")  # anonymous
    body = await resp.json()
    assert resp.status == 200 and body["adapter_sync"]["last_error"] == "the adapter store is unreachable"
    assert_private(await resp.text())
    resp = await gw.client.post("/admin/sync")
    await assert_error(resp, 503, code="service_unavailable")
    assert_private(await resp.text())


async def test_a_load_failure_names_no_server_path(gw: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    # vLLM's loader names the folder it read; the adapter's owner needs only the file.
    gw.engine.fail_loads["alice/coding"] = f"No adapter found for {SERVER_PATH}@v1/adapter_model.safetensors"
    resp = await gw.post("/v1/completions", completion("alice/coding"))
    error = await assert_error(resp, 422, param="model", code="adapter_load_failed")
    assert "adapter_model.safetensors" in error["message"]
    assert_private(await resp.text())
    resp = await gw.post("/v1/completions", completion("alice/coding"))  # the remembered failure too
    await assert_error(resp, 422, param="model", code="adapter_load_failed")
    assert_private(await resp.text())


async def test_an_unexpected_load_failure_is_a_stable_message(gw: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    async def broken_disk(record: AdapterRecord) -> Path:
        raise PermissionError(f"[Errno 13] Permission denied: '{SERVER_PATH}'")

    gw.app[DISK_CACHE].pin = broken_disk  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING):
        resp = await gw.post("/v1/completions", completion("bob/poems"))
    error = await assert_error(resp, 422, param="model", code="adapter_load_failed")
    assert "bob/poems" in error["message"]
    assert_private(await resp.text())
    assert SERVER_PATH in caplog.text


async def test_a_bug_is_a_500_quoting_the_request_id_and_logged_under_it(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    def bug(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"bug reading {SERVER_PATH}")

    gw.app[CATALOG].visible_records = bug  # type: ignore[method-assign]
    resp = await gw.client.get("/v1/models")
    error = await assert_error(resp, 500)
    assert_private(await resp.text())
    assert resp.headers["X-Request-Id"] in error["message"]
    assert any(resp.headers["X-Request-Id"] in r.getMessage() and r.exc_info for r in caplog.records)


async def test_every_response_has_a_request_id_of_its_own(gw: Gateway) -> None:
    ids = set()
    for path in ("/healthz", "/v1/models", "/no-such-endpoint"):
        resp = await gw.client.get(path, headers={"X-Request-Id": "req_chosen-by-the-client"})
        ids.add(resp.headers["X-Request-Id"])
    assert len(ids) == 3 and "req_chosen-by-the-client" not in ids
    resp = await gw.post("/v1/completions", completion(stream=True))
    assert resp.status == 200 and resp.headers["X-Request-Id"].startswith("req_")
    await resp.read()


async def test_a_failed_engine_start_is_not_described_to_anonymous_callers(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_factory(settings: ServeSettings) -> Engine:
        raise RuntimeError(f"no model weights in {SERVER_PATH}")

    gw = await start_gateway(factory=broken_factory, ready=False)
    await until(lambda: gw.app[SERVING].startup_error is not None)
    resp = await gw.client.get("/readyz")
    assert resp.status == 503 and (await resp.json())["reason"] == "engine failed to start"
    assert_private(await resp.text())
    assert SERVER_PATH in caplog.text
