"""Test doubles: a deterministic in-process engine, and tiny adapters and base models on disk.

`FakeEngine` implements gateway.engine.interface.Engine without vLLM's engine: its `client` is a
fake vLLM engine client under vLLM's real OpenAI layer (real protocol, tokenizer and chat template:
the tiny model's, config only). What it generates is a pure function of (adapter, prompt, choice,
step), so a test can tell which adapter produced a response and compute the exact expected text
with `expected_text` from the prompt's token ids (`FakeEngine.prompt_ids`). It is no second vLLM:
every choice runs to `max_tokens` ("length"), or to `stops_after` tokens ("stop") when a test sets
it; stop strings, stop tokens and EOS are vLLM's engine's rules, which the gateway passes on
(`generate_calls` records the sampling params) and tests/e2e/test_api_parity.py checks on the real
engine. It also checks the guarantees the gateway owes the real engine (never more adapters
resident than vLLM's `max_cpu_loras`, never generate with an unregistered adapter, never add twice)
and records every violation in `violations` instead of only raising, so that a violation swallowed
by the code under test still fails the test (`check()`).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import re
import tempfile
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from adapters_manifest.publish import publish, record_for
from adapters_manifest.record import ADAPTER_FILES, AdapterFile, AdapterRecord, content_version
from adapters_manifest.store import AdapterStore
from gateway.engine.interface import AdapterLoadError, EngineAdapter, EngineDeadError
from gateway.settings import ServeSettings
from gateway_tools.dev import tiny_model

NO_ADAPTER = "<no-adapter>"  # the label of generations without any adapter
FAKE_TOKEN_ID_BASE = 100  # ids of generated tokens: 100 + 50 * choice + step (inside the tiny vocabulary)


def adapter_label(adapter: EngineAdapter | None) -> str:
    return NO_ADAPTER if adapter is None else adapter.engine_name


def prompt_digest(prompt_token_ids: list[int]) -> str:
    return f"{zlib.crc32(','.join(map(str, prompt_token_ids)).encode()):08x}"


def token_text(label: str, prompt_token_ids: list[int], choice: int, step: int) -> str:
    """The text of generated token `step` of choice `choice`: names the adapter and the prompt."""
    return f"<{label}|{prompt_digest(prompt_token_ids)}|{choice}.{step}>"


def expected_text(label: str, prompt_token_ids: list[int], choice: int, tokens: int) -> str:
    """What the fake generates in `tokens` steps."""
    return "".join(token_text(label, prompt_token_ids, choice, step) for step in range(tokens))


@functools.cache
def tokenizer_model_dir() -> Path:
    """The tiny model's tokenizer, chat template and config (no weights), once per test process: what
    vLLM's OpenAI layer needs to serve on the fake engine."""
    from transformers import LlamaConfig

    folder = Path(tempfile.mkdtemp(prefix="fake-engine-model-"))
    tiny_model.build_tokenizer(folder)
    LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1 << 21,  # any context a test asks for fits
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    ).save_pretrained(folder)
    return folder


def fake_token_id(choice: int, step: int) -> int:
    return FAKE_TOKEN_ID_BASE + 50 * choice + step % 50


@dataclass(frozen=True)
class GenerateCall:
    request_id: str
    prompt_token_ids: list[int]
    params: Any  # vLLM's SamplingParams
    adapter: EngineAdapter | None
    trace_headers: dict[str, str]
    cache_salt: str | None = None  # the prefix-cache salt of the engine input


@dataclass(frozen=True)
class AdapterEvent:
    kind: str  # "add" or "remove"
    engine_name: str
    engine_id: int
    resident_after: frozenset[str]  # engine names resident once the call returned


