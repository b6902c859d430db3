"""The gateway against vLLM's own OpenAI server, request by request (issue 14, item 4).

vLLM's server is the oracle: started here on the same tiny model and adapter, it gets every case
in CASES, and so does the shared gateway (as alice, whose adapter is `alice/chat` on both). Each
case must get the same status class from both; a greedy one (temperature 0, or top_k 1) the same
output: text, finish and stop reasons, token counts, logprob token ids. Ids, timestamps, model
names and logprob values are not compared. Deliberate differences are in DIFFERENCES, not here.

Add a case: one line in CASES (`completion`, `chat`, `responses` or `post` build the body).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.settings import ServeSettings
from gateway_tools.dev.models import DevModel
from gateway_tools.dev.process import ServerProcess
from gateway_tools.dev.tiny_model import BASE_MODEL_NAME
from gateway_tools.dev.vllm_server import vllm_server
from tests.e2e.conftest import ENGINE, Keys, adapter_dir, start_gateway

pytestmark = pytest.mark.e2e

CALLER = "alice"
ADAPTER = "alice/chat"  # the caller's own adapter, served under this name by both servers
BASE = BASE_MODEL_NAME
PROMPT = "Hello world"  # greedy output differs between base and adapter, and is not all one token
MESSAGES = [{"role": "user", "content": "Hello world"}]
# The tiny tokenizer's special tokens (gateway_tools.dev.tiny_model.SPECIAL_TOKENS): </s> ends a sequence.
EOS, IM_START = 1, 3
PIPE = 96  # a token alice/chat writes greedily after PROMPT: "\x1bmamama|mamama"
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
SYSTEM_AND_DEVELOPER = [
    {"role": "system", "content": "Be brief."},
    {"role": "developer", "content": "In French."},
    *MESSAGES,
]
TEXT_PARTS = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world"}]}]
MULTI_TURN = [*MESSAGES, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Again"}]
PREFILLED = [*MESSAGES, {"role": "assistant", "content": "ma"}]  # for continue_final_message
NAMED_TOOL = {"type": "function", "function": {"name": "get_weather"}}
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
TOOL_ROUND_TRIP = [
    *MESSAGES,
    {"role": "assistant", "tool_calls": [TOOL_CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]
TIMEOUT_S = 300.0  # two engines on a shared two-core host: slow, never hung

OMIT = object()  # a field value meaning "leave the field out" (for missing-field cases)


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    body: dict[str, Any]
    stream: bool = False
    exact: bool = False  # deterministic output: compare it, not only the status class

    def request_body(self) -> dict[str, Any]:
        return {**self.body, "stream": True} if self.stream else self.body


def _fields(defaults: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    merged = {**defaults, **fields}
    return {k: v for k, v in merged.items() if v is not OMIT}


def _greedy(body: dict[str, Any]) -> bool:
    return body.get("temperature") == 0 or body.get("top_k") == 1


def completion(id: str, stream: bool = False, **fields: Any) -> Case:
    body = _fields({"model": ADAPTER, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}, fields)
    return Case(f"completions-{id}", "/v1/completions", body, stream, _greedy(body))


def chat(id: str, stream: bool = False, **fields: Any) -> Case:
    body = _fields({"model": ADAPTER, "messages": MESSAGES, "max_tokens": 6, "temperature": 0}, fields)
    return Case(f"chat-{id}", "/v1/chat/completions", body, stream, _greedy(body))


def responses(id: str, stream: bool = False, **fields: Any) -> Case:
    body = _fields({"model": ADAPTER, "input": PROMPT, "max_output_tokens": 6, "temperature": 0}, fields)
    return Case(f"responses-{id}", "/v1/responses", body, stream, _greedy(body))


def post(id: str, path: str, **fields: Any) -> Case:
    """Tokenizer endpoints: their answers are always deterministic."""
    return Case(id, path, _fields({"model": ADAPTER}, fields), exact=True)


STREAM_USAGE = {"stream_options": {"include_usage": True}}
AS_IDS = {"return_tokens_as_token_ids": True}  # logprob tokens as `token_id:N`: exact, even partial UTF-8

CASES = [
    completion("without-model", model=OMIT),  # as vLLM: the base model
    # -- /v1/completions: the basics, base and adapter, whole and streamed
    completion("base", model=BASE),
    completion("adapter"),
    completion("base-stream", stream=True, model=BASE, **STREAM_USAGE),
    completion("adapter-stream", stream=True, **STREAM_USAGE),
    completion("adapter-stream-without-usage", stream=True),
    completion("default-max-tokens", max_tokens=OMIT),
    completion("prompt-list", prompt=["Hello world", "def parse(value):"]),
    completion("prompt-list-stream", stream=True, prompt=["Hello world", "def parse(value):"], **STREAM_USAGE),
    completion("token-ids", prompt=[44, 73, 80, 341, 324, 274, 80, 72]),
    completion("token-id-lists", prompt=[[44, 73, 80], [341, 324, 274, 80, 72]]),
    completion("echo", echo=True),
    completion("echo-logprobs", echo=True, logprobs=1, **AS_IDS),
    # -- OpenAI's fields
    completion("logprobs", logprobs=3, **AS_IDS),  # vLLM's text_offset then counts the `token_id:N` labels
    completion("logprobs-stream", stream=True, logprobs=2, **AS_IDS, **STREAM_USAGE),
    completion("logprobs-as-text", logprobs=1),
    completion("n-2-seeded", n=2, temperature=1.0, seed=7),
    completion("n-2-seeded-stream", stream=True, n=2, temperature=1.0, seed=7, **STREAM_USAGE),
    completion("seed-and-user", temperature=0.8, top_p=0.9, seed=11, user="alice@example.com"),
    completion("logit-bias", logit_bias={str(PIPE): 100}),
    completion("penalties", frequency_penalty=1.5, presence_penalty=1.0),
    completion("stop-list", stop=["|", "zz"]),
    completion("stop-list-stream", stream=True, stop=["|", "zz"], **STREAM_USAGE),
    completion("response-format-text", response_format={"type": "text"}),
    completion("response-format-json-object", response_format={"type": "json_object"}),
    completion("response-format-json-schema", response_format=JSON_SCHEMA_FORMAT),
    # -- vLLM's extras
    completion("top-k-1", temperature=1.0, top_k=1),
    completion("top-k-min-p-seeded", temperature=1.0, top_k=20, min_p=0.05, seed=3),
    completion("repetition-penalty", repetition_penalty=1.5),
    completion("as-vllm-bench-sends", stream=True, repetition_penalty=1.0, ignore_eos=True, **STREAM_USAGE),
    completion("eos-first", logit_bias={str(EOS): 100}),
    completion("ignore-eos", logit_bias={str(EOS): 100}, ignore_eos=True, logprobs=0, **AS_IDS),
    completion("min-tokens", logit_bias={str(EOS): 100}, min_tokens=3),
    completion("stop-token-ids", stop_token_ids=[PIPE]),
    completion("include-stop-str", stop=["|"], include_stop_str_in_output=True),
    completion("special-tokens-skipped", logit_bias={str(IM_START): 100}),
    completion("special-tokens-shown", logit_bias={str(IM_START): 100}, skip_special_tokens=False),
    completion("structured-json", max_tokens=8, structured_outputs={"json": SCHEMA}),
    completion("structured-regex", structured_outputs={"regex": "[a-c]{3}x"}),
    completion("structured-choice", structured_outputs={"choice": ["yes", "no", "maybe"]}),
    completion("structured-choice-stream", stream=True, structured_outputs={"choice": ["yes", "no"]}),
    completion("prompt-logprobs", prompt_logprobs=2),
    completion("allowed-token-ids", allowed_token_ids=[70, 71, 72]),
    completion("bad-words", bad_words=["ma"]),
    completion("truncate-prompt-tokens", truncate_prompt_tokens=4),
    # -- errors
    completion("unknown-model", model="alice/missing"),
    completion("missing-prompt", prompt=OMIT),
    completion("empty-prompt", prompt=""),
    completion("prompt-wrong-type", prompt={"text": "hi"}),
    completion("temperature-wrong-type", temperature="hot"),
    completion("negative-max-tokens", max_tokens=-1),
    completion("top-p-out-of-range", top_p=1.5),
    completion("too-many-logprobs", logprobs=21),
    completion("n-2-greedy", n=2),  # vLLM: greedy sampling cannot give n different choices
    completion("token-id-out-of-vocab", prompt=[99999]),
    completion("negative-token-id", prompt=[-1]),
    completion("stream-options-without-stream", **STREAM_USAGE),
    completion("bad-logit-bias-key", logit_bias={"abc": 5}),
    completion("repetition-penalty-zero", repetition_penalty=0),
    completion("min-p-out-of-range", min_p=2),
    completion("invalid-regex", structured_outputs={"regex": "("}),
    completion("context-too-long", prompt="Hello world " * 2000),
    completion("max-tokens-past-context", max_tokens=100_000),
    completion("suffix", suffix="return value"),  # vLLM: only for models with FIM rendering
    # -- /v1/chat/completions: the basics
    chat("base", model=BASE),
    chat("adapter"),
    chat("base-stream", stream=True, model=BASE, **STREAM_USAGE),
    chat("adapter-stream", stream=True, **STREAM_USAGE),
    chat("system-and-developer", messages=SYSTEM_AND_DEVELOPER),
    chat("content-parts", messages=TEXT_PARTS),
    chat("multi-turn", messages=MULTI_TURN),
    chat("custom-role", messages=[{"role": "ipython", "content": "42"}, *MESSAGES]),
    chat("max-completion-tokens", max_tokens=OMIT, max_completion_tokens=4),
    chat("logprobs", logprobs=True, top_logprobs=3, **AS_IDS),
    chat("logprobs-stream", stream=True, logprobs=True, top_logprobs=2, **AS_IDS, **STREAM_USAGE),
    chat("n-2-seeded", n=2, temperature=1.0, seed=5),
    chat("seed-and-user", temperature=0.7, seed=5, user="alice@example.com"),
    chat("stop", stop=["ma", "zz"]),
    chat("logit-bias", logit_bias={str(PIPE): 100}),
    chat("penalties", frequency_penalty=1.0, presence_penalty=0.5),
    chat("response-format-text", response_format={"type": "text"}),
    chat("response-format-json-object", max_tokens=8, response_format={"type": "json_object"}),
    chat("response-format-json-schema", max_tokens=8, response_format=JSON_SCHEMA_FORMAT),
    chat("response-format-json-schema-stream", stream=True, max_tokens=8, response_format=JSON_SCHEMA_FORMAT),
    chat("tool-choice-none", tools=TOOLS, tool_choice="none"),
    # -- vLLM's extras
    chat("top-k-1", temperature=1.0, top_k=1),
    chat("min-p-repetition-penalty", temperature=1.0, min_p=0.1, repetition_penalty=1.2, seed=1),
    chat("ignore-eos-min-tokens", logit_bias={str(EOS): 100}, ignore_eos=True, min_tokens=2),
    chat("stop-token-ids-include-stop-str", stop=["ma"], include_stop_str_in_output=True, stop_token_ids=[EOS]),
    chat("special-tokens-shown", logit_bias={str(IM_START): 100}, skip_special_tokens=False),
    chat("structured-choice", structured_outputs={"choice": ["yes", "no"]}),
    chat("structured-regex-stream", stream=True, structured_outputs={"regex": "[0-9]{4}"}, **STREAM_USAGE),
    chat("chat-template-kwargs", chat_template_kwargs={"enable_thinking": False}),
    chat("continue-final-message", messages=PREFILLED, add_generation_prompt=False, continue_final_message=True),
    chat("prompt-logprobs", prompt_logprobs=1),
    # -- errors
    chat("unknown-model", model="alice/missing"),
    chat("missing-messages", messages=OMIT),
    chat("empty-messages", messages=[]),
    chat("message-without-role", messages=[{"content": "Hello"}]),
    chat("content-wrong-type", messages=[{"role": "user", "content": 5}]),
    chat("top-logprobs-out-of-range", logprobs=True, top_logprobs=50),
    chat("negative-temperature", temperature=-1),
    chat("bad-response-format-type", response_format={"type": "yaml"}),
    chat("tool-choice-auto-without-parser", tools=TOOLS, tool_choice="auto"),
    chat("context-too-long", messages=[{"role": "user", "content": "Hello world " * 2000}]),
    chat("stream-options-without-stream", **STREAM_USAGE),
    # -- /v1/responses
    responses("base", model=BASE),
    responses("adapter"),
    responses("adapter-stream", stream=True),
    responses("instructions", instructions="Be brief."),
    responses("message-input", input=MESSAGES),
    responses("unknown-model", model="alice/missing"),
    responses("missing-input", input=OMIT),
    # -- /tokenize and /detokenize with the adapter as `model`
    post("tokenize-prompt", "/tokenize", prompt=PROMPT),
    post("tokenize-without-special-tokens", "/tokenize", prompt=PROMPT, add_special_tokens=False),
    post("tokenize-token-strs", "/tokenize", prompt=PROMPT, return_token_strs=True),
    post("tokenize-messages", "/tokenize", messages=MESSAGES),
    post("tokenize-base", "/tokenize", model=BASE, prompt=PROMPT),
    post("tokenize-unknown-model", "/tokenize", model="alice/missing", prompt=PROMPT),
    post("detokenize", "/detokenize", tokens=[44, 73, 80, 341, IM_START, 100]),
    post("detokenize-unknown-model", "/detokenize", model="alice/missing", tokens=[44]),
    post("detokenize-wrong-type", "/detokenize", tokens="44"),
]

# Needs vLLM's tool-call parser (`pythonic`: the tiny tokenizer has no tool-call special tokens,
# which the hermes and llama3_json parsers require).
TOOL_PARSER_FLAGS = {"enable_auto_tool_choice": True, "tool_call_parser": "pythonic"}
TOOL_CASES = [
    chat("tools-auto", tools=TOOLS, tool_choice="auto"),
    chat("tools-auto-stream", stream=True, tools=TOOLS, tool_choice="auto", **STREAM_USAGE),
    chat("tools-named", max_tokens=12, tools=TOOLS, tool_choice=NAMED_TOOL),
    chat("tools-named-stream", stream=True, max_tokens=12, tools=TOOLS, tool_choice=NAMED_TOOL),
    chat("tools-required", max_tokens=16, tools=TOOLS, tool_choice="required", parallel_tool_calls=False),
    chat("tools-tool-message", tools=TOOLS, messages=TOOL_ROUND_TRIP),
    chat("tools-unknown-named-tool", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
]
GATEWAY_HAS_TOOL_FLAGS = all(name in ServeSettings.model_fields for name in TOOL_PARSER_FLAGS)


@dataclass(frozen=True)
class Difference:
    """A request the gateway answers differently on purpose: 400 naming `param`, where vLLM says 200."""

    case: Case
    param: str
    reason: str


DIFFERENCES = [
    Difference(
        completion("best-of", best_of=1, n=1),
        "best_of",
        "vLLM 0.32 dropped best_of and ignores it (an unknown field): the gateway says so",
    ),
    Difference(
        completion("unknown-field", frobnicate=1),
        "frobnicate",
        "vLLM logs and ignores unknown fields; the gateway refuses them as OpenAI does, so a typo is not silent",
    ),
    Difference(
        chat("removed-guided-json", guided_json=SCHEMA),
        "guided_json",
        "vLLM 0.32 ignores the removed guided_* fields, so output is silently unconstrained",
    ),
]


# -- sending and reading ------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any  # the JSON body; for a 2xx stream, the list of its events' JSON data
    done: bool = False  # a stream ended with `data: [DONE]`

    def error(self) -> str:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return str(self.body["error"].get("message"))[:160]
        return json.dumps(self.body)[:160]


def send(client: httpx.Client, case: Case) -> Answer:
    body = case.request_body()
    if not case.stream:
        response = client.post(case.path, json=body)
        return Answer(response.status_code, _json_or_text(response.text))
    with client.stream("POST", case.path, json=body) as response:
        if response.status_code >= 300:
            return Answer(response.status_code, _json_or_text(response.read().decode()))
        events, done = [], False
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, and the Responses API's `event:` lines (the data names its type)
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                done = True
            else:
                events.append(json.loads(data))
        return Answer(response.status_code, events, done)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def status_class(status: int) -> str:
    return f"{status // 100}xx"


# -- what must match ------------------------------------------------------------------------


def essence(case: Case, answer: Answer) -> dict[str, Any]:
    """What a client sees of a successful answer, without ids, timestamps, model names or float values;
    for non-exact cases only its shape (how many choices, prompt token counts)."""
    if case.path == "/v1/completions":
        whole = _completion_from_stream(answer) if case.stream else answer.body
        choices = [_completion_choice(c) for c in sorted(whole["choices"], key=lambda c: c["index"])]
    elif case.path == "/v1/chat/completions":
        whole = _chat_from_stream(answer) if case.stream else answer.body
        choices = [_chat_choice(c) for c in sorted(whole["choices"], key=lambda c: c["index"])]
    elif case.path == "/v1/responses":
        return _response_essence(case, answer)
    else:  # tokenizer endpoints: the whole answer
        return answer.body
    usage = whole.get("usage")
    result: dict[str, Any] = {
        "choices": choices if case.exact else len(choices),
        "usage": _usage(usage, case.exact),
        "prompt_logprobs": _prompt_logprobs(whole.get("prompt_logprobs")),
    }
    if case.stream:
        result["done"] = answer.done
    return result


def _usage(usage: dict[str, Any] | None, exact: bool) -> dict[str, Any] | None:
    if usage is None:
        return None
    keys = ("prompt_tokens", "completion_tokens", "total_tokens") if exact else ("prompt_tokens",)
    return {k: usage.get(k) for k in keys}


def _prompt_logprobs(positions: list[dict[str, Any] | None] | None) -> list[list[str] | None] | None:
    """The token ids ranked at each prompt position (the first has none)."""
    if positions is None:
        return None
    return [None if p is None else sorted(p) for p in positions]


def _completion_choice(choice: dict[str, Any]) -> dict[str, Any]:
    logprobs = choice.get("logprobs")
    return {
        "text": choice.get("text"),
        "finish_reason": choice.get("finish_reason"),
        "stop_reason": choice.get("stop_reason"),
        "logprobs": None
        if logprobs is None
        else {
            "tokens": logprobs.get("tokens"),
            "text_offset": logprobs.get("text_offset"),
            "top_logprobs": [None if t is None else sorted(t) for t in logprobs.get("top_logprobs") or []],
        },
        "prompt_logprobs": _prompt_logprobs(choice.get("prompt_logprobs")),
    }


def _chat_choice(choice: dict[str, Any]) -> dict[str, Any]:
    message = choice.get("message") or {}
    logprobs = choice.get("logprobs")
    return {
        "role": message.get("role"),
        "content": message.get("content"),
        "reasoning": message.get("reasoning"),
        "tool_calls": [
            (call.get("type"), call["function"].get("name"), call["function"].get("arguments"))
            for call in message.get("tool_calls") or []
        ],
        "finish_reason": choice.get("finish_reason"),
        "stop_reason": choice.get("stop_reason"),
        "logprobs": None
        if logprobs is None
        else [
            (t["token"], sorted(alt["token"] for alt in t.get("top_logprobs") or []))
            for t in logprobs.get("content") or []
        ],
    }


def _completion_from_stream(answer: Answer) -> dict[str, Any]:
    """A streamed completion put together as the whole answer would be."""
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for event in answer.body:
        usage = event.get("usage") or usage
        for delta in event.get("choices") or []:
            choice = choices.setdefault(delta["index"], {"index": delta["index"], "text": "", "logprobs": None})
            choice["text"] += delta.get("text") or ""
            for key in ("finish_reason", "stop_reason", "prompt_logprobs"):
                if delta.get(key) is not None:
                    choice[key] = delta[key]
            if delta.get("logprobs"):
                merged = choice["logprobs"] = choice["logprobs"] or {
                    "tokens": [],
                    "text_offset": [],
                    "top_logprobs": [],
                }
                for key in merged:
                    merged[key] += delta["logprobs"].get(key) or []
    return {"choices": list(choices.values()), "usage": usage}


def _chat_from_stream(answer: Answer) -> dict[str, Any]:
    """A streamed chat completion put together as the whole answer would be."""
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for event in answer.body:
        usage = event.get("usage") or usage
        for chunk in event.get("choices") or []:
            choice = choices.setdefault(
                chunk["index"], {"index": chunk["index"], "message": {}, "calls": {}, "logprobs": None}
            )
            delta, message = chunk.get("delta") or {}, choice["message"]
            if delta.get("role"):
                message["role"] = delta["role"]
            for key in ("content", "reasoning"):
                if delta.get(key) is not None:
                    message[key] = (message.get(key) or "") + delta[key]
            for call in delta.get("tool_calls") or []:
                into = choice["calls"].setdefault(call["index"], {"type": None, "function": {"arguments": ""}})
                into["type"] = call.get("type") or into["type"]
                function = call.get("function") or {}
                if function.get("name"):
                    into["function"]["name"] = function["name"]
                into["function"]["arguments"] += function.get("arguments") or ""
            for key in ("finish_reason", "stop_reason"):
                if chunk.get(key) is not None:
                    choice[key] = chunk[key]
            if chunk.get("logprobs"):
                choice["logprobs"] = choice["logprobs"] or {"content": []}
                choice["logprobs"]["content"] += chunk["logprobs"].get("content") or []
    for choice in choices.values():
        calls = choice.pop("calls")
        choice["message"]["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {"choices": list(choices.values()), "usage": usage}


def _response_essence(case: Case, answer: Answer) -> dict[str, Any]:
    if case.stream:
        events = answer.body
        completed = next(e["response"] for e in events if e.get("type") == "response.completed")
        streamed = "".join(e["delta"] for e in events if e.get("type") == "response.output_text.delta")
        assert streamed == _response_text(completed), "the deltas add up to the completed response's text"
    else:
        completed = answer.body
    usage = completed.get("usage") or {}
    return {
        "status": completed.get("status"),
        "incomplete_details": completed.get("incomplete_details"),
        "output_types": [item.get("type") for item in completed.get("output") or []],
        "text": _response_text(completed) if case.exact else None,
        "usage": {k: usage.get(k) for k in ("input_tokens", "output_tokens", "total_tokens")},
    }


def _response_text(response: dict[str, Any]) -> str:
    return "".join(
        part.get("text") or ""
        for item in response.get("output") or []
        if item.get("type") == "message"
        for part in item.get("content") or []
        if part.get("type") == "output_text"
    )


# -- servers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    vllm: httpx.Client
    gateway: httpx.Client


def _client(server: ServerProcess, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.base_url, headers=headers, timeout=TIMEOUT_S)


def _vllm(tiny: DevModel, logs: Path, extra_args: tuple[str, ...] = ()) -> ServerProcess:
    files = adapter_dir(tiny, ADAPTER)
    assert files is not None
    server = vllm_server(
        tiny.base, tiny.served_name, {ADAPTER: files}, logs / "vllm.log", max_loras=4, max_cpu_loras=8,
        extra_args=extra_args, **ENGINE,
    )  # fmt: skip
    return server.start()


@pytest.fixture(scope="module")
def pair(
    tiny: DevModel, gateway: ServerProcess, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    """vLLM's server with the engine settings of the shared gateway (dtype, LoRA slots and rank)."""
    server = _vllm(tiny, tmp_path_factory.mktemp("vllm"))
    try:
        with _client(server) as oracle, _client(gateway, keys.by_user[CALLER]) as ours:
            yield Pair(oracle, ours)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tool_pair(tiny: DevModel, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """Both servers with a tool-call parser: a gateway of its own, since its flags are per process."""
    logs = tmp_path_factory.mktemp("tools")
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in TOOL_PARSER_FLAGS.items()]
    server = _vllm(tiny, logs, tuple(flags))
    ours = None
    try:
        ours = start_gateway(tiny, keys, logs, max_loras=4, max_cpu_loras=8, **TOOL_PARSER_FLAGS)
        with _client(server) as oracle, _client(ours, keys.by_user[CALLER]) as client:
            yield Pair(oracle, client)
    finally:
        if ours is not None:
            ours.stop()
        server.stop()


