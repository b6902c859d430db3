"""`model: "auto"` on the real gateway: the packaged sentence encoder routes unseen prompts to the
right one of a user's three adapters (the answer is that adapter's, token for token), an off-topic
prompt to the base, and never to another user's private adapter."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
import pytest

from adapters_manifest import layout
from adapters_manifest.local_store import LocalFolderStore
from adapters_manifest.publish import publish, record_for
from gateway.routing.encoder import OnnxSentenceEncoder, SentenceTransformerEncoder, load_encoder, packaged_encoder_dir
from gateway_tools.dev.models import DevModel, make_model
from gateway_tools.dev.process import ServerProcess
from tests.e2e.conftest import Keys, client_for, start_gateway

pytestmark = pytest.mark.e2e

ROUTES = {
    "uma/code": (
        "Programming help: Python, debugging, errors and code review.",
        ["fix this python function", "why does my code throw an exception", "how do I sort a list in python",
         "explain this stack trace", "write a unit test for my class", "my program is stuck in an infinite loop",
         "what does this error message mean", "refactor this code to be faster", "how do I read a file in python"],
    ),
    "uma/kitchen": (
        "Cooking: recipes, baking, roasting, ingredients and kitchen techniques.",
        ["a recipe for tomato soup", "how long should I bake bread", "what can I cook with eggs and spinach",
         "how do I make pancakes fluffy", "substitute for butter in cookies", "how long do I roast a turkey",
         "what oven temperature for roast potatoes", "an easy weeknight dinner idea", "how do I cook beans"],
    ),
    "uma/lease": (
        "Tenancy law: leases, deposits, landlords and eviction.",
        ["my landlord will not return my deposit", "can I break my lease early", "what notice does an eviction need",
         "is my landlord allowed to enter without asking", "who pays for repairs in a rented flat",
         "how much notice to end my tenancy", "can my rent be raised mid-lease", "my landlord ignores a broken heater"],
    ),
    # Another user's private adapter whose routes fit uma's coding prompts even better.
    "sam/code": ("Python programming help.", ["python code error debugging help", "fix my python code"]),
}  # fmt: skip

UNSEEN = [
    ("My Python script crashes with a KeyError when I read the dictionary, how do I fix it?", "uma/code"),
    ("Can you review this function and tell me why the loop never ends?", "uma/code"),
    ("What temperature should I roast a chicken at, and for how long?", "uma/kitchen"),
    ("Give me an easy dinner recipe with rice and beans.", "uma/kitchen"),
    ("The landlord kept my security deposit for normal wear and tear. Is that legal?", "uma/lease"),
    ("How much notice must I give before moving out of my rented apartment?", "uma/lease"),
]
OFF_TOPIC = "What is the tallest mountain in the Alps?"
MAX_TOKENS = 6


@dataclass(frozen=True)
class Routed:
    server: ServerProcess
    keys: Keys
    base_name: str


@pytest.fixture(scope="module")
def routed(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    model = make_model(tmp_path_factory.mktemp("routing"), list(ROUTES))
    asyncio.run(_add_routes(model))
    server = start_gateway(model, keys, tmp_path_factory.mktemp("logs"), max_loras=2, max_cpu_loras=4)
    yield Routed(server, keys, model.served_name)
    assert server.stop() == 0, server.log_tail()


async def _add_routes(model: DevModel) -> None:
    """Each adapter republished with its description and routes: a new version of the same files."""
    store = LocalFolderStore(model.store)
    for record in model.adapters:
        description, routes = ROUTES[record.ref]
        folder = model.store / layout.version_prefix(record)
        await publish(
            store,
            folder,
            record_for(
                folder, record.owner, record.name, base_model=record.base_model, description=description, routes=routes
            ),
        )


def answer(client: openai.OpenAI, model: str, text: str) -> tuple[str, str, str]:
    """(the model that answered, the X-Routed-Model header, the greedy answer)."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=MAX_TOKENS, temperature=0
    )
    completion = raw.parse()
    return completion.model, raw.headers.get("x-routed-model", ""), completion.choices[0].message.content or ""


def test_unseen_prompts_are_answered_by_the_adapter_their_topic_belongs_to(routed: Routed) -> None:
    uma = client_for(routed.server, routed.keys.by_user["uma"])
    for text, expected in UNSEEN:
        chosen, header, content = answer(uma, "auto", text)
        assert (chosen, header) == (expected, expected), text
        assert content == answer(uma, expected, text)[2]  # exactly that adapter's answer


def test_an_off_topic_prompt_is_answered_by_the_base(routed: Routed) -> None:
    uma = client_for(routed.server, routed.keys.by_user["uma"])
    chosen, header, content = answer(uma, "auto", OFF_TOPIC)
    assert chosen == header == routed.base_name
    assert content == answer(uma, routed.base_name, OFF_TOPIC)[2]


def test_routing_never_reaches_another_users_private_adapter(routed: Routed) -> None:
    uma = client_for(routed.server, routed.keys.by_user["uma"])
    assert answer(uma, "auto", "fix my python code error")[0] == "uma/code"  # sam/code's own words
    refusals = []
    for model in ("sam/auto", "zed/auto"):  # sam has a private adapter with routes, zed nothing at all
        with pytest.raises(openai.NotFoundError) as refused:
            uma.chat.completions.create(model=model, messages=[{"role": "user", "content": "fix my python code"}])
        refusals.append(refused.value.body["message"].replace(model, "MODEL"))
    assert refusals[0] == refusals[1]
    sam = client_for(routed.server, routed.keys.by_user["sam"])
    assert answer(sam, "auto", "fix my python code error")[0] == "sam/code"  # its owner routes to it


def test_the_onnx_encoder_gives_the_vectors_sentence_transformers_gives(tmp_path: Path) -> None:
    """The packaged encoder unpacked and exported afresh (an empty cache), against the library."""
    encoder = load_encoder(None, cache_dir=tmp_path)
    assert isinstance(encoder, OnnxSentenceEncoder)
    texts = ["Why does my loop never end?", "a recipe for tomato soup", "hi", "word " * 600]  # the last one truncated
    reference = SentenceTransformerEncoder(packaged_encoder_dir(tmp_path)).encode(texts)
    vectors = encoder.encode(texts)
    assert vectors.shape == reference.shape == (4, 384)
    assert np.abs(vectors - reference).max() < 1e-4
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert isinstance(load_encoder(None, cache_dir=tmp_path), OnnxSentenceEncoder)  # the export is reused
