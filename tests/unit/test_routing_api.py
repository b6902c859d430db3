"""`model: "auto"` through the app (fake engine, fake encoder): the answer comes from the adapter the
routes pick, the client is told which, and routing only ever looks at adapters the caller may use."""

from __future__ import annotations

import json
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.app_keys import CATALOG, ROUTER
from gateway.routing.auto import ROUTED_MODEL_HEADER
from gateway.telemetry import spans
from tests.fakes import FakeEncoder, publish_adapter
from tests.unit.harness import BASE, Gateway, StartGateway, assert_error, chat, completion

ROUTES = {
    "alice/code": (["fix my python function", "debug this python code"], "private"),
    "alice/food": (["a recipe for pasta", "how long to bake bread"], "private"),
    "bob/secret": (["python debugging help for code"], "private"),  # matches alice's coding prompts best
    "bob/shared": (["translate french sentences"], "public"),
    "carol/hidden": (["gardening tomatoes"], "private"),
}
CODE_PROMPT = "please debug my python code"


@pytest.fixture
async def routed(start_gateway: StartGateway) -> tuple[Gateway, FakeEncoder, InMemorySpanExporter]:
    encoder, exporter = FakeEncoder(), InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gw = await start_gateway(
        encoder=encoder, tracer_provider=provider, route_threshold=0.15, trusted_user_header=USER_HEADER
    )
    for ref, (routes, visibility) in ROUTES.items():
        owner, name = ref.split("/")
        gw.records[ref] = await publish_adapter(
            gw.store, gw.scratch, owner, name, base_model=BASE, routes=routes, visibility=visibility
        )
    await gw.app[CATALOG].sync()
    return gw, encoder, exporter


USER_HEADER = "X-Test-User"  # as an authenticating proxy would set it


def as_user(user: str) -> dict[str, str]:
    return {USER_HEADER: user}


def ask(model: str, text: str) -> dict[str, Any]:
    return chat(model, [{"role": "user", "content": text}])


async def routed_answer(gw: Gateway, body: dict[str, Any], user: str = "alice") -> tuple[int, dict[str, Any], str]:
    resp = await gw.client.post(
        "/v1/chat/completions" if "messages" in body else "/v1/completions", json=body, headers=as_user(user)
    )
    return resp.status, await resp.json(), resp.headers.get(ROUTED_MODEL_HEADER, "")


def route_spans(exporter: InMemorySpanExporter) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name == spans.ROUTE]


async def test_auto_is_answered_by_the_matching_adapter_and_says_which(routed: Any) -> None:
    gw, _, _ = routed
    status, body, header = await routed_answer(gw, ask("auto", CODE_PROMPT))
    assert status == 200, body
    assert body["model"] == header == "alice/code"
    assert gw.label("alice/code") in body["choices"][0]["message"]["content"]  # generated with that adapter
    status, body, header = await routed_answer(gw, completion("auto", "bake bread tonight"))
    assert status == 200 and body["model"] == header == "alice/food"
    assert gw.label("alice/food") in body["choices"][0]["text"]


async def test_a_prompt_that_matches_no_route_goes_to_the_base(routed: Any) -> None:
    gw, _, _ = routed
    status, body, header = await routed_answer(gw, ask("auto", "what is the capital of peru"))
    assert status == 200 and body["model"] == header == BASE
    assert gw.label(BASE) in body["choices"][0]["message"]["content"]


async def test_a_stream_names_the_routed_adapter_in_its_header_and_chunks(routed: Any) -> None:
    gw, _, _ = routed
    body = completion("auto", CODE_PROMPT, stream=True)
    resp = await gw.client.post("/v1/completions", json=body, headers=as_user("alice"))
    assert resp.status == 200 and resp.headers[ROUTED_MODEL_HEADER] == "alice/code"
    chunks = [json.loads(line[6:]) for line in (await resp.text()).splitlines() if line.startswith("data: {")]
    assert chunks and {c["model"] for c in chunks} == {"alice/code"}


