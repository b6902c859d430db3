"""The router on its own, with a fake encoder: which candidate a prompt goes to, what is embedded
when, and what the decision leaves in metrics and spans."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.errors import InvalidRequestError, ServiceUnavailableError
from gateway.metrics import detached_metrics
from gateway.routing.encoder import encoder_dtype
from gateway.routing.prompt import MAX_ROUTED_CHARS, routable_text
from gateway.routing.router import MAX_CACHED_RECORDS, Router, route_texts
from gateway.telemetry import spans
from tests.fakes import FakeEncoder, make_record

CODING = make_record("alice", "coding", routes=["fix my python function", "debug this python code"])
COOKING = make_record("alice", "cooking", routes=["a recipe for pasta", "how long to bake bread"])
PLAIN = make_record("alice", "plain")  # no routes: never routed to


def router_with(encoder: FakeEncoder, threshold: float = 0.3, **kwargs: Any) -> Router:
    return Router(lambda: encoder, threshold, **kwargs)


async def test_the_best_matching_candidate_is_chosen() -> None:
    router = router_with(FakeEncoder())
    code = await router.choose("please debug my python function", [CODING, COOKING, PLAIN])
    food = await router.choose("bake some bread for dinner", [CODING, COOKING, PLAIN])
    assert code.record == CODING and food.record == COOKING
    assert set(code.decision.scores) == {CODING.ref, COOKING.ref}  # the adapter without routes is not scored
    assert code.decision.scores[CODING.ref] > code.decision.scores[COOKING.ref]


async def test_below_the_threshold_the_base_answers() -> None:
    router = router_with(FakeEncoder(), threshold=0.3)
    choice = await router.choose("what is the capital of peru", [CODING, COOKING])
    assert choice.record is None and choice.decision.chosen is None
    assert max(choice.decision.scores.values()) < 0.3


async def test_without_candidates_the_prompt_is_not_even_embedded() -> None:
    encoder = FakeEncoder()
    choice = await router_with(encoder).choose("debug my python code", [PLAIN])
    assert choice.record is None and encoder.calls == 0


async def test_routes_are_embedded_once_per_version_and_anew_for_a_new_one() -> None:
    encoder = FakeEncoder()
    router = router_with(encoder)
    await router.choose("debug python", [CODING, COOKING])
    assert encoder.encoded == ["debug python", *route_texts(CODING), *route_texts(COOKING)]
    encoder.encoded.clear()
    await router.choose("bake bread", [CODING, COOKING])
    assert encoder.encoded == ["bake bread"]  # one call, the prompt alone
    newer = make_record("alice", "coding", payload=b"v2", routes=["write rust code"])
    encoder.encoded.clear()
    choice = await router.choose("write some rust code", [newer, COOKING])
    assert encoder.encoded == ["write some rust code", "write rust code"] and choice.record == newer


async def test_warming_embeds_every_routed_record_so_requests_embed_only_their_prompt() -> None:
    encoder = FakeEncoder()
    router = router_with(encoder)
    records = [make_record("u", f"a{i}", routes=[f"topic number {i}"]) for i in range(100)] + [PLAIN]
    assert await router.warm(records) == 100
    assert encoder.calls >= 2  # in batches: requests get the encoder thread between them
    assert await router.warm(records) == 0
    encoder.encoded.clear()
    await router.choose("topic", records)
    assert encoder.encoded == ["topic"]


async def test_the_cache_is_bounded() -> None:
    router = router_with(FakeEncoder())
    await router.warm([make_record("u", f"a{i}", routes=["x words"]) for i in range(MAX_CACHED_RECORDS + 10)])
    assert len(router._routes) == MAX_CACHED_RECORDS


async def test_an_encoder_that_fails_to_load_makes_routing_unavailable_not_the_gateway() -> None:
    def broken() -> FakeEncoder:
        raise OSError("no model files")

    router = Router(broken, 0.3)
    with pytest.raises(ServiceUnavailableError):
        await router.choose("debug python", [CODING])
    with pytest.raises(ServiceUnavailableError):  # and again: the failure is remembered, not retried per request
        await router.choose("debug python", [CODING])
    router.close()


async def test_each_decision_is_a_span_and_a_metric_without_adapter_names() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    metrics = detached_metrics()
    router = router_with(FakeEncoder(), tracer=provider.get_tracer("t"), metrics=metrics)
    await router.choose("debug my python", [CODING, COOKING])
    await router.choose("the capital of peru", [CODING, COOKING])
    first, second = exporter.get_finished_spans()
    assert first.name == spans.ROUTE
    assert first.attributes[spans.ROUTE_CANDIDATES] == (CODING.ref, COOKING.ref)
    assert len(first.attributes[spans.ROUTE_SCORES]) == 2
    assert first.attributes[spans.ROUTE_CHOSEN] == CODING.ref
    assert first.attributes[spans.ROUTE_OUTCOME] == "adapter"
    assert second.attributes[spans.ROUTE_CHOSEN] == "" and second.attributes[spans.ROUTE_OUTCOME] == "base"
    assert metrics.route_decisions.labels("adapter")._value.get() == 1
    assert metrics.route_decisions.labels("base")._value.get() == 1
    assert metrics.route_decisions._labelnames == ("outcome",)


class _Body:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (_Body(prompt="fix my code"), "fix my code"),
        (_Body(prompt=["  fix my code  "]), "fix my code"),
        (_Body(messages=[{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                         {"role": "user", "content": "second"}]), "second"),
        (_Body(messages=[{"role": "user", "content": [{"type": "text", "text": "look"},
                                                      {"type": "image_url", "image_url": {"url": "x"}},
                                                      {"type": "text", "text": "here"}]}]), "look\nhere"),
        (_Body(messages=[{"role": "user", "content": "ask"}, {"role": "system", "content": "be brief"}]), "ask"),
        (_Body(input="a responses input"), "a responses input"),
        (_Body(input=[{"role": "user", "content": [{"type": "input_text", "text": "from responses"}]}]),
         "from responses"),
    ],
)  # fmt: skip
def test_the_text_routed_by_is_the_last_user_message_or_the_prompt(body: Any, text: str) -> None:
    assert routable_text(body) == text


@pytest.mark.parametrize(
    "body",
    [
        _Body(prompt=[1, 2, 3]),
        _Body(prompt=["one", "two"]),
        _Body(prompt=None),
        _Body(messages=[{"role": "system", "content": "only a system prompt"}]),
        _Body(messages=[{"role": "user", "content": "   "}]),
        _Body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    ],
)
def test_a_request_without_text_to_route_by_is_a_clear_400(body: Any) -> None:
    with pytest.raises(InvalidRequestError, match="auto"):
        routable_text(body)


def test_a_huge_prompt_is_cut_before_the_encoder_sees_it() -> None:
    assert len(routable_text(_Body(prompt="word " * 100_000))) == MAX_ROUTED_CHARS


@pytest.mark.parametrize(
    ("flags", "dtype"),
    [
        ({"avx2", "avx512f"}, "float32"),
        ({"avx512f", "avx512_bf16"}, "bfloat16"),
        ({"amx_bf16"}, "bfloat16"),
        (set(), "float32"),
    ],
)
def test_the_encoder_computes_in_bfloat16_only_where_the_cpu_does_natively(flags: set[str], dtype: str) -> None:
    assert encoder_dtype(flags) == dtype
