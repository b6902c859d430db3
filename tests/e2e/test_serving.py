"""The OpenAI API on the real engine, through the official `openai` client."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from gateway_tools.dev.models import DevModel
from gateway_tools.dev.oracle import ReferenceModel
from gateway_tools.dev.process import ServerProcess
from gateway_tools.dev.tiny_model import BASE_MODEL_NAME
from tests.e2e.conftest import adapter_dir, complete_ids

pytestmark = pytest.mark.e2e

PROMPT = "def parse(value):"


def test_models_lists_the_base_and_every_adapter_with_the_base_as_parent(client: openai.OpenAI, tiny: DevModel) -> None:
    models = {m.id: m for m in client.models.list()}
    assert BASE_MODEL_NAME in models
    for record in tiny.adapters:
        assert models[record.ref].parent == BASE_MODEL_NAME
        assert models[record.ref].owned_by == record.owner


def test_completion_is_the_adapters_output(client: openai.OpenAI, tiny: DevModel, oracle: ReferenceModel) -> None:
    expected = oracle.greedy_ids(adapter_dir(tiny, "alice/chat"), oracle.prompt_ids(PROMPT), 10)
    assert complete_ids(client, "alice/chat", PROMPT, 10) == expected
    result = client.completions.create(model="alice/chat", prompt=PROMPT, max_tokens=10, temperature=0)
    assert result.model == "alice/chat"
    assert result.usage.prompt_tokens == len(oracle.prompt_ids(PROMPT))
    assert result.usage.completion_tokens == len(expected)
    assert result.usage.total_tokens == result.usage.prompt_tokens + len(expected)
    # The text is what the tokens decode to (a trailing partial UTF-8 character is held back).
    assert oracle.tokenizer.decode(expected).startswith(result.choices[0].text)


def test_each_model_answers_differently(client: openai.OpenAI) -> None:
    texts = {
        model: client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
        for model in (BASE_MODEL_NAME, "alice/chat", "bob/chat")
    }
    assert len(set(texts.values())) == 3, texts


def test_streamed_completion_equals_the_whole_one(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="bob/chat", prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(
        client.completions.create(
            model="bob/chat",
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_completion_follows_the_chat_template(
    client: openai.OpenAI, tiny: DevModel, oracle: ReferenceModel
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    result = client.chat.completions.create(model="carol/chat", messages=messages, max_tokens=8, temperature=0)
    expected = oracle.greedy_ids(adapter_dir(tiny, "carol/chat"), oracle.chat_ids(messages), 8)
    assert result.choices[0].message.role == "assistant"
    assert oracle.tokenizer.decode(expected, skip_special_tokens=True).startswith(result.choices[0].message.content)
    assert result.usage.prompt_tokens == len(oracle.chat_ids(messages))
    assert result.usage.completion_tokens == len(expected)


def test_streamed_chat_sends_role_then_content(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="alice/chat", messages=messages, max_tokens=6, temperature=0)
    chunks = list(
        client.chat.completions.create(model="alice/chat", messages=messages, max_tokens=6, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_choices_and_logprobs(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model="alice/chat", prompt=PROMPT, max_tokens=5, n=3, temperature=1.0, seed=7, logprobs=2
    )
    assert sorted(c.index for c in result.choices) == [0, 1, 2]
    for choice in result.choices:
        assert len(choice.logprobs.tokens) == 5
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
        for chosen, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
            assert 2 <= len(top) <= 3  # as vLLM's server: the 2 most likely, and the sampled one when not among them
            assert chosen <= max(top.values()) + 1e-6  # nothing beats the most likely token
    assert result.usage.completion_tokens == 15


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    def sample() -> str:
        return (
            client.completions.create(model="bob/chat", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=42)
            .choices[0]
            .text
        )

    assert sample() == sample()


def test_stop_sequence_ends_the_text(client: openai.OpenAI) -> None:
    full = client.completions.create(model="alice/chat", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = full[4:6]
    result = client.completions.create(model="alice/chat", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert result.choices[0].finish_reason == "stop"
    assert result.choices[0].text == full[: full.index(stop)]


def test_unknown_model_is_a_404_in_openais_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="alice/nope", prompt=PROMPT, max_tokens=4)
    assert caught.value.body["code"] == "model_not_found"
    assert caught.value.body["param"] == "model"


def test_unsupported_parameter_is_a_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="alice/chat", prompt=PROMPT, max_tokens=4, extra_body={"best_of": 2})
    assert caught.value.body["param"] == "best_of"
    assert "best_of" in caught.value.body["message"]


def test_beyond_the_context_is_a_400_naming_the_limit(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:  # vLLM's words and param
        client.completions.create(model="alice/chat", prompt=PROMPT, max_tokens=5000)
    assert "max_model_len=2048" in caught.value.body["message"]
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="alice/chat", prompt=[5] * 2049, max_tokens=1)
    assert "maximum context length is 2048 tokens" in caught.value.body["message"]
    assert caught.value.body["param"] == "input_tokens"


def test_health_and_readiness(gateway: ServerProcess) -> None:
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(gateway.base_url + path) as response:
            assert response.status == 200
            assert json.load(response)["status"] in ("ok", "ready")


def test_engine_processes_run_below_the_gateways_priority(gateway: ServerProcess) -> None:
    """On the CPU build the busy-polling engine processes yield to the HTTP side (--engine-niceness, 10)."""
    import os

    import psutil

    assert gateway.process is not None
    children = psutil.Process(gateway.process.pid).children(recursive=True)
    assert children, "vLLM's engine core runs in a child process"
    assert os.getpriority(os.PRIO_PROCESS, gateway.process.pid) == 0
    for child in children:
        assert {os.getpriority(os.PRIO_PROCESS, t.id) for t in child.threads()} == {10}, child.cmdline()
