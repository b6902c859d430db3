"""The strongest check: every greedy output equals transformers + PEFT for its own adapter,
however requests for the base and for different adapters were batched together."""

from __future__ import annotations

import json
import random
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from gateway_tools.dev.models import DevModel
from gateway_tools.dev.oracle import ReferenceModel
from gateway_tools.dev.process import ServerProcess
from gateway_tools.dev.tiny_model import BASE_MODEL_NAME
from tests.e2e.conftest import ADMIN, Keys, adapter_dir, client_for, complete_ids, start_gateway, token_ids

pytestmark = pytest.mark.e2e

MODELS = [BASE_MODEL_NAME, "alice/chat", "bob/chat", "carol/chat"]
PROMPTS = ["def parse(value):", "import os\n", "class Config:", "    return self.", "for item in items:"]
MAX_TOKENS = 12


def expected_outputs(tiny: DevModel, oracle: ReferenceModel) -> dict[tuple[str, str], list[int]]:
    return {
        (model, prompt): oracle.greedy_ids(adapter_dir(tiny, model), oracle.prompt_ids(prompt), MAX_TOKENS)
        for model in MODELS
        for prompt in PROMPTS
    }


def test_mixed_concurrent_requests_each_get_exactly_their_adapters_output(
    client: openai.OpenAI, tiny: DevModel, oracle: ReferenceModel
) -> None:
    expected = expected_outputs(tiny, oracle)
    jobs = [(model, prompt) for model in MODELS for prompt in PROMPTS] * 4  # 80 requests
    random.Random(0).shuffle(jobs)

    def ask(job: tuple[str, str]) -> list[int]:
        return complete_ids(client, *job, MAX_TOKENS)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:  # all in flight together: mixed batches
        answers = list(pool.map(ask, jobs))
    wrong = [(job, got, expected[job]) for job, got in zip(jobs, answers) if got != expected[job]]
    assert not wrong, f"{len(wrong)} of {len(jobs)} outputs differ from the reference, e.g. {wrong[:3]}"


@pytest.fixture(scope="module")
def zero_adapter_gateway(
    tiny: DevModel, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Base requests through the all-zero adapter: the path where the grouped CPU ops cannot apply."""
    server = start_gateway(tiny, keys, tmp_path_factory.mktemp("zero-logs"), base_requests="zero-adapter",
                           max_loras=3, max_cpu_loras=4)  # fmt: skip
    yield server
    assert server.stop() == 0, server.log_tail()


@pytest.mark.parametrize("path", ["plain", "zero-adapter"])
def test_base_requests_batched_with_adapters_get_the_base_output(
    path: str, request: pytest.FixtureRequest, keys: Keys, tiny: DevModel, oracle: ReferenceModel
) -> None:
    """vLLM's CPU ops give LoRA-less tokens the last LoRA slot's delta in a mixed batch: the
    gateway's grouped ops (plain, its default here) and the zero adapter (the fallback) both mend it."""
    server = request.getfixturevalue("gateway" if path == "plain" else "zero_adapter_gateway")
    ready = json.loads(urllib.request.urlopen(server.base_url + "/readyz", timeout=10).read())
    expected_path = "plain (the gateway's grouped CPU LoRA ops" if path == "plain" else "through an all-zero adapter"
    assert ready["base_requests"].startswith(expected_path), ready
    client = client_for(server, keys.by_user[ADMIN])
    prompt = PROMPTS[0]
    base_expected = oracle.greedy_ids(None, oracle.prompt_ids(prompt), MAX_TOKENS)
    jobs = ["alice/chat", BASE_MODEL_NAME, "bob/chat", BASE_MODEL_NAME, "carol/chat", BASE_MODEL_NAME] * 5

    def ask(model: str) -> list[int]:
        return complete_ids(client, model, prompt, MAX_TOKENS)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    base_answers = [a for model, a in zip(jobs, answers) if model == BASE_MODEL_NAME]
    assert base_answers == [base_expected] * len(base_answers)
    for model, answer in zip(jobs, answers):
        if model != BASE_MODEL_NAME:
            assert answer == oracle.greedy_ids(adapter_dir(tiny, model), oracle.prompt_ids(prompt), MAX_TOKENS)


def test_streamed_chat_in_mixed_batches_matches_the_reference(
    client: openai.OpenAI, tiny: DevModel, oracle: ReferenceModel
) -> None:
    conversations = [[{"role": "user", "content": text}] for text in ("hi", "what is 2+2?", "tell me a story")]
    jobs = [(model, i) for model in MODELS for i in range(len(conversations))] * 2

    def ask(job: tuple[str, int]) -> list[int]:
        model, i = job
        stream = client.chat.completions.create(
            model=model,
            messages=conversations[i],
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            logprobs=True,
            extra_body={"return_tokens_as_token_ids": True},
        )
        chunks = [c.choices[0] for c in stream if c.choices and c.choices[0].logprobs]
        return token_ids([t.token for chunk in chunks for t in chunk.logprobs.content])

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (model, i), answer in zip(jobs, answers):
        expected = oracle.greedy_ids(adapter_dir(tiny, model), oracle.chat_ids(conversations[i]), MAX_TOKENS)
        assert answer == expected, (model, conversations[i])
