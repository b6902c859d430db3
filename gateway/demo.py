"""`make demo`: train an adapter per user in the run, push both, serve them on real vLLM, and show
base / alice / bob answers to the same questions side by side.

Alice's adapter answers in UPPER CASE and Bob's signs every answer " -- Bob": styles a reader
sees at a glance. The base is a random tiny model, so what the adapters learn is their own
examples, word for word, and the style (not the facts) on questions they never saw.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.auth.keys import add_key
from gateway.dev.models import make_model
from gateway.dev.process import ServerProcess, free_port, gateway_command
from gateway.dev.tiny_model import BASE_MODEL_NAME

ADAPTER_NAME = "style"
SIGNATURE = " -- Bob"
# Question and plain answer; each user's dataset restyles the answers.
FACTS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What color is the sky?", "The sky is blue on a clear day."),
    ("What do bees make?", "Bees make honey."),
    ("Which planet is the largest?", "Jupiter is the largest planet."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("How many days are in a week?", "A week has seven days."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Where do penguins live?", "Penguins live in the south."),
    ("What do cows drink?", "Cows drink water."),
    ("How many hours are in a day?", "A day has twenty four hours."),
    ("What is frozen water called?", "Frozen water is called ice."),
]
SEEN_QUESTIONS = [FACTS[0][0], FACTS[3][0], FACTS[6][0]]
UNSEEN_QUESTION = "How many legs does a cat have?"
# About 10 s per adapter on a 2-core CPU: the tiny random base needs many passes over 12 examples.
TRAINING_FLAGS = ["--epochs", "200", "--lr", "5e-3", "--batch-size", "16", "--rank", "8", "--seed", "0"]


@dataclass(frozen=True)
class User:
    name: str

    def styled(self, answer: str) -> str:
        return answer.upper() if self.name == "alice" else answer + SIGNATURE

    def shows_style(self, text: str) -> bool:
        if self.name == "alice":
            return any(c.isalpha() for c in text) and text == text.upper()
        return text.rstrip().endswith(SIGNATURE.strip())

    @property
    def style(self) -> str:
        return "answers in UPPER CASE" if self.name == "alice" else f"signs every answer {SIGNATURE!r}"


USERS = [User("alice"), User("bob")]
CALLER_WIDTH = len(f"alice (alice: {BASE_MODEL_NAME})")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lora-gateway demo", description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--workdir", type=Path, help="keep the model, datasets, adapters and logs here")
    opts = parser.parse_args(argv)
    if opts.workdir is not None:
        opts.workdir.mkdir(parents=True, exist_ok=True)
        return _run(opts.workdir, opts.max_tokens)
    with tempfile.TemporaryDirectory(prefix="lora-gateway-demo-") as tmp:
        return _run(Path(tmp), opts.max_tokens)


def _run(work: Path, max_tokens: int) -> int:
    from adapters_manifest.cli import main as adapters_cli

    print("1. Building a tiny random Llama model (offline, seeded) ...", flush=True)
    tiny = make_model(work, [])

    print(f"2. Training one LoRA adapter per user on {len(FACTS)} chat examples each, then pushing it:", flush=True)
    training_started = time.monotonic()
    for user in USERS:
        data = work / f"{user.name}.jsonl"
        _write_dataset(data, user)
        argv = ["train", str(data), "--base", str(tiny.base), "--out", str(work / "adapters" / user.name)]
        argv += [*TRAINING_FLAGS, "--push", "--owner", user.name, "--name", ADAPTER_NAME, "--store", str(tiny.store)]
        argv += ["--base-model", BASE_MODEL_NAME, "--max-lora-rank", "8"]
        print(f"\n   {user.name} {user.style}, e.g. {json.loads(data.read_text().splitlines()[0])['messages'][1]}")
        print(f"   $ lora-gateway adapters {' '.join(argv)}", flush=True)
        if adapters_cli(argv) != 0:
            print(f"   training {user.name}'s adapter failed", file=sys.stderr)
            return 1
    print(f"   both trained and pushed in {time.monotonic() - training_started:.0f} s", flush=True)

    keys_file = work / "keys.yaml"  # no built-in credentials: a key per user, only hashes stored
    keys = {user.name: add_key(keys_file, user.name)[0] for user in USERS}
    port = free_port()
    engine = {"served_model_name": BASE_MODEL_NAME, "dtype": "float32", "max_lora_rank": 8}
    command = gateway_command(tiny.base, tiny.store, port, **engine, keys_file=keys_file)
    print(f"\n3. Starting the gateway on http://127.0.0.1:{port} (vLLM on the CPU; ~30 s) ...", flush=True)
    started = time.monotonic()
    with ServerProcess(command, port, work / "gateway.log") as server:
        print(f"   ready after {time.monotonic() - started:.0f} s", flush=True)
        print(f"4. The same questions, greedy decoding. Each user asks for model '{ADAPTER_NAME}' with their own key.")
        answers = {q: _ask_everyone(server, keys, q, max_tokens) for q in [*SEEN_QUESTIONS, UNSEEN_QUESTION]}
        exit_code = server.stop()
    print(f"\n5. Gateway stopped (exit code {exit_code}).")
    return 0 if _styles_visible(answers) and exit_code == 0 else 1


def _write_dataset(path: Path, user: User) -> None:
    lines = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": user.styled(a)}]}
        for q, a in FACTS
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _ask_everyone(server: ServerProcess, keys: dict[str, str], question: str, max_tokens: int) -> dict[str, str]:
    """The base model (asked by alice), then each user's own adapter; printed as one block."""
    import openai

    seen = "in the training data" if question in SEEN_QUESTIONS else "NOT in the training data"
    print(f"\n   {question!r}  ({seen})")
    callers = [("base", USERS[0].name, BASE_MODEL_NAME)] + [(u.name, u.name, ADAPTER_NAME) for u in USERS]
    answers = {}
    for label, user, model in callers:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=keys[user], max_retries=0, timeout=120)
        result = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0
        )
        answers[label] = result.choices[0].message.content or ""
        caller = f"{label} ({user}: {model})"
        print(f"     {caller:<{CALLER_WIDTH}} | {answers[label]!r}", flush=True)
    return answers


def _styles_visible(answers: dict[str, dict[str, str]]) -> bool:
    """Every seen question must show each user's style, and differ from the base; the unseen one
    is reported, not required: a random base gives the adapters no language to generalise from."""
    print("\n   Checks:")
    ok = True
    for question, by_label in answers.items():
        for user in USERS:
            text = by_label[user.name]
            visible = user.shows_style(text) and text != by_label["base"]
            if question in SEEN_QUESTIONS:
                expected = user.styled(dict(FACTS)[question])
                exact = text == expected
                ok &= visible and exact
                print(f"     {'ok ' if visible and exact else 'BAD'} {user.name} {user.style}: {question!r}")
            else:
                print(f"     {'ok ' if visible else '-- '} {user.name}'s style on an unseen question: {visible}")
    if not ok:
        print("   The adapters' styles are not visible: the demo failed.", file=sys.stderr)
    return ok
