"""Hostile input on the real app (fake engine): slow bodies, names built to escape a namespace or
a folder, odd bytes and odd content types. Every answer is an error in OpenAI's JSON shape, and
no name that could not exist ever reaches the adapter store."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from aiohttp import FormData

from adapters_manifest.local_store import LocalFolderStore
from gateway.auth.keys import add_key
from tests.fakes import write_adapter_dir
from tests.unit.harness import (
    ADMIN,
    Gateway,
    StartGateway,
    StoreCalls,
    adapter_form,
    assert_error,
    chat,
    completion,
    publish_extra,
    raw_http,
    read_response,
    response,
    watch_store,
)

BODY_TIMEOUT_S = 0.3


@pytest.fixture
async def hostile(
    start_gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Gateway, StoreCalls, dict[str, str]]:
    keys_file = tmp_path / "keys.yaml"
    keys = {"alice": add_key(keys_file, "alice")[0], ADMIN: add_key(keys_file, ADMIN, admin=True)[0]}
    await publish_extra(tmp_path)
    gw = await start_gateway(keys_file=keys_file, body_timeout_s=BODY_TIMEOUT_S, sync_interval_s=3600)
    return gw, watch_store(gw, monkeypatch), {user: f"Bearer {key}" for user, key in keys.items()}


# -- slow bodies -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_dribbled_slower_than_the_body_timeout_is_408(
    hostile: tuple[Gateway, StoreCalls, dict[str, str]], path: str, framing: str
) -> None:
    gw, _, auth = hostile
    prompt = "Hello " * 30  # about 200 bytes: 20 s at this pace
    body = json.dumps(
        completion(prompt=prompt) if path == "/v1/completions" else chat(messages=[{"role": "user", "content": prompt}])
    ).encode()
    reader, writer = await asyncio.open_connection(gw.client.host, gw.client.port)
    length = f"Content-Length: {len(body)}" if framing == "content-length" else "Transfer-Encoding: chunked"
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: {auth['alice']}\r\n"
        f"Content-Type: application/json\r\n{length}\r\n\r\n".encode()
    )

    async def dribble() -> None:  # a byte every 0.1 s: the whole body would take many seconds
        for byte in body:
            chunk = bytes([byte])
            writer.write(chunk if framing == "content-length" else b"1\r\n" + chunk + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)

    sending = asyncio.create_task(dribble())
    started = time.monotonic()
    try:
        status, headers, data = await asyncio.wait_for(read_response(reader), 10)
    finally:
        sending.cancel()
        writer.close()
    elapsed = time.monotonic() - started
    assert status == 408, data
    assert BODY_TIMEOUT_S <= elapsed < 5, elapsed  # not when the body would finally have ended
    assert headers["content-type"].startswith("application/json")
    assert json.loads(data) == {
        "error": {
            "message": "The request body did not arrive in time.",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_timeout",
        }
    }
    assert gw.engine.generate_calls == []


async def test_a_slow_body_without_a_key_is_refused_before_it_is_read(
    hostile: tuple[Gateway, StoreCalls, dict[str, str]],
) -> None:
    gw, _, _ = hostile
    reader, writer = await asyncio.open_connection(gw.client.host, gw.client.port)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    try:
        status, _, data = await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()
    assert status == 401, data  # not 408: the gateway never waited for the body


# -- names -------------------------------------------------------------------------------------

HOSTILE_MODELS = [
    "alice/x\x00",
    "alice/x\x00y",
    "\x00",
    "../../etc/passwd",
    "alice/../bob/chat",
    "alice/..",
    "..",
    ".",
    "alice/.",
    "/etc/passwd",
    "alice//x",
    "alice/x/",
    "alice/x/../../bob/chat",
    "x\n",
    "alice/x\r\nX-Injected: 1",
    "x\t",
    "ALICE/X",
    "alice/X",
    "%2e%2e/x",
    "alice/%2e%2e",
    "alice/x%00",
    "..%2fbob/chat",
    "alice\\x",
    "..\\..\\x",
    "alice/x y",
    " alice/x",
    "alice/\u202ex",
    "alice/\uff58",  # a full-width x
    "alice/" + "a" * 65,
    "a" * 65 + "/x",
    "alice/x" + "\x7f",
]


MODEL_BODIES = {
    "/v1/completions": completion,
    "/v1/chat/completions": chat,
    "/v1/responses": response,
    "/tokenize": lambda model: {"model": model, "prompt": "Hello"},
}


@pytest.mark.parametrize("user", ["alice", ADMIN])  # an admin's names are looked up in every namespace
@pytest.mark.parametrize("path", MODEL_BODIES)
async def test_hostile_model_names_are_404_and_never_reach_the_store(
    hostile: tuple[Gateway, StoreCalls, dict[str, str]], user: str, path: str
) -> None:
    gw, calls, auth = hostile
    for model in HOSTILE_MODELS:
        body = MODEL_BODIES[path](model)
        resp = await gw.client.post(path, json=body, headers={"Authorization": auth[user]})
        error = await assert_error(resp, 404, param="model", code="model_not_found")
        assert error["message"] == f"The model '{model}' does not exist or you do not have access to it."
    assert calls.calls == []
    assert gw.engine.generate_calls == []


HOSTILE_ADAPTER_PATHS = [
    "/v1/adapters/..%2F..%2Fetc/passwd",
    "/v1/adapters/..%2f..%2fmanifest/alice",
    "/v1/adapters/alice/..%2Fbob",
    "/v1/adapters/alice/..%2F..%2F..%2Fetc%2Fpasswd",
    "/v1/adapters/alice/%2e%2e",
    "/v1/adapters/%2e%2e/%2e%2e",
    "/v1/adapters/%2E%2E/x",
    "/v1/adapters/alice/x%00",
    "/v1/adapters/alice/x%00.json",
    "/v1/adapters/%00/x",
    "/v1/adapters/alice/x%0d%0aX-Injected:%201",
    "/v1/adapters/alice/x%20y",
    "/v1/adapters/alice/x%5c..%5cy",
    "/v1/adapters/Alice/X",
    "/v1/adapters/alice/%ef%bd%98",
    "/v1/adapters/alice/%c0%ae%c0%ae",  # an over-long encoding of '..'
    "/v1/adapters/alice/" + "a" * 65,
    "/v1/adapters/alice/..",
    "/v1/adapters/alice/.",
]


@pytest.mark.parametrize("user", ["alice", ADMIN])
@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_hostile_adapter_paths_are_json_errors_and_never_reach_the_store(
    hostile: tuple[Gateway, StoreCalls, dict[str, str]], tmp_path: Path, user: str, method: str
) -> None:
    gw, calls, auth = hostile
    records_before = sorted(await LocalFolderStore(tmp_path / "store").list_stamps())
    for target in HOSTILE_ADAPTER_PATHS:
        status, headers, body = await raw_http(
            gw, f"{method} {target} HTTP/1.1".encode(), {"Authorization": auth[user]}
        )
        assert status in (400, 404), (target, status, body)
        assert headers["Content-Type"].startswith("application/json"), (target, headers)
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] in ("model_not_found", "not_found")
    assert calls.calls == []
    assert sorted(await LocalFolderStore(tmp_path / "store").list_stamps()) == records_before


async def test_a_raw_nul_or_control_byte_in_the_request_line_is_refused_by_the_http_parser(
    hostile: tuple[Gateway, StoreCalls, dict[str, str]],
) -> None:
    """Unencoded, it is not HTTP: refused before the app runs (so in aiohttp's words, not JSON)."""
    gw, calls, auth = hostile
    for target in (b"/v1/adapters/alice/x\x00", b"/v1/adapters/alice/x\x01y", b"/v1/adapters/alice/x\x7f"):
        status, _, _ = await raw_http(gw, b"GET " + target + b" HTTP/1.1", {"Authorization": auth[ADMIN]})
        assert status == 400, target
    assert calls.calls == []


@pytest.mark.parametrize(
    "name", ["../x", "..", "x\x00", "x\n", "X", "a/b", "a\\b", ".x", "a" * 65, " x", "x%2f..", "\uff58"]
)
async def test_an_upload_with_a_hostile_name_is_400_and_stores_nothing(
    hostile: tuple[Gateway, StoreCalls, dict[str, str]], tmp_path: Path, name: str
) -> None:
    gw, calls, auth = hostile
    folder = write_adapter_dir(tmp_path / "upload")
    resp = await gw.client.post(
        "/v1/adapters", data=adapter_form(folder, name=name), headers={"Authorization": auth["alice"]}
    )
    await assert_error(resp, 400, param="name")
    resp = await gw.client.post(
        "/v1/adapters", data=adapter_form(folder, name="ok", owner=name), headers={"Authorization": auth[ADMIN]}
    )
    await assert_error(resp, 400, param="owner")
    assert calls.calls == []


@pytest.mark.parametrize(
    "file_name",
    ["../adapter_config.json", "../../../../tmp/evil.json", "/tmp/evil.json", "x/adapter_model.safetensors"],
)
async def test_an_uploaded_file_name_with_a_path_is_refused(
    hostile: tuple[Gateway, StoreCalls, dict[str, str]], tmp_path: Path, file_name: str
) -> None:
    gw, calls, auth = hostile
    form = FormData()
    form.add_field("name", "ok")
    form.add_field("adapter_config.json", b"{}", filename=file_name)
    resp = await gw.client.post("/v1/adapters", data=form, headers={"Authorization": auth["alice"]})
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"]["code"] in ("invalid_adapter", None)
    assert not Path("/tmp/evil.json").exists()
    assert calls.calls == []


# -- content types -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/octet-stream"]
)
@pytest.mark.parametrize("path", MODEL_BODIES)
async def test_a_json_body_is_accepted_whatever_the_content_type_it_is_sent_with(
    hostile: tuple[Gateway, StoreCalls, dict[str, str]], content_type: str | None, path: str
) -> None:
    """Every endpoint alike: the body is JSON by definition (as `curl -d` sends it, with a form
    content type); a body that is not JSON is a 400 whatever it claims to be."""
    gw, _, auth = hostile
    headers = {"Authorization": auth["alice"]}
    if content_type:
        headers["Content-Type"] = content_type
    body = MODEL_BODIES[path]("x")
    resp = await gw.client.post(path, data=json.dumps(body).encode(), headers=headers)
    assert resp.status == 200, await resp.text()
    resp = await gw.client.post(path, data=b"model=x&prompt=hi", headers=headers)
    await assert_error(resp, 400)