async def test_routing_never_looks_at_adapters_the_caller_may_not_use(routed: Any) -> None:
    gw, _, exporter = routed
    await routed_answer(gw, ask("auto", CODE_PROMPT))  # bob/secret would score higher
    (decision,) = route_spans(exporter)
    assert decision.attributes[spans.ROUTE_CANDIDATES] == ("alice/code", "alice/food")
    assert decision.attributes[spans.ROUTE_CHOSEN] == "alice/code"


async def test_routing_in_another_users_namespace_sees_only_their_public_adapters(routed: Any) -> None:
    gw, _, exporter = routed
    status, body, header = await routed_answer(gw, ask("bob/auto", "translate french sentences please"))
    assert status == 200 and body["model"] == header == "bob/shared"
    assert route_spans(exporter)[-1].attributes[spans.ROUTE_CANDIDATES] == ("bob/shared",)
    status, body, _ = await routed_answer(gw, ask("bob/auto", CODE_PROMPT))  # bob/secret is not a candidate
    assert status == 200 and body["model"] == BASE


async def test_a_namespace_with_only_private_adapters_is_as_missing_as_no_namespace(routed: Any) -> None:
    gw, encoder, exporter = routed
    answers = []
    for model in ("carol/auto", "nobody/auto"):
        calls_before, spans_before = encoder.calls, len(route_spans(exporter))
        resp = await gw.client.post(
            "/v1/chat/completions", json=ask(model, "gardening tomatoes"), headers=as_user("alice")
        )
        answers.append((resp.status, (await resp.json())["error"]["message"].replace(model, "M")))
        assert encoder.calls == calls_before and len(route_spans(exporter)) == spans_before  # no work done either way
    assert answers[0] == answers[1] and answers[0][0] == 404


async def test_the_owner_routes_among_all_their_adapters(routed: Any) -> None:
    gw, _, _ = routed
    status, body, _ = await routed_answer(gw, ask("auto", "python debugging help for code"), user="bob")
    assert status == 200 and body["model"] == "bob/secret"


async def test_auto_has_no_meaning_where_nothing_is_generated(routed: Any) -> None:
    gw, _, _ = routed
    resp = await gw.client.post("/tokenize", json={"model": "auto", "prompt": "hello"}, headers=as_user("alice"))
    await assert_error(resp, 400, param="model")


async def test_auto_without_text_to_route_by_is_a_400(routed: Any) -> None:
    gw, _, _ = routed
    resp = await gw.client.post("/v1/completions", json=completion("auto", [1, 2, 3]), headers=as_user("alice"))
    await assert_error(resp, 400, param="prompt")


async def test_decisions_are_counted_without_adapter_names(routed: Any) -> None:
    gw, _, _ = routed
    await routed_answer(gw, ask("auto", CODE_PROMPT))
    await routed_answer(gw, ask("auto", "what is the capital of peru"))
    page = await (await gw.client.get("/metrics", headers=as_user("alice"))).text()
    assert 'lora_gateway_route_decisions_total{outcome="adapter"} 1.0' in page
    assert 'lora_gateway_route_decisions_total{outcome="base"} 1.0' in page
    assert "lora_gateway_route_seconds_count 2.0" in page
    assert not [line for line in page.splitlines() if "route" in line and "alice" in line]


async def test_route_embeddings_are_ready_before_the_first_routed_request(routed: Any) -> None:
    gw, encoder, _ = routed
    await gw.app[ROUTER].warm(list(gw.app[CATALOG].records()))
    encoder.encoded.clear()
    await routed_answer(gw, ask("auto", CODE_PROMPT))
    assert encoder.encoded == [CODE_PROMPT]


async def test_with_routing_off_auto_is_an_ordinary_missing_model(start_gateway: StartGateway) -> None:
    gw = await start_gateway(routing=False)
    resp = await gw.post("/v1/chat/completions", ask("auto", CODE_PROMPT))
    await assert_error(resp, 404, param="model", code="model_not_found")


async def test_a_responses_request_is_routed_by_its_input(routed: Any) -> None:
    gw, _, _ = routed
    body = {"model": "auto", "input": [{"role": "user", "content": "bake bread tonight"}], "max_output_tokens": 3}
    resp = await gw.client.post("/v1/responses", json=body, headers=as_user("alice"))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["model"] == resp.headers[ROUTED_MODEL_HEADER] == "alice/food"
