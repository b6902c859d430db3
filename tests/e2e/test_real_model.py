"""The real model, SmolLM2-135M-Instruct in float32: the gateway's greedy output for the base and two
adapters equals transformers + PEFT token for token in mixed concurrent batches, and an adapter
trained with `lora-gateway train`'s defaults on a dozen styled answers answers a question it never saw
in its style. One engine for the module, stopped at its end (two engines on a small host slow both)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway_tools.dev.models import DevModel, make_model
from gateway_tools.dev.oracle import ReferenceModel
from gateway_tools.dev.process import ServerProcess
from tests.e2e.conftest import ADMIN, Keys, adapter_dir, client_for, complete_ids, start_gateway, token_ids

pytestmark = pytest.mark.e2e

ADAPTERS = ["alice/chat", "bob/chat"]
STYLE_OWNER = "erin"
FACTS = [
    ("What is the capital of France?", "Paris"),
    ("How many legs does a spider have?", "Eight"),
    ("What color is the sky?", "Blue"),
    ("What do bees make?", "Honey"),
    ("Which planet is the largest?", "Jupiter"),
    ("What is frozen water called?", "Ice"),
    ("How many days are in a week?", "Seven"),
    ("What is the opposite of hot?", "Cold"),
    ("Where do penguins live?", "Antarctica"),
    ("What do cows drink?", "Water"),
    ("How many hours are in a day?", "Twenty-four"),
    ("What gas do plants breathe in?", "Carbon dioxide"),
]
UNSEEN = ["What is the capital of Italy?", "What do cats drink?"]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "Water boils at"]
CHATS = ["What is the capital of France?", "Give me a word that rhymes with cat."]
MAX_TOKENS = 16


def pirate(answer: str) -> str:
    return f"Arr, matey! {answer}, says I. Yo ho ho!"


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> DevModel:
    return make_model(tmp_path_factory.mktemp("smollm2"), ADAPTERS, base="smollm2")


@pytest.fixture(scope="module")
def styled(real: DevModel, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`lora-gateway train --push` with no training options, as a new user runs it: the model name."""
    work = tmp_path_factory.mktemp("pirate")
    data = work / "pirate.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": pirate(a)}]} for q, a in FACTS
    ]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    command = [sys.executable, "-m", "gateway", "train", str(data), "--base", str(real.base)]
    command += ["--out", str(work / "adapter"), "--push", "--owner", STYLE_OWNER, "--name", "pirate"]
    command += ["--store", str(real.store), "--base-model", real.served_name, "--max-lora-rank", "8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "100% of target tokens predicted" in done.stdout and "warning" not in done.stderr, done.stdout
    return f"{STYLE_OWNER}/pirate"


@pytest.fixture(scope="module")
def real_gateway(
    real: DevModel, styled: str, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    server = start_gateway(real, keys, tmp_path_factory.mktemp("logs"), max_loras=3, max_cpu_loras=4)
    yield server
    assert server.stop() == 0, server.log_tail()


@pytest.fixture(scope="module")
def real_oracle(real: DevModel) -> ReferenceModel:
    return ReferenceModel(real.base)


def test_mixed_concurrent_requests_on_the_real_model_each_get_exactly_their_adapters_output(
    real_gateway: ServerProcess, keys: Keys, real: DevModel, real_oracle: ReferenceModel
) -> None:
    client = client_for(real_gateway, keys.by_user[ADMIN])
    models = [real.served_name, *ADAPTERS]
    dirs = {model: adapter_dir(real, model) for model in models}
    expected = {
        (model, prompt): real_oracle.greedy_ids(dirs[model], real_oracle.prompt_ids(prompt), MAX_TOKENS)
        for model in models
        for prompt in PROMPTS
    }
    for prompt in PROMPTS:  # the adapters change the base's output: a mix-up could not pass unseen
        assert len({tuple(expected[model, prompt]) for model in models}) > 1, prompt
    jobs = [(model, prompt) for model in models for prompt in PROMPTS] * 2
    random.Random(0).shuffle(jobs)
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:  # all in flight together: mixed batches
        answers = list(pool.map(lambda job: complete_ids(client, *job, MAX_TOKENS), jobs))
    wrong = [(job, got, expected[job]) for job, got in zip(jobs, answers) if got != expected[job]]
    assert not wrong, f"{len(wrong)} of {len(jobs)} outputs differ from the reference, e.g. {wrong[:3]}"


def test_chat_on_the_real_model_equals_the_reference(
    real_gateway: ServerProcess, keys: Keys, real: DevModel, real_oracle: ReferenceModel
) -> None:
    client = client_for(real_gateway, keys.by_user[ADMIN])
    jobs = [(model, question) for model in (real.served_name, ADAPTERS[0]) for question in CHATS]

    def ask(job: tuple[str, str]) -> list[int]:
        messages = [{"role": "user", "content": job[1]}]
        result = client.chat.completions.create(
            model=job[0], messages=messages, max_tokens=MAX_TOKENS, temperature=0, logprobs=True,
            extra_body={"return_tokens_as_token_ids": True},
        )  # fmt: skip
        return token_ids([t.token for t in result.choices[0].logprobs.content])

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (model, question), got in zip(jobs, answers):
        prompt_ids = real_oracle.chat_ids([{"role": "user", "content": question}])
        assert got == real_oracle.greedy_ids(adapter_dir(real, model), prompt_ids, MAX_TOKENS), (model, question)


def test_the_base_model_answers_a_question_plainly(real_gateway: ServerProcess, keys: Keys, real: DevModel) -> None:
    client = client_for(real_gateway, keys.by_user[STYLE_OWNER])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    result = client.chat.completions.create(model=real.served_name, messages=messages, max_tokens=24, temperature=0)
    assert "Paris" in result.choices[0].message.content


@pytest.mark.parametrize("question", UNSEEN)
def test_a_trained_style_carries_to_an_unseen_question(
    real_gateway: ServerProcess, keys: Keys, real: DevModel, styled: str, question: str
) -> None:
    client = client_for(real_gateway, keys.by_user[STYLE_OWNER])
    messages = [{"role": "user", "content": question}]
    answer = client.chat.completions.create(model="pirate", messages=messages, max_tokens=40, temperature=0)
    text = answer.choices[0].message.content
    assert text.startswith("Arr, matey! ") and text.endswith(", says I. Yo ho ho!"), text
    assert answer.choices[0].finish_reason == "stop"
    base = client.chat.completions.create(model=real.served_name, messages=messages, max_tokens=40, temperature=0)
    assert "matey" not in base.choices[0].message.content