async def test_an_upload_must_be_multipart(hostile: tuple[Gateway, StoreCalls, dict[str, str]]) -> None:
    gw, calls, auth = hostile
    resp = await gw.client.post("/v1/adapters", json={"name": "x"}, headers={"Authorization": auth["alice"]})
    error = await assert_error(resp, 400)
    assert "multipart/form-data" in error["message"]
    assert calls.calls == []


async def test_an_upload_dribbled_past_the_upload_timeout_is_408_and_stores_nothing(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    keys_file = tmp_path / "upload-keys.yaml"
    key, _ = add_key(keys_file, "alice")
    gw = await start_gateway(keys_file=keys_file, upload_timeout_s=BODY_TIMEOUT_S)
    boundary = "x" * 16
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nslow\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="adapter_config.json"; '
        f'filename="adapter_config.json"\r\n\r\n' + "{" + " " * 400 + "}\r\n" + f"--{boundary}--\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(gw.client.host, gw.client.port)
    writer.write(
        f"POST /v1/adapters HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )

    async def dribble() -> None:  # steady bytes, never idle, but the whole upload takes ~40 s
        for byte in body:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.1)

    sending = asyncio.create_task(dribble())
    try:
        status, _, data = await asyncio.wait_for(read_response(reader), 10)
    finally:
        sending.cancel()
        writer.close()
    assert status == 408, data
    assert json.loads(data)["error"]["code"] == "request_timeout"
    assert await gw.store.get_record("alice", "slow") is None


# -- large prompts -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_a_huge_prompt_does_not_stall_other_tenants(start_gateway: StartGateway, path: str) -> None:
    """Tokenising and rendering a 4 MiB prompt runs off the event loop (vLLM's renderer threads):
    /healthz, and so every other tenant, keeps answering while it is worked on."""
    # A context long enough that vLLM tokenises all of it rather than refusing it by its length in characters.
    gw = await start_gateway(max_request_bytes=8 << 20, max_model_len=1 << 21)
    text = "lorem ipsum dolor sit amet " * ((4 << 20) // 27)
    body = completion(prompt=text) if path == "/v1/completions" else chat(messages=[{"role": "user", "content": text}])
    work = asyncio.ensure_future(gw.post(path, body))
    gaps, last = [], time.perf_counter()
    while not work.done():
        assert (await gw.client.get("/healthz")).status == 200
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
        await asyncio.sleep(0.01)
    await assert_error(await work, 400, param="input_tokens")  # refused once tokenised: beyond the context
    assert len(gaps) >= 3, "the request ended before /healthz could be asked twice"
    assert max(gaps) < 1.0, f"/healthz waited {max(gaps):.2f} s"
