"""The HTTP API as a client sees it, on the real app with a fake engine: OpenAI shapes, SSE,
adapter routing, and a 4xx in OpenAI's error shape, naming the field, for every bad request."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate

from adapters_manifest.local_store import LocalFolderStore
from adapters_manifest.record import AdapterRecord
from adapters_manifest.store import StoreUnavailableError
from gateway.app_keys import DISK_CACHE, SERVING, STORE
from gateway.auth.keys import add_key
from gateway.auth.middleware import OPEN_PATHS
from gateway.engine.interface import Engine
from gateway.settings import ServeSettings
from tests.fakes import FAKE_TOKEN_ID_BASE, FakeEngine, expected_text, publish_adapter, token_text
from tests.unit.harness import (
    ADAPTERS,
    BASE,
    MAX_MODEL_LEN,
    MESSAGES,
    Gateway,
    StartGateway,
    assert_error,
    chat,
    chatml,
    completion,
    sse_events,
    until,
)

# -- health and readiness --------------------------------------------------------------


async def test_healthz_and_readyz_once_started(gw: Gateway) -> None:
    resp = await gw.client.get("/healthz")
    assert resp.status == 200 and await resp.json() == {"status": "ok"}
    resp = await gw.client.get("/readyz")
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "ready"
    assert body["adapter_sync"]["adapters"] == len(ADAPTERS) and body["adapter_sync"]["last_error"] is None
    assert body["base_requests"] == gw.engine.base_requests
    assert gw.engine.resident_names() == {"__base__"}  # in the engine's own slot (FakeEngine.extra)


async def test_not_ready_while_the_engine_starts(start_gateway: StartGateway) -> None:
    release = threading.Event()
    engine = FakeEngine(max_model_len=MAX_MODEL_LEN)

    def slow_factory(settings: ServeSettings) -> Engine:
        release.wait(10)
        return engine.started_with(settings)

    try:
        gw = await start_gateway(engine, factory=slow_factory, ready=False)
        resp = await gw.client.get("/healthz")
        assert resp.status == 200
        resp = await gw.client.get("/readyz")
        assert resp.status == 503
        body = await resp.json()
        assert (body["status"], body["reason"]) == ("unavailable", "engine starting")
        resp = await gw.post("/v1/completions", completion())
        await assert_error(resp, 503, code="service_unavailable")
        assert int(resp.headers["Retry-After"]) >= 1
    finally:
        release.set()
    await gw.wait_ready()
    resp = await gw.post("/v1/completions", completion())
    assert resp.status == 200


async def test_not_ready_when_the_engine_failed_to_start(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_factory(settings: ServeSettings) -> Engine:
        raise RuntimeError("no memory for the KV cache")

    gw = await start_gateway(factory=broken_factory, ready=False)
    await until(lambda: gw.app[SERVING].startup_error is not None)
    resp = await gw.client.get("/readyz")
    assert resp.status == 503
    # Why is for the log: /readyz is anonymous (tests/unit/test_error_privacy.py).
    assert (await resp.json())["reason"] == "engine failed to start"
    assert "no memory for the KV cache" in caplog.text


async def test_not_ready_when_the_engine_died(gw: Gateway) -> None:
    gw.engine.alive = False
    resp = await gw.client.get("/readyz")
    assert resp.status == 503 and (await resp.json())["reason"] == "engine dead"
    resp = await gw.post("/v1/completions", completion())
    await assert_error(resp, 503, code="service_unavailable")
    resp = await gw.post("/v1/completions", completion("alice/coding"))
    await assert_error(resp, 503, code="service_unavailable")


async def test_engine_is_shut_down_with_the_app(start_gateway: StartGateway) -> None:
    gw = await start_gateway()
    await gw.client.close()
    assert gw.engine.shut_down


# -- models ------------------------------------------------------------------------------


async def test_models_lists_the_base_and_every_adapter_with_the_base_as_parent(gw: Gateway) -> None:
    resp = await gw.client.get("/v1/models")
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert list(by_id) == [BASE, *ADAPTERS]
    assert by_id[BASE]["parent"] is None
    for ref in ADAPTERS:
        model = by_id[ref]
        assert model["object"] == "model"
        assert model["parent"] == BASE
        assert model["owned_by"] == ref.split("/")[0]
        assert model["created"] == int(gw.records[ref].created_at.timestamp())


# -- completions ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", [BASE, *ADAPTERS])
async def test_completion(gw: Gateway, model: str) -> None:
    resp = await gw.post("/v1/completions", completion(model, "Hello", max_tokens=4))
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "text_completion"
    assert body["model"] == model
    assert body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert (choice["index"], choice["logprobs"], choice["finish_reason"]) == (0, None, "length")
    prompt_ids = gw.engine.prompt_ids("Hello")
    assert choice["text"] == expected_text(gw.label(model), prompt_ids, 0, 4)
    usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": 4, "total_tokens": len(prompt_ids) + 4}
    assert usage.items() <= body["usage"].items()


async def test_concurrent_requests_each_get_their_own_adapter(gw: Gateway) -> None:
    gw.engine.token_delay_s = 0.002  # interleave the generations
    models = [BASE, *ADAPTERS] * 4
    prompts = [f"prompt number {i}" for i in range(len(models))]
    resps = await asyncio.gather(
        *(gw.post("/v1/completions", completion(m, p, max_tokens=5)) for m, p in zip(models, prompts))
    )
    for model, prompt, resp in zip(models, prompts, resps):
        body = await resp.json()
        assert body["choices"][0]["text"] == expected_text(gw.label(model), gw.engine.prompt_ids(prompt), 0, 5)
    assert all(r.holders == 0 for r in gw.app[SERVING].pool.resident())  # type: ignore[union-attr]
    assert gw.engine.adds_of("alice/coding") == 1 and gw.engine.adds_of("bob/poems") == 1


async def test_completion_with_token_ids_as_prompt(gw: Gateway) -> None:
    resp = await gw.post("/v1/completions", completion("alice/coding", [5, 6, 7], max_tokens=2))
    body = await resp.json()
    assert body["choices"][0]["text"] == expected_text(gw.label("alice/coding"), [5, 6, 7], 0, 2)
    assert body["usage"]["prompt_tokens"] == 3


async def test_completion_with_n_choices(gw: Gateway) -> None:
    resp = await gw.post("/v1/completions", completion("bob/poems", "Hi", n=3, max_tokens=2))
    body = await resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [
        expected_text(gw.label("bob/poems"), gw.engine.prompt_ids("Hi"), i, 2) for i in range(3)
    ]
    assert body["usage"]["completion_tokens"] == 6
    assert gw.engine.generate_calls[-1].params.n == 3


async def test_sampling_options_reach_the_engine(gw: Gateway) -> None:
    body = completion(temperature=0.5, top_p=0.9, seed=7, stop=["zz"], max_tokens=2)
    resp = await gw.post("/v1/completions", body)
    assert resp.status == 200
    params = gw.engine.generate_calls[-1].params
    assert (params.temperature, params.top_p, params.seed, params.stop, params.max_tokens) == (0.5, 0.9, 7, ["zz"], 2)


# Where a generation stops (stop strings, stop tokens, EOS) is the engine's rule, not the gateway's: the
# real one's is checked against vLLM's own server in tests/e2e/test_api_parity.py (the stop-list,
# stop-token-ids, include-stop-str, eos and ignore-eos cases). What the gateway owes: the request's stop
# conditions reach the engine as sent, and the engine's stop reaches the client as the engine ended it.


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_stop_conditions_reach_the_engine_as_sent(gw: Gateway, path: str) -> None:
    fields = dict(max_tokens=5, stop=".2>", stop_token_ids=[7, 9], include_stop_str_in_output=True, ignore_eos=True)
    body = completion("alice/coding", "Hi", **fields) if path == "/v1/completions" else chat("alice/coding", **fields)
    resp = await gw.post(path, body)
    assert resp.status == 200, await resp.text()
    params = gw.engine.generate_calls[-1].params
    assert (params.stop, params.stop_token_ids, params.max_tokens) == ([".2>"], [7, 9], 5)
    assert (params.include_stop_str_in_output, params.ignore_eos) == (True, True)


async def test_no_stop_conditions_reach_the_engine_unless_sent(gw: Gateway) -> None:
    resp = await gw.post("/v1/completions", completion("alice/coding", "Hi", max_tokens=5))
    assert resp.status == 200
    params = gw.engine.generate_calls[-1].params
    assert (params.stop, params.stop_token_ids, params.include_stop_str_in_output, params.ignore_eos) == (
        [],
        [],
        False,
        False,
    )


@pytest.mark.parametrize(
    ("path", "stream"), [("/v1/completions", False), ("/v1/completions", True), ("/v1/chat/completions", False)]
)
async def test_a_choice_the_engine_stops_reaches_the_client_as_it_ended(gw: Gateway, path: str, stream: bool) -> None:
    gw.engine.stops_after = 2  # the engine ends the choice early, on a stop condition of its own
    fields: dict[str, Any] = dict(max_tokens=5, stop=".2>", stream=stream)
    if stream:
        fields["stream_options"] = {"include_usage": True}
    body = completion("alice/coding", "Hi", **fields) if path == "/v1/completions" else chat("alice/coding", **fields)
    resp = await gw.post(path, body)
    prompt = gw.engine.generate_calls[-1].prompt_token_ids
    expected = expected_text(gw.label("alice/coding"), prompt, 0, 2)
    if stream:
        *chunks, last = await sse_events(resp)
        assert "".join(c["choices"][0]["text"] for c in chunks) == expected
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "stop"]
        usage = last["usage"]
    else:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        [choice] = body["choices"]
        text = choice["text"] if path == "/v1/completions" else choice["message"]["content"]
        assert (text, choice["finish_reason"]) == (expected, "stop")
        usage = body["usage"]
    assert usage["completion_tokens"] == 2


async def test_completion_logprobs(gw: Gateway) -> None:
    resp = await gw.post("/v1/completions", completion(prompt="Hi", max_tokens=2, logprobs=2))
    logprobs = (await resp.json())["choices"][0]["logprobs"]
    first, second = (token_text(gw.label(BASE), gw.engine.prompt_ids("Hi"), 0, step) for step in range(2))
    assert logprobs["tokens"] == [first, second]
    assert logprobs["token_logprobs"] == [-0.25, -0.25]
    assert logprobs["text_offset"] == [0, len(first)]
    assert logprobs["top_logprobs"] == [{first: -0.25, "alt1": -2.0}, {second: -0.25, "alt1": -2.0}]


async def test_completion_logprobs_as_token_ids(gw: Gateway) -> None:
    body = completion(prompt="Hi", max_tokens=2, logprobs=1, return_tokens_as_token_ids=True)
    logprobs = (await (await gw.post("/v1/completions", body)).json())["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [f"token_id:{FAKE_TOKEN_ID_BASE}", f"token_id:{FAKE_TOKEN_ID_BASE + 1}"]
    assert logprobs["top_logprobs"] == [
        {f"token_id:{FAKE_TOKEN_ID_BASE}": -0.25},
        {f"token_id:{FAKE_TOKEN_ID_BASE + 1}": -0.25},
    ]


async def test_trace_context_is_passed_to_the_engine(start_gateway: StartGateway) -> None:
    gw = await start_gateway(engine_otlp_traces_endpoint="http://127.0.0.1:1")  # vLLM's own spans on
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    resp = await gw.client.post("/v1/completions", json=completion(), headers={"traceparent": traceparent})
    assert resp.status == 200
    # The engine's spans join the caller's trace, under the gateway's own engine.generate span.
    version, trace_id, span_id, flags = gw.engine.generate_calls[-1].trace_headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")


async def test_no_trace_context_reaches_the_engine_while_its_tracing_is_off(gw: Gateway) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    resp = await gw.client.post("/v1/completions", json=completion(), headers={"traceparent": traceparent})
    assert resp.status == 200
    assert gw.engine.generate_calls[-1].trace_headers == {}


async def test_completion_stream(gw: Gateway) -> None:
    body = completion("alice/coding", "Hey", max_tokens=3, n=2, stream=True, stream_options={"include_usage": True})
    events = await sse_events(await gw.post("/v1/completions", body))
    *chunks, usage = events
    texts = {0: "", 1: ""}
    for chunk in chunks:
        assert chunk["object"] == "text_completion" and chunk["model"] == "alice/coding"
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["text"]
    for i in (0, 1):
        assert texts[i] == expected_text(gw.label("alice/coding"), gw.engine.prompt_ids("Hey"), i, 3)
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["index"] == i] == [
            None,
            None,
            "length",
        ]
    assert len({e["id"] for e in events}) == 1
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}


async def test_completion_stream_without_usage(gw: Gateway) -> None:
    events = await sse_events(await gw.post("/v1/completions", completion(stream=True)))
    assert all("usage" not in e for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == expected_text(
        gw.label(BASE), gw.engine.prompt_ids("Hello"), 0, 3
    )


async def test_client_disconnect_mid_stream_aborts_generation_and_releases_the_adapter(gw: Gateway) -> None:
    gw.engine.token_delay_s = 0.01
    resp = await gw.post("/v1/completions", completion("alice/coding", max_tokens=200, stream=True))
    assert resp.status == 200
    first = await resp.content.readline()
    assert first.startswith(b"data: {")
    resp.close()
    await until(lambda: gw.engine.active_generations == 0)
    assert len(gw.engine.aborted) == 1
    pool = gw.app[SERVING].pool
    assert pool is not None
    await until(lambda: all(r.holders == 0 for r in pool.resident()))


# -- chat completions -----------------------------------------------------------------------


@pytest.mark.parametrize("model", [BASE, "bob/poems"])
async def test_chat_completion(gw: Gateway, model: str) -> None:
    resp = await gw.post("/v1/chat/completions", chat(model, max_tokens=4))
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "chat.completion" and body["model"] == model and body["id"].startswith("chatcmpl-")
    prompt = gw.engine.generate_calls[-1].prompt_token_ids
    assert gw.decode(prompt) == chatml(MESSAGES)
    [choice] = body["choices"]
    assert (choice["index"], choice["logprobs"], choice["finish_reason"]) == (0, None, "length")
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == expected_text(gw.label(model), prompt, 0, 4)
    usage = {"prompt_tokens": len(prompt), "completion_tokens": 4, "total_tokens": len(prompt) + 4}
    assert usage.items() <= body["usage"].items()


async def test_chat_content_parts_and_developer_role(gw: Gateway) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    ]
    resp = await gw.post("/v1/chat/completions", chat(messages=messages, max_tokens=1))
    assert resp.status == 200
    # As vLLM: text parts joined by newlines, the developer role a system message.
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi \nthere"}]
    assert gw.decode(gw.engine.generate_calls[-1].prompt_token_ids) == chatml(expected)


async def test_chat_max_completion_tokens_wins_and_default_fills_the_context(gw: Gateway) -> None:
    resp = await gw.post("/v1/chat/completions", chat(max_tokens=9, max_completion_tokens=2))
    assert (await resp.json())["usage"]["completion_tokens"] == 2
    body = chat()
    del body["max_tokens"]
    resp = await gw.post("/v1/chat/completions", body)
    assert resp.status == 200
    call = gw.engine.generate_calls[-1]
    assert call.params.max_tokens == MAX_MODEL_LEN - len(call.prompt_token_ids)


async def test_chat_logprobs(gw: Gateway) -> None:
    resp = await gw.post("/v1/chat/completions", chat(max_tokens=2, logprobs=True, top_logprobs=3))
    content = (await resp.json())["choices"][0]["logprobs"]["content"]
    assert len(content) == 2
    for entry in content:
        assert entry["logprob"] == -0.25
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 3


async def test_chat_stream(gw: Gateway) -> None:
    body = chat("bob/poems", n=2, stream=True, stream_options={"include_usage": True})
    events = await sse_events(await gw.post("/v1/chat/completions", body))
    *chunks, usage = events
    prompt = gw.engine.generate_calls[-1].prompt_token_ids
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["delta"].get("content", "") for c in mine)
        assert text == expected_text(gw.label("bob/poems"), prompt, i, 3)
        assert mine[-1]["finish_reason"] == "length"
        assert all(c["finish_reason"] is None for c in mine[:-1])
    assert all(c["object"] == "chat.completion.chunk" for c in events)
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": 6,
        "total_tokens": len(prompt) + 6,
    }


async def test_chat_template_rejection_is_a_400(start_gateway: StartGateway) -> None:
    template = "{% if messages|length > 1 %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    gw = await start_gateway(chat_template=template)
    resp = await gw.post("/v1/chat/completions", chat())
    error = await assert_error(resp, 400)
    assert "Conversation roles must alternate" in error["message"]
    assert gw.engine.generate_calls == []


# -- adapters: resolution, capacity, failures ------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        "carol/nothing",
        "alice/missing",
        "alice",
        "alice/",
        "/coding",
        "Alice/coding",
        "alice/Coding",
        "alice/..",
        "../alice/coding",
        "alice/../bob/poems",
        "alice/coding/extra",
        "alice/cöding",
        "ålice/coding",
        "alice/coding\u0000",
        "alice/coding ",
        "fake-base/",
    ],
)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_unknown_model_is_404(gw: Gateway, model: str, path: str) -> None:
    body = completion(model) if path == "/v1/completions" else chat(model)
    error = await assert_error(await gw.post(path, body), 404, param="model", code="model_not_found")
    assert error["type"] == "invalid_request_error"
    assert error["message"] == f"The model '{model}' does not exist or you do not have access to it."
    assert gw.engine.generate_calls == []


async def test_adapter_published_after_start_is_served(gw: Gateway) -> None:
    record = await publish_adapter(gw.store, gw.scratch, "carol", "late", base_model=BASE)
    gw.records[record.ref] = record
    resp = await gw.post("/v1/completions", completion("carol/late"))
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["text"] == expected_text(
        record.versioned_ref, gw.engine.prompt_ids("Hello"), 0, 3
    )


async def test_all_adapter_slots_busy_is_503_with_retry_after(start_gateway: StartGateway) -> None:
    gw = await start_gateway(max_cpu_loras=1, adapter_wait_timeout_s=0.1)
    gw.engine.token_delay_s = 0.01
    busy = await gw.post("/v1/completions", completion("alice/coding", max_tokens=40, stream=True))
    assert busy.status == 200
    await busy.content.readline()  # the adapter is held while this streams
    resp = await gw.post("/v1/completions", completion("bob/poems"))
    error = await assert_error(resp, 503, code="adapter_capacity_exhausted")
    assert "bob/poems" in error["message"]
    assert int(resp.headers["Retry-After"]) >= 1
    resp = await gw.post("/v1/completions", completion(BASE))  # the base model does not need a slot
    assert resp.status == 200
    assert (await busy.text()).endswith("data: [DONE]\n\n")  # the rest of its stream
    resp = await gw.post("/v1/completions", completion("bob/poems"))
    assert resp.status == 200


async def test_adapter_that_fails_to_load_is_422_and_others_serve_on(gw: Gateway) -> None:
    gw.engine.fail_loads["alice/coding"] = "target module 'gate_proj' is not in the base model"
    resp = await gw.post("/v1/completions", completion("alice/coding"))
    error = await assert_error(resp, 422, param="model", code="adapter_load_failed")
    assert "gate_proj" in error["message"]
    resp = await gw.post("/v1/chat/completions", chat("alice/coding"))
    await assert_error(resp, 422, param="model", code="adapter_load_failed")
    assert gw.engine.adds_of("alice/coding") == 1  # remembered, not retried
    for model in (BASE, "bob/poems"):
        resp = await gw.post("/v1/completions", completion(model))
        assert resp.status == 200


# -- malformed requests ----------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b'{"model": "x",}', b"\xff\xfe{}", b"[" * 100_000])
async def test_invalid_json_is_400(gw: Gateway, raw: bytes) -> None:
    resp = await gw.client.post("/v1/completions", data=raw, headers={"Content-Type": "application/json"})
    error = await assert_error(resp, 400)
    assert "JSON" in error["message"]


@pytest.mark.parametrize("body", [[], "text", 3, None])
async def test_body_that_is_not_an_object_is_400(gw: Gateway, body: Any) -> None:
    resp = await gw.client.post("/v1/chat/completions", data=json.dumps(body))
    await assert_error(resp, 400)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b""),
        ("multipart/form-data; boundary=b", b"--b\r\nno headers, no end"),
        ("multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nx'),
        ("multipart/form-data; boundary=b", b"no boundary line at all"),
    ],
)
async def test_malformed_multipart_upload_is_400(gw: Gateway, content_type: str, body: bytes) -> None:
    resp = await gw.client.post("/v1/adapters", data=body, headers={"Content-Type": content_type})
    await assert_error(resp, 400)


async def test_body_over_the_size_limit_is_413(start_gateway: StartGateway) -> None:
    gw = await start_gateway(max_request_bytes=2048)
    resp = await gw.post("/v1/completions", completion(prompt="x" * 4000))
    error = await assert_error(resp, 413, code="request_too_large")
    assert "2048" in error["message"]
    resp = await gw.post("/v1/completions", completion(prompt="x" * 100))  # the server is fine
    assert resp.status == 200


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", completion(frequncy_penalty=0.5), "frequncy_penalty"),  # a typo
        ("/v1/completions", completion(best_of=2), "best_of"),  # not in vLLM's API any more
        (
            "/v1/completions",
            completion(stream=True, stream_options={"include_usage": True, "x": 1}),
            "stream_options.x",
        ),
        ("/v1/chat/completions", chat(top_logprob=2), "top_logprob"),
    ],
)
async def test_unknown_field_is_400_naming_it(gw: Gateway, path: str, body: dict, param: str) -> None:
    error = await assert_error(await gw.post(path, body), 400, param=param, code="unsupported_parameter")
    assert param in error["message"]
    assert gw.engine.generate_calls == []


@pytest.mark.parametrize("field", ["guided_json", "guided_regex", "guided_choice"])
async def test_removed_guided_fields_are_400_pointing_at_structured_outputs(gw: Gateway, field: str) -> None:
    # vLLM ignores them since it removed them: output would silently not be constrained.
    error = await assert_error(await gw.post("/v1/completions", completion(**{field: "x"})), 400, param=field)
    assert "structured_outputs" in error["message"]


# What vLLM's OpenAI server refuses, with the parameter it names (None where vLLM names none).
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, None),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"model": 5}, "model"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": [1, 1.5]}, "prompt.1"),
        ({"prompt": {"text": "hi"}}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, None),
        ({"stop": 5}, "stop"),
        ({"stop": ""}, None),
        ({"stop": [1]}, "stop.0"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ["a", ""]}, None),
        ({"user": 5}, "user"),
        ({"stream": True, "stream_options": []}, "stream_options"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ],
)
async def test_completion_field_errors_are_400(gw: Gateway, fields: dict, param: str | None) -> None:
    resp = await gw.post("/v1/completions", completion(**fields))
    error = await assert_error(resp, 400, param=param)
    assert error["type"] == "invalid_request_error" and error["message"]
    assert gw.engine.generate_calls == []


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, None),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
        ({"messages": [MESSAGES[0], {"role": "user", "content": [{"type": "image_url"}]}]}, None),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, None),
        ({"max_completion_tokens": 0}, "max_tokens"),
        ({"tools": []}, "tools"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ],
)
async def test_chat_field_errors_are_400(gw: Gateway, fields: dict, param: str | None) -> None:
    resp = await gw.post("/v1/chat/completions", chat(**fields))
    error = await assert_error(resp, 400, param=param)
    assert error["type"] == "invalid_request_error" and error["message"]
    assert gw.engine.generate_calls == []


# What vLLM's OpenAI server accepts although OpenAI's would not (lax types, its wider limits) and its
# extras: the gateway answers as vLLM does, and the value reaches the engine as vLLM reads it.
@pytest.mark.parametrize(
    ("fields", "seen"),
    [
        ({"max_tokens": "5"}, ("max_tokens", 5)),
        ({"max_tokens": 5.0}, ("max_tokens", 5)),
        ({"n": 17}, ("n", 17)),
        ({"temperature": "0.5"}, ("temperature", 0.5)),
        ({"logprobs": 6}, ("logprobs", 6)),
        ({"frequency_penalty": 0.5}, ("frequency_penalty", 0.5)),
        ({"repetition_penalty": 1.1, "top_k": 5, "min_p": 0.1}, ("top_k", 5)),
        ({"ignore_eos": True, "min_tokens": 2}, ("min_tokens", 2)),
    ],
)
async def test_completion_values_vllm_accepts(gw: Gateway, fields: dict, seen: tuple[str, object]) -> None:
    resp = await gw.post("/v1/completions", completion(**fields))
    assert resp.status == 200, await resp.text()
    name, value = seen
    assert getattr(gw.engine.generate_calls[-1].params, name) == value


@pytest.mark.parametrize("model", [None, ""])
async def test_no_model_is_the_base_model_as_in_vllm(gw: Gateway, model: str | None) -> None:
    body = chat()
    if model is None:
        del body["model"]
    else:
        body["model"] = model
    resp = await gw.post("/v1/chat/completions", body)
    assert resp.status == 200
    assert (await resp.json())["model"] == BASE
    assert gw.engine.generate_calls[-1].adapter.engine_name == "__base__"  # the zero adapter: exactly the base


async def test_missing_prompt_is_400(gw: Gateway) -> None:
    body = completion()
    del body["prompt"]
    await assert_error(await gw.post("/v1/completions", body), 400, param="prompt")


async def test_infinite_temperature_is_400(gw: Gateway) -> None:
    raw = b'{"model": "fake-base", "prompt": "Hi", "temperature": 1e999}'  # valid JSON, parses to inf
    resp = await gw.client.post("/v1/completions", data=raw)
    await assert_error(resp, 400, param="temperature")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_number_literals_are_400(gw: Gateway, literal: str) -> None:
    # Not JSON, but Python's parser (and some clients) accept them: still never a temperature.
    raw = f'{{"model": "fake-base", "prompt": "Hi", "temperature": {literal}}}'.encode()
    resp = await gw.client.post("/v1/completions", data=raw)
    await assert_error(resp, 400, param="temperature")


async def test_token_ids_outside_the_vocabulary_are_400(gw: Gateway) -> None:
    resp = await gw.post("/v1/completions", completion(prompt=[1, 100_000]))
    error = await assert_error(resp, 400, param="prompt")
    assert "vocabulary" in error["message"]
    await assert_error(await gw.post("/v1/completions", completion(prompt=[1, -1])), 400, param="prompt.1")
    assert gw.engine.generate_calls == []


# -- the context window ----------------------------------------------------------------------


async def test_a_prompt_beyond_the_context_is_400(gw: Gateway) -> None:
    resp = await gw.post("/v1/completions", completion(prompt=[5] * (MAX_MODEL_LEN + 1)))
    error = await assert_error(resp, 400, param="input_tokens")
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in error["message"]
    messages = [{"role": "user", "content": "x " * MAX_MODEL_LEN}]
    resp = await gw.post("/v1/chat/completions", chat(messages=messages))
    error = await assert_error(resp, 400, param="input_tokens")
    assert str(MAX_MODEL_LEN) in error["message"]
    assert gw.engine.generate_calls == []


async def test_max_tokens_beyond_the_context_is_cut_to_what_fits(gw: Gateway) -> None:
    # As vLLM's server: the completion gets what is left of the context (finish_reason "length").
    resp = await gw.post("/v1/completions", completion(prompt=[5] * 250, max_tokens=7))
    assert resp.status == 200
    body = await resp.json()
    assert body["usage"]["total_tokens"] == MAX_MODEL_LEN
    assert body["choices"][0]["finish_reason"] == "length"
    body = completion(prompt=[5] * 250)
    del body["max_tokens"]  # the default (16) is cut the same way
    assert (await (await gw.post("/v1/completions", body)).json())["usage"]["completion_tokens"] == 6


# -- routing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/engines", "/v1/completions/x", "/v2/completions"])
async def test_unknown_route_is_404_json(gw: Gateway, path: str) -> None:
    await assert_error(await gw.client.get(path), 404, code="not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/completions"), ("PUT", "/v1/chat/completions"), ("POST", "/v1/models"), ("DELETE", "/healthz")],
)
async def test_wrong_method_is_405_json(gw: Gateway, method: str, path: str) -> None:
    resp = await gw.client.request(method, path)
    await assert_error(resp, 405, code="method_not_allowed")
    assert "Allow" in resp.headers


async def test_admin_sync_with_the_store_down_is_503(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    async def down() -> None:
        raise StoreUnavailableError("connection refused")

    monkeypatch.setattr(gw.app[STORE], "list_stamps", down)
    resp = await gw.client.post("/admin/sync")
    await assert_error(resp, 503, code="service_unavailable")
    assert "Retry-After" in resp.headers


# -- the OpenAPI document ----------------------------------------------------------------------


async def test_openapi_document_is_valid_and_describes_exactly_the_routes(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.yaml"
    add_key(keys_file, "alice")
    gw = await start_gateway(keys_file=keys_file)
    resp = await gw.client.get("/openapi.json")  # no API key: it holds no tenant data
    assert resp.status == 200, await resp.text()
    document = await resp.json()
    validate(document)  # OpenAPI 3.1, schemas included
    assert document["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    routed = {(r.method, r.resource.canonical) for r in gw.app.router.routes() if r.method != "HEAD" and r.resource}
    assert documented == routed
    open_paths = {
        path for path, operations in document["paths"].items() for op in operations.values() if op.get("security") == []
    }
    assert open_paths == OPEN_PATHS
    await assert_error(await gw.post("/v1/completions", completion()), 401, code="invalid_api_key")


async def test_openapi_schemas_are_the_request_models_and_the_error_shape(gw: Gateway) -> None:
    document = await (await gw.client.get("/openapi.json")).json()
    operation = document["paths"]["/v1/completions"]["post"]

    def schema(media: dict[str, Any]) -> dict[str, Any]:
        return {**media["content"]["application/json"]["schema"], "components": document["components"]}

    request_schema, error_schema = schema(operation["requestBody"]), schema(operation["responses"]["404"])
    body = completion("nobody/nothing")
    jsonschema.validate(body, request_schema)
    with pytest.raises(jsonschema.ValidationError):  # unknown fields are refused by both
        jsonschema.validate({**body, "frequncy_penalty": 0}, request_schema)
    resp = await gw.post("/v1/completions", body)
    await assert_error(resp, 404, param="model", code="model_not_found")
    jsonschema.validate(await resp.json(), error_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"error": {"message": "m", "type": "t"}}, error_schema)


# -- metrics ---------------------------------------------------------------------------


async def test_metrics_report_sync_staleness_and_resident_adapters(gw: Gateway) -> None:
    assert (await gw.post("/v1/completions", completion("alice/coding"))).status == 200
    resp = await gw.client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in (await resp.text()).splitlines()
        if line and not line.startswith("#")
    }
    assert 0 <= samples["lora_gateway_adapter_sync_age_seconds"] < 60
    assert samples["lora_gateway_adapter_sync_failing"] == 0
    assert samples["lora_gateway_adapters_known"] == len(ADAPTERS)
    assert samples["lora_gateway_resident_adapters"] == 1
    assert samples["lora_gateway_disk_cache_bytes"] > 0


async def test_warm_adapters_are_fetched_to_disk_at_start(start_gateway: StartGateway, tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path / "store")
    warm = await publish_adapter(store, tmp_path, "wendy", "warm", base_model=BASE, warm=True)
    cold = await publish_adapter(store, tmp_path, "carl", "cold", base_model=BASE)
    gw = await start_gateway()
    disk = gw.client.app[DISK_CACHE]
    deadline = asyncio.get_running_loop().time() + 5
    while not disk.is_cached(warm):
        assert asyncio.get_running_loop().time() < deadline, "the warm adapter was not prefetched"
        await asyncio.sleep(0.05)
    assert not disk.is_cached(cold)


async def test_store_down_during_a_direct_look_up_is_503_with_retry_after(gw: Gateway) -> None:
    async def outage(owner: str, name: str) -> AdapterRecord | None:
        raise StoreUnavailableError("the store is down (test)")

    gw.app[STORE].get_record = outage  # type: ignore[method-assign]
    resp = await gw.post("/v1/completions", completion("alice/not-seen-yet"))
    error = await assert_error(resp, 503, code="service_unavailable")
    assert "store is unreachable" in error["message"]
    assert int(resp.headers["Retry-After"]) >= 1
