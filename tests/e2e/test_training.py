"""From dataset to served adapter: `lora-gateway train --push` as a user runs it, then the gateway on
real vLLM answers a training example's prompt with that example's completion (greedy), and stops."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gateway_tools.dev.models import DevModel
from gateway_tools.dev.process import ServerProcess
from gateway_tools.dev.tiny_model import BASE_MODEL_NAME
from tests.e2e.conftest import Keys, client_for

pytestmark = pytest.mark.e2e

OWNER = "carol"  # a namespace the other tests on this gateway only read
PROMPT_EXAMPLES = [
    ("Q: What do bees make?\nA:", " BEES MAKE HONEY."),
    ("Q: What color is the sky?\nA:", " THE SKY IS BLUE."),
    ("Q: What do cows drink?\nA:", " COWS DRINK WATER."),
]
CHAT_EXAMPLES = [
    ("Where do penguins live?", "PENGUINS LIVE IN THE SOUTH."),
    ("What is frozen water called?", "FROZEN WATER IS CALLED ICE."),
]


@pytest.fixture(scope="module")
def trained(tiny: DevModel, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Train on completion and chat lines in one file and push it: the adapter's model name."""
    work = tmp_path_factory.mktemp("training")
    data = work / "caps.jsonl"
    lines = [{"prompt": p, "completion": c} for p, c in PROMPT_EXAMPLES]
    lines += [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in CHAT_EXAMPLES
    ]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    command = [sys.executable, "-m", "gateway", "train", str(data), "--base", str(tiny.base)]
    command += [
        "--out",
        str(work / "adapter"),
        "--epochs",
        "150",
        "--lr",
        "5e-3",
        "--seed",
        "0",
        "--max-lora-rank",
        "8",
    ]
    command += [
        "--push",
        "--owner",
        OWNER,
        "--name",
        "caps",
        "--store",
        str(tiny.store),
        "--base-model",
        BASE_MODEL_NAME,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"pushed {OWNER}/caps version " in done.stdout
    assert "training: 100%" in done.stderr  # the progress bar
    return f"{OWNER}/caps"


def test_the_trained_adapter_completes_a_training_prompt_with_its_completion(
    gateway: ServerProcess, keys: Keys, trained: str
) -> None:
    client = client_for(gateway, keys.by_user[OWNER])
    for prompt, completion in PROMPT_EXAMPLES:
        # The owner's bare name: found in the store by a direct look-up, no restart or sync wait.
        result = client.completions.create(model="caps", prompt=prompt, max_tokens=40, temperature=0)
        assert (result.choices[0].text, result.choices[0].finish_reason) == (completion, "stop")
        base = client.completions.create(model=BASE_MODEL_NAME, prompt=prompt, max_tokens=40, temperature=0)
        assert base.choices[0].text != completion  # learned, not the random base's own


def test_the_trained_adapter_answers_a_training_chat_with_its_answer(
    gateway: ServerProcess, keys: Keys, trained: str
) -> None:
    client = client_for(gateway, keys.by_user[OWNER])
    for question, answer in CHAT_EXAMPLES:
        messages = [{"role": "user", "content": question}]
        result = client.chat.completions.create(model=trained, messages=messages, max_tokens=40, temperature=0)
        assert (result.choices[0].message.content, result.choices[0].finish_reason) == (answer, "stop")


def test_only_its_owner_may_use_it(gateway: ServerProcess, keys: Keys, trained: str) -> None:
    import openai

    with pytest.raises(openai.NotFoundError):
        client_for(gateway, keys.by_user["bob"]).completions.create(model=trained, prompt="Q:", max_tokens=4)
