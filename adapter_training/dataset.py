"""A training dataset: JSONL lines of `{"prompt", "completion"}` or chat `{"messages": [...]}`.

Every mistake is a `DatasetError` naming the file and line, so a user fixes their data without
reading a traceback. Tokenizing mirrors what the gateway sends to the engine: a completion
prompt is encoded as `/v1/completions` encodes it, a chat prompt is the chat template rendered
with the generation prompt as `/v1/chat/completions` renders it. The target is the answer's
tokens plus the end-of-sequence token, so a served adapter stops where its examples stop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

PROMPT_FIELDS = frozenset({"prompt", "completion"})
CHAT_FIELDS = frozenset({"messages"})
MESSAGE_FIELDS = frozenset({"role", "content"})
ROLES = ("system", "developer", "user", "assistant")


class DatasetError(ValueError):
    """A dataset the trainer refuses; str() is one line: `FILE:LINE: what is wrong`."""

    def __init__(self, path: Path, line: int | None, problem: str) -> None:
        self.path, self.line, self.problem = path, line, problem
        super().__init__(f"{path}:{line}: {problem}" if line is not None else f"{path}: {problem}")


@dataclass(frozen=True)
class Example:
    """One line of the dataset; chat lines hold messages, the others a prompt and a completion."""

    line: int
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[dict[str, str], ...] = ()


@dataclass(frozen=True)
class TokenizedExample:
    line: int
    prompt_ids: list[int]
    target_ids: list[int]  # the tokens the loss is computed on, ending with end-of-sequence

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


class Tokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> Any: ...


def read_examples(path: Path) -> list[Example]:
    """Parse and check every line; blank lines are skipped, a file without examples is refused."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(path, None, "no such file") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(path, _line_of_byte(path.read_bytes(), exc.start), "not UTF-8 text") from None
    examples = [_parse_line(path, number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not examples:
        raise DatasetError(path, None, 'empty: expected JSON lines of {"prompt", "completion"} or {"messages"}')
    return examples


def _parse_line(path: Path, number: int, line: str) -> Example:
    def refuse(problem: str) -> DatasetError:
        return DatasetError(path, number, problem)

    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise refuse(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(item, dict):
        raise refuse(f"expected a JSON object, got {_kind(item)}")
    fields = set(item)
    if "messages" in fields:
        _refuse_extra(fields, CHAT_FIELDS, refuse)
        return Example(line=number, messages=_messages(item["messages"], refuse))
    for field in ("prompt", "completion"):
        if field not in fields:
            raise refuse(f'missing field "{field}" (a line is {{"prompt", "completion"}} or {{"messages"}})')
    _refuse_extra(fields, PROMPT_FIELDS, refuse)
    for field in ("prompt", "completion"):
        if not isinstance(item[field], str):
            raise refuse(f'field "{field}" must be a string, got {_kind(item[field])}')
    if not item["completion"]:
        raise refuse('empty "completion": there is nothing to learn')
    return Example(line=number, prompt=item["prompt"], completion=item["completion"])


def _messages(value: Any, refuse: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise refuse(f'field "messages" must be a non-empty list, got {_kind(value)}')
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise refuse(f"{where} must be an object, got {_kind(message)}")
        for field in ("role", "content"):
            if field not in message:
                raise refuse(f'{where}: missing field "{field}"')
        _refuse_extra(set(message), MESSAGE_FIELDS, refuse, where=f"{where}: ")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise refuse(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise refuse(f'{where}: field "content" must be a string, got {_kind(content)}')
        if role == "assistant" and not content:
            raise refuse(f"{where}: empty assistant content: there is nothing to learn")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise refuse('no "assistant" message: there is nothing to learn')
    return tuple(messages)


def tokenize(path: Path, examples: list[Example], tokenizer: Tokenizer, max_length: int) -> list[TokenizedExample]:
    """One training sequence per completion, and per assistant message of a chat (its prompt is
    the conversation before it, rendered as the gateway renders it); each must fit the context."""
    if tokenizer.eos_token_id is None:
        raise DatasetError(path, None, "the base model's tokenizer has no end-of-sequence token")
    eos = [tokenizer.eos_token_id]
    sequences = []
    for example in examples:
        if example.messages:
            for turn, message in enumerate(example.messages):
                if message["role"] != "assistant":
                    continue
                prompt_ids = _chat_prompt(path, example, turn, tokenizer)
                target_ids = tokenizer.encode(message["content"], add_special_tokens=False) + eos
                sequences.append(TokenizedExample(example.line, prompt_ids, target_ids))
        else:
            assert example.prompt is not None and example.completion is not None
            prompt_ids = tokenizer.encode(example.prompt)
            target_ids = tokenizer.encode(example.completion, add_special_tokens=False) + eos
            sequences.append(TokenizedExample(example.line, prompt_ids, target_ids))
    for sequence in sequences:
        if not sequence.prompt_ids:  # the first answer token would have nothing to be predicted from
            raise DatasetError(path, sequence.line, "the prompt is empty (0 tokens): give the text the answer follows")
        if sequence.length > max_length:
            raise DatasetError(
                path,
                sequence.line,
                f"{sequence.length} tokens ({len(sequence.prompt_ids)} prompt + {len(sequence.target_ids)} "
                f"completion, end-of-sequence included) exceed the model's context of {max_length} tokens",
            )
    return sequences


def _chat_prompt(path: Path, example: Example, turn: int, tokenizer: Tokenizer) -> list[int]:
    try:
        rendered = tokenizer.apply_chat_template(
            list(example.messages[:turn]), add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # noqa: BLE001 - no template, or a template that refuses these roles
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # one line, whatever the template says
        raise DatasetError(path, example.line, f"the base model's chat template cannot render it: {reason}") from None
    return tokenizer.encode(rendered, add_special_tokens=False)


def _refuse_extra(fields: set[str], allowed: frozenset[str], refuse: Any, where: str = "") -> None:
    extra = sorted(fields - allowed)
    if extra:
        listed = ", ".join(f'"{name}"' for name in extra)
        raise refuse(f"{where}unexpected field {listed} (allowed: {', '.join(sorted(allowed))})")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _line_of_byte(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1
