"""`lora-gateway train`: bad datasets refused naming the line (exit 2, no traceback);
training lowers the loss, is reproducible with a seed, and writes an adapter the gateway accepts
that has learned its examples; `--push` publishes it like `adapters push`."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from adapter_training.cli import main as train_main
from adapter_training.dataset import read_examples, tokenize
from adapter_training.trainer import TrainingOptions, train_adapter
from adapters_manifest.local_store import LocalFolderStore
from adapters_manifest.validation import BaseModelSpec, validate_adapter_dir
from gateway_tools.dev.oracle import ReferenceModel
from gateway_tools.dev.tiny_model import build_base_model, build_tokenizer

CONTEXT = 2048  # the tiny model's max_position_embeddings
GOOD = {"prompt": "Q: What do bees make?\nA:", "completion": " HONEY."}
EXAMPLES = [
    {"prompt": "Q: What do bees make?\nA:", "completion": " BEES MAKE HONEY."},
    {"prompt": "Q: What color is the sky?\nA:", "completion": " THE SKY IS BLUE."},
    {"prompt": "Q: What do cows drink?\nA:", "completion": " COWS DRINK WATER."},
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Where do penguins live?"},
            {"role": "assistant", "content": "IN THE SOUTH."},
        ]
    },
]
# Enough passes for the tiny random base to learn four short answers word for word.
LEARN = TrainingOptions(epochs=120, lr=5e-3, batch_size=8, seed=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "base"
    path.mkdir()
    build_tokenizer(path)
    build_base_model(path)
    return path


@pytest.fixture(scope="module")
def trained(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[float]]:
    """(dataset, adapter folder, per-epoch losses) of one training run shared by several tests."""
    work = tmp_path_factory.mktemp("trained")
    data = write_jsonl(work / "data.jsonl", EXAMPLES)
    result = train_adapter(data, base, work / "adapter", LEARN, progress=False)
    return data, result.out, result.epoch_losses


def write_jsonl(path: Path, items: list[object]) -> Path:
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items))
    return path


def train_cli(data: Path, base: Path, out: Path, *flags: str) -> int:
    return train_main([str(data), "--base", str(base), "--out", str(out), "--quiet", *flags])


LONG_PROMPT = "word " * CONTEXT  # at least one token per word: beyond the context

BAD_DATASETS = [
    ("empty file", [], None, 'empty: expected JSON lines of {"prompt", "completion"} or {"messages"}'),
    ("only blank lines", ["", "   "], None, 'empty: expected JSON lines of {"prompt", "completion"} or {"messages"}'),
    ("malformed JSON", [GOOD, '{"prompt": "x", "completion": '], 2, "not valid JSON (Expecting value at column 31)"),
    ("not an object", [GOOD, GOOD, '["x", "y"]'], 3, "expected a JSON object, got a list"),
    (
        "missing completion",
        [GOOD, GOOD, {"prompt": "x"}],
        3,
        'missing field "completion" (a line is {"prompt", "completion"} or {"messages"})',
    ),
    (
        "missing prompt",
        [{"completion": "x"}],
        1,
        'missing field "prompt" (a line is {"prompt", "completion"} or {"messages"})',
    ),
    (
        "extra field",
        [GOOD, {**GOOD, "answer": "x"}],
        2,
        'unexpected field "answer" (allowed: completion, prompt)',
    ),
    ("prompt not a string", [{"prompt": 42, "completion": "x"}], 1, 'field "prompt" must be a string, got a number'),
    ("completion null", [{"prompt": "x", "completion": None}], 1, 'field "completion" must be a string, got null'),
    ("empty completion", [GOOD, {"prompt": "x", "completion": ""}], 2, 'empty "completion": there is nothing to learn'),
    (
        "empty prompt",
        [GOOD, GOOD, {"prompt": "", "completion": "x"}],
        3,
        "the prompt is empty (0 tokens): give the text the answer follows",
    ),
    ("messages not a list", [{"messages": "hi"}], 1, 'field "messages" must be a non-empty list, got a string'),
    ("message without role", [{"messages": [{"content": "hi"}]}], 1, 'messages[0]: missing field "role"'),
    (
        "unknown role",
        [{"messages": [{"role": "robot", "content": "hi"}]}],
        1,
        "messages[0]: role 'robot' is not one of system, developer, user, assistant",
    ),
    (
        "no assistant message",
        [GOOD, {"messages": [{"role": "user", "content": "hi"}]}],
        2,
        'no "assistant" message: there is nothing to learn',
    ),
    (
        "empty assistant message",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}],
        1,
        "messages[1]: empty assistant content: there is nothing to learn",
    ),
    (
        "messages with prompt",
        [{"messages": [{"role": "assistant", "content": "x"}], "prompt": "x"}],
        1,
        'unexpected field "prompt" (allowed: messages)',
    ),
]


@pytest.mark.parametrize(
    ("lines", "line", "problem"), [case[1:] for case in BAD_DATASETS], ids=[case[0] for case in BAD_DATASETS]
)
def test_a_bad_dataset_is_refused_naming_the_line(
    base: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    lines: list[object],
    line: int | None,
    problem: str,
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", lines)
    assert train_cli(data, base, tmp_path / "out") == 2
    where = f"{data}:{line}" if line is not None else f"{data}"
    assert capsys.readouterr().err == f"{where}: {problem}\n"  # one line, no traceback
    assert not (tmp_path / "out").exists()


def test_an_example_longer_than_the_context_is_refused_naming_the_line(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, {"prompt": LONG_PROMPT, "completion": " x"}])
    assert train_cli(data, base, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{data}:3: ") and err.count("\n") == 1, err
    assert err.endswith(f"exceed the model's context of {CONTEXT} tokens\n"), err


def test_a_missing_dataset_file_is_refused(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_cli(tmp_path / "nope.jsonl", base, tmp_path / "out") == 2
    assert capsys.readouterr().err == f"{tmp_path / 'nope.jsonl'}: no such file\n"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--target-modules", "attn"], "error: target module 'attn' is not a linear layer of the base (choose from: "),
        (["--target-modules", "lm_head"], "error: target module 'lm_head' is not a linear layer of the base"),
        (["--rank", "0"], "error: --rank must be at least 1, got 0"),
        (["--rank", "16", "--max-lora-rank", "8"], "error: --rank 16 exceeds --max-lora-rank 8"),
        (["--epochs", "0"], "error: --epochs must be at least 1, got 0"),
        (["--lr", "nan"], "error: --lr must be a positive number, got nan"),
        (["--push", "--owner", "alice"], "error: --push needs --owner and --name"),
        (["--push", "--owner", "Alice!", "--name", "x"], "error: invalid owner"),
    ],
)
def test_bad_options_are_refused_before_training(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD])
    assert train_cli(data, base, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_holding_other_files_is_refused(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert train_cli(data, base, tmp_path / "out") == 2
    assert "holds other files (notes.txt); use an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]


def test_training_lowers_the_loss(trained: tuple[Path, Path, list[float]]) -> None:
    _, _, losses = trained
    assert len(losses) == LEARN.epochs
    assert losses[-1] < 0.75 * losses[0], losses[:: LEARN.epochs // 6]


def test_the_adapter_passes_the_gateways_validation(trained: tuple[Path, Path, list[float]], base: Path) -> None:
    _, adapter, _ = trained
    summary = validate_adapter_dir(adapter, BaseModelSpec.from_model_dir(base, max_lora_rank=8))
    assert summary.rank == 8 and summary.alpha == 16.0
    every_linear = ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
    assert summary.target_modules == every_linear


def test_the_adapter_reproduces_its_examples_and_stops(trained: tuple[Path, Path, list[float]], base: Path) -> None:
    """transformers + PEFT greedy decoding (what the gateway's e2e tests compare vLLM against)."""
    _, adapter, _ = trained
    oracle = ReferenceModel(base)
    eos = oracle.tokenizer.eos_token_id
    for example in EXAMPLES:
        if "messages" in example:
            prompt_ids, answer = oracle.chat_ids(example["messages"][:-1]), example["messages"][-1]["content"]
        else:
            prompt_ids, answer = oracle.prompt_ids(example["prompt"]), example["completion"]
        expected = oracle.tokenizer.encode(answer, add_special_tokens=False) + [eos]
        assert oracle.greedy_ids(adapter, prompt_ids, len(expected) + 4) == expected
        assert oracle.greedy_ids(None, prompt_ids, len(expected)) != expected  # learned, not the base's own


def test_chat_lines_train_on_each_assistant_turn_with_the_gateways_prompt(base: Path, tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "HELLO."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "GOODBYE."},
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    oracle = ReferenceModel(base)
    sequences = tokenize(data, read_examples(data), oracle.tokenizer, CONTEXT)
    eos = oracle.tokenizer.eos_token_id
    assert [(s.line, s.prompt_ids, s.target_ids) for s in sequences] == [
        (1, oracle.chat_ids(messages[:2]), oracle.tokenizer.encode("HELLO.", add_special_tokens=False) + [eos]),
        (1, oracle.chat_ids(messages[:4]), oracle.tokenizer.encode("GOODBYE.", add_special_tokens=False) + [eos]),
    ]


def test_the_same_seed_gives_the_same_adapter_and_another_seed_another(base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", EXAMPLES[:2])
    weights = []
    for run, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = tmp_path / run
        train_adapter(data, base, out, TrainingOptions(epochs=3, lr=5e-3, seed=seed), progress=False)
        weights.append((out / "adapter_model.safetensors").read_bytes())
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]


def test_push_publishes_the_trained_adapter_to_the_store(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", EXAMPLES[:2])
    store_dir = tmp_path / "store"
    flags = ["--epochs", "2", "--rank", "4", "--target-modules", "q_proj", "v_proj", "--push", "--owner", "alice"]
    flags += ["--name", "caps", "--store", str(store_dir), "--description", "upper case", "--max-lora-rank", "8"]
    assert train_cli(data, base, tmp_path / "out", *flags) == 0
    out = capsys.readouterr().out
    assert f"trained {tmp_path / 'out'} on 2 examples" in out and "pushed alice/caps version " in out
    record = asyncio.run(LocalFolderStore(store_dir).get_record("alice", "caps"))
    assert record is not None
    assert (record.rank, record.target_modules, record.description) == (4, ["q_proj", "v_proj"], "upper case")
    assert record.base_model == base.name


def test_chat_lines_need_a_chat_template(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(base, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD, EXAMPLES[-1]])
    assert train_cli(data, bare, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{data}:2: the base model's chat template cannot render it: ") and err.count("\n") == 1


# Twelve short answers in a style the random base never writes: what a user's first dataset looks like.
TWELVE = [
    {"prompt": f"Q: {question}\nA:", "completion": f" {answer.upper()}"}
    for question, answer in [
        ("What is the capital of France?", "Paris."),
        ("How many legs does a spider have?", "Eight legs."),
        ("What color is the sky?", "Blue on a clear day."),
        ("What do bees make?", "Honey."),
        ("Which planet is the largest?", "Jupiter."),
        ("What is water made of?", "Hydrogen and oxygen."),
        ("How many days are in a week?", "Seven days."),
        ("What is the opposite of hot?", "Cold."),
        ("Where do penguins live?", "In the south."),
        ("What do cows drink?", "Water."),
        ("How many hours are in a day?", "Twenty four."),
        ("What is frozen water called?", "Ice."),
    ]
]


def test_with_no_options_twelve_examples_are_learned_word_for_word(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", TWELVE)
    assert train_cli(data, base, tmp_path / "out") == 0
    captured = capsys.readouterr()
    assert "100% of target tokens predicted" in captured.out and "loss " in captured.out
    assert "warning" not in captured.err
    oracle = ReferenceModel(base)
    eos = oracle.tokenizer.eos_token_id
    for row in TWELVE:
        expected = oracle.tokenizer.encode(row["completion"], add_special_tokens=False) + [eos]
        assert oracle.greedy_ids(tmp_path / "out", oracle.prompt_ids(row["prompt"]), len(expected) + 4) == expected


def test_too_short_a_training_is_named_with_the_option_to_change(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", TWELVE)
    assert train_cli(data, base, tmp_path / "out", "--epochs", "5") == 0  # the adapter is written all the same
    err = capsys.readouterr().err
    assert err.startswith("warning: the loss was still falling in the last epoch") and err.count("\n") == 1, err
    assert err.rstrip().endswith("the adapter has not converged; train longer with --epochs 10"), err


def test_a_learning_rate_that_stalls_training_is_named(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", TWELVE)
    assert train_cli(data, base, tmp_path / "out", "--epochs", "6", "--lr", "100") == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: the loss stalled at ") and err.count("\n") == 1, err
    assert err.rstrip().endswith("the adapter learned little; lower --lr"), err


def test_eval_reports_the_held_out_loss(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", TWELVE[:8])
    held_out = write_jsonl(tmp_path / "held-out.jsonl", TWELVE[8:])
    assert train_cli(data, base, tmp_path / "out", "--epochs", "3", "--eval", str(held_out)) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("held out"))
    loss = float(line.split("loss ")[1].split(",")[0])
    assert line == f"held out ({held_out}): loss {loss:.3f}, {line.split(', ')[1]}"
    assert 0 < loss < 20 and line.endswith("of target tokens predicted")


def test_a_bad_eval_file_is_refused_naming_its_line_before_training(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", TWELVE)
    held_out = write_jsonl(tmp_path / "held-out.jsonl", [GOOD, {"prompt": "x"}])
    assert train_cli(data, base, tmp_path / "out", "--eval", str(held_out)) == 2
    assert capsys.readouterr().err.startswith(f"{held_out}:2: missing field")
    assert not (tmp_path / "out").exists()