# -- the tests ----------------------------------------------------------------------------


def assert_same_answer(pair: Pair, case: Case) -> None:
    expected, got = send(pair.vllm, case), send(pair.gateway, case)
    assert status_class(got.status) == status_class(expected.status), (
        f"gateway {got.status} {got.error()!r}; vLLM {expected.status}"
        + (f" {expected.error()!r}" if expected.status >= 300 else "")
    )
    if got.status >= 300:
        # Errors in OpenAI's shape, whatever the message says.
        assert isinstance(got.body, dict) and isinstance(got.body.get("error", {}).get("message"), str), got.body
    else:
        ours, theirs = essence(case, got), essence(case, expected)
        assert ours == theirs, "gateway vs vLLM: " + "; ".join(differences(ours, theirs))


def differences(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Where two essences differ, leaf by leaf: `choices[0].stop_reason: None vs '|'`."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        keys = [*ours, *(k for k in theirs if k not in ours)]
        return [d for k in keys for d in differences(ours.get(k), theirs.get(k), f"{path}.{k}" if path else k)]
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [d for i, (a, b) in enumerate(zip(ours, theirs)) for d in differences(a, b, f"{path}[{i}]")]
    return [] if ours == theirs else [f"{path}: {ours!r:.80} vs {theirs!r:.80}"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gateway_answers_like_vllm(pair: Pair, case: Case) -> None:
    assert_same_answer(pair, case)


@pytest.mark.skipif(not GATEWAY_HAS_TOOL_FLAGS, reason="gateway flags pending")
@pytest.mark.parametrize("case", TOOL_CASES, ids=lambda c: c.id)
def test_gateway_calls_tools_like_vllm(tool_pair: Pair, case: Case) -> None:
    assert_same_answer(tool_pair, case)


@pytest.mark.parametrize("difference", DIFFERENCES, ids=lambda d: d.case.id)
def test_deliberate_differences(pair: Pair, difference: Difference) -> None:
    # Still a difference: should vLLM start refusing it too, the case belongs in CASES.
    assert send(pair.vllm, difference.case).status == 200
    got = send(pair.gateway, difference.case)
    assert got.status == 400, got.body
    assert difference.param in got.error(), got.body


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in [*CASES, *TOOL_CASES, *(d.case for d in DIFFERENCES)]]
    assert len(ids) == len(set(ids))


# -- what only the gateway has: tenants --------------------------------------------------


def _not_found_shape(answer: Answer, name: str) -> Any:
    """The error with the asked-for name blanked out: what tells two 404s apart."""
    return json.loads(json.dumps(answer.body).replace(name, "NAME"))


@pytest.mark.parametrize(
    "path",
    ["/v1/models/{model}", "/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize"],
)
def test_another_users_adapter_is_indistinguishable_from_a_missing_one(pair: Pair, path: str) -> None:
    def ask(model: str) -> Answer:
        if path.startswith("/v1/models/"):
            response = pair.gateway.get(path.format(model=model))
            return Answer(response.status_code, _json_or_text(response.text))
        body = {
            "/v1/completions": {"prompt": PROMPT, "max_tokens": 2},
            "/v1/chat/completions": {"messages": MESSAGES, "max_tokens": 2},
            "/v1/responses": {"input": PROMPT, "max_output_tokens": 2},
            "/tokenize": {"prompt": PROMPT},
        }[path]
        return send(pair.gateway, Case("tenant", path, {"model": model, **body}))

    own = ask(ADAPTER)  # the endpoint serves the caller's own adapter: its 404s below are about the model
    assert own.status == 200, own.body
    others, missing = ask("bob/chat"), ask("bob/missing")
    assert (others.status, missing.status) == (404, 404), (others.body, missing.body)
    assert isinstance(others.body, dict) and "error" in others.body, others.body  # OpenAI's shape, not a bare 404
    assert _not_found_shape(others, "bob/chat") == _not_found_shape(missing, "bob/missing")


@pytest.mark.parametrize("model", [ADAPTER, BASE])
def test_a_visible_model_is_shown_by_id(pair: Pair, model: str) -> None:
    response = pair.gateway.get(f"/v1/models/{model}")
    assert response.status_code == 200, response.text
    listed = next(m for m in pair.gateway.get("/v1/models").json()["data"] if m["id"] == model)
    assert response.json() == listed