@dataclass
class FakeEngine:
    """A deterministic Engine; see the module docstring."""

    max_model_len: int = 256
    capacity: int | None = None  # user adapters the engine holds (vLLM's max_cpu_loras) ...
    extra: int = 0  # ... plus the gateway's own (the base zero adapter)
    # As vLLM's CPU build without the grouped LoRA ops: base requests need the zero adapter.
    base_via_zero_adapter: bool = True
    base_requests: str = "through an all-zero adapter (fake engine)"
    add_delay_s: float = 0.0
    remove_delay_s: float = 0.0  # vLLM's remove_lora is a round trip to the engine core too
    token_delay_s: float = 0.0
    # When set, every choice ends after this many tokens with finish_reason "stop", as a real engine's
    # does on a stop string, a stop token or EOS (which of them: vLLM's business, not the fake's).
    stops_after: int | None = None
    # Adapter ref ("owner/name") or engine name ("owner/name@version") -> why loading fails.
    fail_loads: dict[str, str] = field(default_factory=dict)
    # When set, add_adapter waits for it (lets a test hold a load in flight).
    add_gate: asyncio.Event | None = None
    alive: bool = True

    resident: dict[int, EngineAdapter] = field(default_factory=dict, init=False)
    events: list[AdapterEvent] = field(default_factory=list, init=False)
    add_calls: list[str] = field(default_factory=list, init=False)  # engine names, failed ones too
    generate_calls: list[GenerateCall] = field(default_factory=list, init=False)
    active_generations: int = field(default=0, init=False)
    aborted: list[str] = field(default_factory=list, init=False)  # request ids closed before the end
    peak_resident: int = field(default=0, init=False)
    violations: list[str] = field(default_factory=list, init=False)
    shut_down: bool = field(default=False, init=False)
    client: FakeEngineClient = field(init=False)
    frontend_args: argparse.Namespace = field(init=False)

    def started_with(self, settings: ServeSettings) -> FakeEngine:
        """The engine factory: as vLLM's, sized by the settings, with a slot for the zero adapter;
        vLLM's OpenAI layer configured from the same settings, on the tiny tokenizer."""
        from gateway.engine.vllm_engine import build_engine_args, vllm_args

        self.capacity, self.extra = settings.max_cpu_loras, int(self.base_via_zero_adapter)
        on_tokenizer = settings.model_copy(
            update={"model": tokenizer_model_dir(), "max_model_len": settings.max_model_len or self.max_model_len}
        )
        self.frontend_args = vllm_args(on_tokenizer, "float32", self.extra)
        self.client = FakeEngineClient(self, build_engine_args(self.frontend_args).create_engine_config())
        return self

    def prompt_ids(self, text: str) -> list[int]:
        """A completion prompt's token ids, as vLLM's layer tokenizes it."""
        return list(self.client.renderer.get_tokenizer().encode(text))

    # -- checks ----------------------------------------------------------------------

    @property
    def limit(self) -> int | None:
        return None if self.capacity is None else self.capacity + self.extra

    def _violate(self, what: str) -> None:
        self.violations.append(what)
        raise AssertionError(what)

    def check(self) -> None:
        """Fail if the gateway ever broke a guarantee it owes the engine."""
        assert self.violations == [], self.violations

    def resident_names(self) -> set[str]:
        return {a.engine_name for a in self.resident.values()}

    def adds_of(self, ref: str) -> int:
        """add_adapter calls (successful or not) for an adapter ref or engine name."""
        return sum(1 for name in self.add_calls if name == ref or name.partition("@")[0] == ref)

    # -- generation (through FakeEngineClient) ------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: Any,
        lora: Any,
        trace_headers: Mapping[str, str],
        cache_salt: str | None = None,
    ) -> AsyncIterator[Any]:
        from vllm.logprobs import Logprob
        from vllm.outputs import CompletionOutput, RequestOutput
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        adapter = None if lora is None else self.resident.get(lora.lora_int_id)
        self.generate_calls.append(
            GenerateCall(request_id, list(prompt_token_ids), params, adapter, dict(trace_headers), cache_salt)
        )
        if not self.alive:
            raise VllmEngineDeadError("the fake engine is dead")
        if lora is not None and (adapter is None or adapter.engine_name != lora.lora_name):
            self._violate(f"generate with {lora.lora_name} (id {lora.lora_int_id}), which is not registered")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            self._violate(f"prompt of {len(prompt_token_ids)} + {params.max_tokens} tokens exceeds the context")

        label = adapter_label(adapter)
        n, delta = params.n, params.output_kind == RequestOutputKind.DELTA
        texts, token_ids = [""] * n, [[] for _ in range(n)]
        logprobs: list[list[dict[int, Logprob]]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        self.active_generations += 1
        completed = False

        def output(index: int, since_text: int, since_tokens: int) -> CompletionOutput:
            ids = token_ids[index][since_tokens:]
            return CompletionOutput(
                index=index,
                text=texts[index][since_text:],
                token_ids=ids,
                cumulative_logprob=None,
                logprobs=logprobs[index][since_tokens:] if params.logprobs is not None else None,
                finish_reason=finish[index],
            )

        try:
            for step in range(params.max_tokens):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                if not self.alive:
                    raise VllmEngineDeadError("the fake engine died while generating")
                outputs = []
                for index in range(n):
                    if finish[index] is not None:
                        continue
                    before = (len(texts[index]), len(token_ids[index]))
                    self._step(label, prompt_token_ids, params, texts, token_ids, logprobs, finish, index, step)
                    outputs.append(output(index, *before) if delta else output(index, 0, 0))
                done = all(f is not None for f in finish)
                if delta or params.output_kind == RequestOutputKind.CUMULATIVE or done:
                    if not delta:
                        outputs = [output(index, 0, 0) for index in range(n)]
                    yield RequestOutput(
                        request_id=request_id,
                        prompt=None,
                        prompt_token_ids=list(prompt_token_ids),
                        prompt_logprobs=None,
                        outputs=outputs,
                        finished=done,
                    )
                if done:
                    break
            completed = True
        finally:
            self.active_generations -= 1
            if not completed:
                self.aborted.append(request_id)

    def _step(
        self,
        label: str,
        prompt_token_ids: list[int],
        params: Any,
        texts: list[str],
        token_ids: list[list[int]],
        logprobs: list[list[Any]],
        finish: list[str | None],
        index: int,
        step: int,
    ) -> None:
        from vllm.logprobs import Logprob

        token = token_text(label, prompt_token_ids, index, step)
        if step + 1 == self.stops_after:
            finish[index] = "stop"
        elif step == params.max_tokens - 1:
            finish[index] = "length"
        texts[index] += token
        token_id = fake_token_id(index, step)
        token_ids[index].append(token_id)
        if params.logprobs is not None:
            # The sampled token is the most likely one; the alternatives are made-up tokens.
            top = {token_id: Logprob(-0.25, 1, token)}
            top |= {k: Logprob(-1.0 - k, k + 1, f"alt{k}") for k in range(1, max(params.logprobs, 1))}
            logprobs[index].append(top)

    # -- adapters --------------------------------------------------------------------

    async def add_adapter(self, adapter: EngineAdapter) -> None:
        self.add_calls.append(adapter.engine_name)
        if self.add_delay_s:
            await asyncio.sleep(self.add_delay_s)
        if self.add_gate is not None:
            await self.add_gate.wait()
        if not self.alive:
            raise EngineDeadError("the fake engine is dead")
        reason = self.fail_loads.get(adapter.engine_name) or self.fail_loads.get(adapter.engine_name.partition("@")[0])
        if reason is not None:
            raise AdapterLoadError(reason)
        if adapter.engine_id in self.resident:
            self._violate(f"add_adapter twice for engine id {adapter.engine_id}")
        if adapter.engine_name in self.resident_names():
            self._violate(f"add_adapter twice for {adapter.engine_name}")
        if self.limit is not None and len(self.resident) + 1 > self.limit:
            self._violate(
                f"add_adapter({adapter.engine_name}) with {sorted(self.resident_names())} resident "
                f"exceeds the engine's {self.limit} slots"
            )
        self.resident[adapter.engine_id] = adapter
        self.peak_resident = max(self.peak_resident, len(self.resident))
        self.events.append(
            AdapterEvent("add", adapter.engine_name, adapter.engine_id, frozenset(self.resident_names()))
        )

    async def remove_adapter(self, adapter: EngineAdapter) -> None:
        if self.remove_delay_s:
            await asyncio.sleep(self.remove_delay_s)
        if not self.alive:
            raise EngineDeadError("the fake engine is dead")
        if self.resident.pop(adapter.engine_id, None) is None:
            self._violate(f"remove_adapter({adapter.engine_name}), which is not registered")
        self.events.append(
            AdapterEvent("remove", adapter.engine_name, adapter.engine_id, frozenset(self.resident_names()))
        )

    # -- lifetime --------------------------------------------------------------------

    def is_alive(self) -> bool:
        return self.alive

    def shutdown(self) -> None:
        self.shut_down = True
        self.alive = False


@dataclass
class GatedEngine(FakeEngine):
    """Holds every generation open, before its first token, until `release` is set."""

    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        first = True
        async for output in super().generate(*args, **kwargs):
            if first:
                await self.release.wait()
                first = False
            yield output


class FakeEngineClient:
    """The part of vLLM's EngineClient its OpenAI layer uses, generating through `FakeEngine`."""

    def __init__(self, engine: FakeEngine, vllm_config: Any) -> None:
        from vllm.renderers import renderer_from_config
        from vllm.v1.engine.input_processor import InputProcessor

        self._engine = engine
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.renderer = renderer_from_config(vllm_config)
        self.input_processor = InputProcessor(vllm_config, self.renderer)
        self.is_running, self.is_stopped = True, False

    @property
    def errored(self) -> bool:
        return not self._engine.alive

    async def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    async def is_tracing_enabled(self) -> bool:
        return False

    def check_admission(self, n: int = 1, request_id: str | None = None) -> None:
        pass

    def get_tokenizer(self) -> Any:
        return self.renderer.get_tokenizer()

    async def generate(
        self,
        prompt: Any,
        sampling_params: Any,
        request_id: str,
        *,
        lora_request: Any = None,
        trace_headers: Mapping[str, str] | None = None,
        **_: Any,
    ) -> AsyncIterator[Any]:
        vocab = self.model_config.get_vocab_size()
        bad = [t for t in prompt["prompt_token_ids"] if not 0 <= t < vocab]
        if bad:  # vLLM's input processor refuses these before the engine sees them
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(f"Token id {bad[0]} is out of vocabulary", parameter="prompt")
        generation = self._engine.generate(
            request_id,
            prompt["prompt_token_ids"],
            sampling_params,
            lora_request,
            trace_headers or {},
            prompt.get("cache_salt"),
        )
        try:
            async for output in generation:
                yield output
        finally:
            await generation.aclose()


# -- adapters and records ----------------------------------------------------------------


def make_record(owner: str = "alice", name: str = "coding", payload: bytes = b"", **fields: Any) -> AdapterRecord:
    """A valid record without files on disk (for the pool, which never reads them itself)."""
    files = [
        AdapterFile(name=file_name, sha256=hashlib.sha256(file_name.encode() + payload).hexdigest(), size=len(payload))
        for file_name in ADAPTER_FILES
    ]
    values: dict[str, Any] = dict(
        owner=owner,
        name=name,
        version=content_version(files),
        base_model="fake-base",
        rank=8,
        alpha=16.0,
        target_modules=["q_proj", "v_proj"],
        files=files,
    )
    values.update(fields)
    return AdapterRecord(**values)


def write_adapter_dir(
    folder: Path,
    *,
    rank: int = 8,
    alpha: float = 16,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    payload: bytes = b"weights",
    layers: int = 2,
    hidden: int = 8,
) -> Path:
    """A valid PEFT LoRA for `write_base_model`'s shapes; `payload` seeds its values, so different
    payloads give different bytes (versions) while every one passes validation."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(target_modules)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(payload).digest()[:8], "little"))
    tensors = {}
    for layer in range(layers):
        for module in target_modules:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, hidden), np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((hidden, rank), np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


async def publish_adapter(
    store: AdapterStore,
    scratch: Path,
    owner: str,
    name: str,
    *,
    base_model: str = "fake-base",
    payload: bytes | None = None,
    **publish_options: Any,
) -> AdapterRecord:
    """Write a tiny adapter folder under `scratch` and publish it into `store`."""
    folder = write_adapter_dir(scratch / f"src-{owner}-{name}", payload=payload or f"{owner}/{name}".encode())
    return await publish(store, folder, record_for(folder, owner, name, base_model=base_model, **publish_options))


def write_base_model(folder: Path, layers: int = 2, hidden: int = 8) -> Path:
    """Just enough of a Llama-shaped checkpoint for write_zero_adapter (headers are all it reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in range(layers):
        for module in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"model.layers.{layer}.self_attn.{module}.weight"] = np.zeros((hidden, hidden), np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden}))
    return folder


class FakeEncoder:
    """A sentence encoder by shared words: each word (lower-cased, 3+ letters) hashes to a dimension,
    so texts about the same words score high and unrelated texts 0. It counts what it encoded."""

    DIMENSIONS = 256

    def __init__(self) -> None:
        self.encoded: list[str] = []
        self.calls = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        self.encoded.extend(texts)
        rows = np.zeros((len(texts), self.DIMENSIONS), np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z]{3,}", text.lower()):
                rows[row, int(hashlib.sha256(word.encode()).hexdigest(), 16) % self.DIMENSIONS] += 1.0
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return rows / np.where(norms == 0, 1, norms)
