"""Test doubles: a deterministic in-process engine, and tiny adapters and base models on disk.

`FakeEngine` implements gateway.engine.interface.Engine without vLLM. What it generates is a
pure function of (adapter, prompt, choice, step), so a test can tell which adapter produced a
response and compute the exact expected text with `expected_text`. It also checks the
guarantees the gateway owes the real engine (never more adapters resident than vLLM's
`max_cpu_loras`, never generate with an unregistered adapter, never add twice) and records
every violation in `violations` instead of only raising, so that a violation swallowed by
the code under test still fails the test (`check()`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import zlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from adapters_manifest.local_store import LocalFolderStore
from adapters_manifest.publish import publish, record_for
from adapters_manifest.record import ADAPTER_FILES, AdapterFile, AdapterRecord, content_version
from gateway.engine.interface import (
    AdapterLoadError,
    Alternative,
    ChoiceDelta,
    EngineAdapter,
    EngineDeadError,
    GenerationDelta,
    SamplingOptions,
    TokenLogprob,
)
from gateway.settings import ServeSettings

NO_ADAPTER = "<no-adapter>"  # the label of generations without any adapter
VOCAB_SIZE = 0x110000  # one token per character: every code point is a token id
FAKE_TOKEN_ID_BASE = 100_000  # ids of generated tokens in logprobs: 100000 + 1000 * choice + step


def adapter_label(adapter: EngineAdapter | None) -> str:
    return NO_ADAPTER if adapter is None else adapter.engine_name


def prompt_digest(prompt_token_ids: list[int]) -> str:
    return f"{zlib.crc32(','.join(map(str, prompt_token_ids)).encode()):08x}"


def token_text(label: str, prompt_token_ids: list[int], choice: int, step: int) -> str:
    """The text of generated token `step` of choice `choice`: names the adapter and the prompt."""
    return f"<{label}|{prompt_digest(prompt_token_ids)}|{choice}.{step}>"


def expected_text(label: str, prompt_token_ids: list[int], choice: int, tokens: int) -> str:
    """What the fake generates for `tokens` steps (when no stop sequence cuts it short)."""
    return "".join(token_text(label, prompt_token_ids, choice, step) for step in range(tokens))


def tokenize(text: str) -> list[int]:
    """The fake tokenizer: one token per character (its code point)."""
    return [ord(c) for c in text]


def render_chat(messages: list[dict[str, Any]]) -> list[int]:
    """The fake chat template: one `<role>content` line per message, then the assistant's turn."""
    rendered = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
    return tokenize(rendered)


@dataclass(frozen=True)
class GenerateCall:
    request_id: str
    prompt_token_ids: list[int]
    options: SamplingOptions
    adapter: EngineAdapter | None
    trace_headers: dict[str, str]


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
    # Adapter ref ("owner/name") or engine name ("owner/name@version") -> why loading fails.
    fail_loads: dict[str, str] = field(default_factory=dict)
    # When set, add_adapter waits for it (lets a test hold a load in flight).
    add_gate: asyncio.Event | None = None
    # When set, render_chat raises ValueError with this message (a template that rejects input).
    chat_template_error: str | None = None
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

    def started_with(self, settings: ServeSettings) -> FakeEngine:
        """The engine factory: as vLLM's, sized by the settings, with a slot for the zero adapter."""
        self.capacity, self.extra = settings.max_cpu_loras, int(self.base_via_zero_adapter)
        return self

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

    # -- prompts ---------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return tokenize(text)

    def render_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        if self.chat_template_error is not None:
            raise ValueError(self.chat_template_error)
        return render_chat(messages)

    # -- generation ------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        adapter: EngineAdapter | None,
        trace_headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[GenerationDelta]:
        self.generate_calls.append(
            GenerateCall(request_id, list(prompt_token_ids), options, adapter, dict(trace_headers or {}))
        )
        if not self.alive:
            raise EngineDeadError("the fake engine is dead")
        if adapter is not None and self.resident.get(adapter.engine_id) != adapter:
            self._violate(f"generate with {adapter.engine_name} (id {adapter.engine_id}), which is not registered")
        bad = [t for t in prompt_token_ids if not 0 <= t < VOCAB_SIZE]
        if bad:
            raise ValueError(f"Token id {bad[0]} is out of vocabulary")
        if len(prompt_token_ids) + options.max_tokens > self.max_model_len:
            self._violate(f"prompt of {len(prompt_token_ids)} + {options.max_tokens} tokens exceeds the context")

        label = adapter_label(adapter)
        texts = ["" for _ in range(options.n)]
        finished = [False] * options.n
        self.active_generations += 1
        completed = False
        try:
            for step in range(options.max_tokens):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                if not self.alive:
                    raise EngineDeadError("the fake engine died while generating")
                choices = []
                for index in range(options.n):
                    if finished[index]:
                        continue
                    choices.append(self._step(label, prompt_token_ids, options, texts, finished, index, step))
                yield GenerationDelta(prompt_tokens=len(prompt_token_ids), choices=choices)
                if all(finished):
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
        options: SamplingOptions,
        texts: list[str],
        finished: list[bool],
        index: int,
        step: int,
    ) -> ChoiceDelta:
        token = token_text(label, prompt_token_ids, index, step)
        whole = texts[index] + token
        cut = min((i for i in (whole.find(s) for s in options.stop) if i >= 0), default=-1)
        finish_reason = None
        if cut >= 0:  # like vLLM: the stop sequence itself is not part of the output
            token, finish_reason = whole[len(texts[index]) : cut], "stop"
        elif step == options.max_tokens - 1:
            finish_reason = "length"
        texts[index] += token
        finished[index] = finish_reason is not None
        logprobs = None
        if options.logprobs is not None:
            # The sampled token is the most likely one; the alternatives are made-up tokens.
            token_id = FAKE_TOKEN_ID_BASE + index * 1000 + step
            top = [Alternative(token_id, token, -0.25)]
            top += [Alternative(k, f"alt{k}", -1.0 - k) for k in range(1, options.logprobs)]
            logprobs = [TokenLogprob(token_id=token_id, token=token, logprob=-0.25, top=top[: options.logprobs])]
        return ChoiceDelta(index=index, text=token, token_count=1, logprobs=logprobs, finish_reason=finish_reason)

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
    store: LocalFolderStore,
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
