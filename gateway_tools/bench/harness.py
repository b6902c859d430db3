"""What the engine benchmarks (swap, scale, rank, compare, soak) share: the model and adapters they
run on, one gateway at a time, a client that times tokens, process memory, and the report files.

Every benchmark builds its own adapter store, so it runs on a fresh clone: on the tiny model
(generated offline) by default, on SmolLM2-135M-Instruct (`--base smollm2`, converted offline from
its wheel), or on any base model folder (`--base DIR`, e.g. on a GPU host), with synthetic adapters
of the right shapes for it. Only one engine runs at a time: an idle vLLM
engine's worker spins on a core and would slow the one being measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from adapters_manifest.record import AdapterRecord
from gateway_tools.bench.report import RequestStats, raise_on_sigterm, request_stats, write_json
from gateway_tools.dev.process import ServerProcess, free_port, gateway_command

KV_CACHE_GIB = 1.0
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
TINY_TARGET_MODULES = ("q_proj", "v_proj", "o_proj")  # the tiny model's figures were measured so
# What `lora-gateway train` targets by default, and so what users' adapters on a real base weigh.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = ("def fibonacci(n):\n", "import os\nimport sys\n", "class Stack:\n    def ", "for i in range(")
REQUEST_TIMEOUT_S = 120.0


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the model and its adapters ---------------------------------------------------------


@dataclass(frozen=True)
class BaseModel:
    path: Path
    served_name: str
    dtype: str  # float32 on the dev bases (exact against the reference); the model's own otherwise
    target_modules: tuple[str, ...] = ALL_LINEAR  # what the synthetic adapters adapt


def add_model_options(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument(
        "--base",
        default="tiny",
        help="tiny (built offline), smollm2 (SmolLM2-135M-Instruct from its wheel) or a base model folder",
    )
    p.add_argument("--served-model-name", help="the base model's name in the API (default: the folder's name)")
    p.add_argument("--dtype", default=None, help="engine dtype (default: float32 on tiny and smollm2, else auto)")
    p.add_argument("--kv-cache-gib", type=float, default=KV_CACHE_GIB, help="the gateway's KV-cache memory")
    p.add_argument(
        "--out",
        type=Path,
        default=Path(f"artifacts/bench-{name}"),
        help=f"folder for {name}.json, {name}.md (the table) and {name}.png (the plot)",
    )
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds until a gateway must be ready")


def base_model(opts: argparse.Namespace, work: Path) -> BaseModel:
    """The model under test: a dev base (`tiny`, `smollm2`) built into `work`, or a folder."""
    from gateway_tools.dev.models import BASES, make_model

    if opts.base not in BASES:
        path = Path(opts.base).resolve()
        if not (path / "config.json").is_file():
            raise SystemExit(f"--base {opts.base}: not one of {', '.join(BASES)}, nor a model folder")
        return BaseModel(path, opts.served_model_name or path.name, opts.dtype or "auto")
    progress(f"building the {opts.base} base model")
    made = make_model(work / opts.base, [], base=opts.base)
    modules = TINY_TARGET_MODULES if opts.base == "tiny" else ALL_LINEAR
    return BaseModel(made.base.resolve(), made.served_name, opts.dtype or "float32", modules)


def write_synthetic_adapter(
    base: Path, out: Path, rank: int, seed: int, modules: Sequence[str] = ALL_LINEAR, b_std: float = 0.5
) -> None:
    """A PEFT-format LoRA for any base model: seeded random A and B of the base's own shapes.

    Much faster than training or PEFT's initialisation (256 adapters in seconds), and exactly what
    the engine loads: the weights' values change outputs, not serving costs.
    """
    from safetensors.numpy import save_file

    from adapters_manifest.validation import BaseModelSpec

    spec = BaseModelSpec.from_model_dir(base)
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, (out_features, in_features) in sorted(spec.module_shapes.items()):
        if module.rsplit(".", 1)[-1] not in modules:
            continue
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, in_features**-0.5, (rank, in_features)).astype(np.float32)
        tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, b_std, (out_features, rank)).astype(np.float32)
    if not tensors:
        raise ValueError(f"the base model in {base} has none of the modules {list(modules)}")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(modules),
              "base_model_name_or_path": str(base), "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False,
              "modules_to_save": None, "use_dora": False, "use_rslora": False, "task_type": "CAUSAL_LM",
              "inference_mode": True}  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


@dataclass(frozen=True)
class Published:
    record: AdapterRecord
    folder: Path  # the files as published: what the reference model loads


async def publish_synthetic(
    store_url: str, model: BaseModel, refs: Sequence[str], rank: int, work: Path, salt: str = ""
) -> list[Published]:
    """One synthetic adapter per `owner/name` (seeded by its name, rank and `salt`) into the store."""
    import zlib

    published = []
    for ref in refs:
        owner, _, name = ref.partition("/")
        folder = work / "adapters" / f"{owner}--{name}--r{rank}{salt}"
        seed = zlib.crc32(f"{ref}:{rank}:{salt}".encode())
        write_synthetic_adapter(model.path, folder, rank, seed, model.target_modules)
        published += await publish_copies(store_url, model, folder, [ref])
    return published


async def publish_copies(store_url: str, model: BaseModel, folder: Path, refs: Sequence[str]) -> list[Published]:
    """The adapter in `folder` published under each `owner/name`: to the engine, each its own adapter."""
    from adapters_manifest.open_store import open_store
    from adapters_manifest.publish import publish, validated_record
    from adapters_manifest.validation import BaseModelSpec

    store = open_store(store_url)
    spec = BaseModelSpec.from_model_dir(model.path)
    published = []
    for ref in refs:
        owner, _, name = ref.partition("/")
        record = validated_record(folder, owner, name, base=spec, base_model=model.served_name)
        published.append(Published(await publish(store, folder, record), folder))
    return published


# -- the gateway ------------------------------------------------------------------------


# A gateway with the admission scheduler's aids off (no engine seats, no aging), for --compare-unscheduled.
UNSCHEDULED = {"engine_seats": 0, "adapter_slot_aging_s": 1e9}


def gateway_server(
    model: BaseModel, store: str, keys_file: Path, log_path: Path, env: dict[str, str] | None = None, **flags: Any
) -> ServerProcess:
    port = free_port()
    flags = {"kv_cache_gib": KV_CACHE_GIB, **flags}
    command = gateway_command(model.path, store, port, keys_file=keys_file, served_model_name=model.served_name,
                              dtype=model.dtype, **flags)  # fmt: skip
    return ServerProcess(command, port, log_path, "/readyz", {**ENGINE_ENV, **(env or {})})


@contextlib.contextmanager
def running(server: ServerProcess, startup_timeout_s: float) -> Iterator[ServerProcess]:
    """The started server; stopped (its whole process group) however the block ends."""
    try:
        server.start(startup_timeout_s)
        yield server
    finally:
        server.stop()


def admin_key(work: Path) -> tuple[Path, str]:
    """A keys file with one admin (who may use every adapter) and the admin's key."""
    from gateway.auth.keys import add_key

    keys_file = work / "keys.yaml"
    return keys_file, add_key(keys_file, "bench", admin=True)[0]


# -- a client that times tokens ---------------------------------------------------------


@dataclass
class Timed:
    """One completion as the client saw it."""

    ok: bool
    status: int
    ttft_s: float = float("nan")
    latency_s: float = float("nan")
    tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    error: str = ""  # the error's code (or kind) when not ok
    retry_after: str | None = None


def stream_stats(results: Sequence[Timed], duration_s: float) -> RequestStats:
    """The figures of completions that took `duration_s` together: the successes' latencies and tokens,
    the others counted as errors."""
    ok = [r for r in results if r.ok]
    return request_stats([r.latency_s for r in ok], len(results) - len(ok), duration_s, sum(r.tokens for r in ok))


def sse_payloads(raw: bytes) -> list[dict[str, Any]]:
    """The JSON payloads of a whole server-sent-events body, without `[DONE]`."""
    out = []
    for line in raw.decode(errors="replace").splitlines():
        if line.startswith("data:") and (data := line[5:].strip()) and data != "[DONE]":
            out.append(json.loads(data))
    return out


def token_ids_of(labels: Sequence[str]) -> list[int]:
    """Token ids from logprobs labels `token_id:N` (return_tokens_as_token_ids)."""
    return [int(label.removeprefix("token_id:")) for label in labels]


class Client:
    """aiohttp against one gateway, as an admin (who may use every adapter)."""

    def __init__(self, url: str, api_key: str, connections: int = 64) -> None:
        self.url = url
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
            headers={"Authorization": f"Bearer {api_key}"},
        )

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def complete(
        self, model: str, prompt: str, max_tokens: int, *, stream: bool = True, ids: bool = False
    ) -> Timed:
        """A greedy completion; with `ids`, the exact generated token ids (via logprobs)."""
        body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        if ids:
            body |= {"logprobs": 0, "return_tokens_as_token_ids": True}
        started = time.perf_counter()
        try:
            async with self._session.post(f"{self.url}/v1/completions", json=body) as response:
                if response.status != 200:
                    return _error_of(response.status, await response.read(), response.headers.get("Retry-After"))
                if not stream:
                    payload = await response.json()
                    choice = payload["choices"][0]
                    timed = _done(started, None, choice["text"], choice.get("logprobs"), ids)
                    timed.tokens = int(payload["usage"]["completion_tokens"])
                    return timed
                first: float | None = None
                raw = b""
                async for chunk in response.content.iter_any():
                    if first is None and b'"choices"' in chunk:
                        first = time.perf_counter()
                    raw += chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Timed(ok=False, status=0, error=f"{type(exc).__name__}", latency_s=time.perf_counter() - started)
        payloads = sse_payloads(raw)
        if errors := [p["error"] for p in payloads if "error" in p]:
            return Timed(ok=False, status=200, error=f"stream error event: {errors[0].get('code')}")
        if not raw.rstrip().endswith(b"data: [DONE]"):
            return Timed(ok=False, status=200, error="stream cut off before [DONE]")
        choices = [p["choices"][0] for p in payloads if p.get("choices")]
        text = "".join(c["text"] for c in choices)
        labels = [t for c in choices if c.get("logprobs") for t in c["logprobs"]["tokens"]]
        timed = _done(started, first or time.perf_counter(), text, {"tokens": labels} if ids else None, ids)
        timed.tokens = next((int(p["usage"]["completion_tokens"]) for p in payloads if p.get("usage")), len(labels))
        return timed

    async def version_served(self, ref: str) -> str | None:
        """The version of `owner/name` the gateway resolves requests to now (None: unknown to it)."""
        async with self._session.get(f"{self.url}/v1/adapters/{ref}") as response:
            return str((await response.json())["version"]) if response.status == 200 else None

    async def metric_sum(self, name: str) -> float:
        """The sum over labels of one sample on the gateway's /metrics page (vLLM's gauges are there too)."""
        async with self._session.get(f"{self.url}/metrics") as response:
            response.raise_for_status()
            text = await response.text()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

    async def resident(self) -> list[str]:
        """Versioned names (`owner/name@version`) of the adapters the gateway holds in the engine."""
        async with self._session.get(f"{self.url}/admin/resident") as response:
            response.raise_for_status()
            return [r["adapter"] for r in (await response.json())["data"]]


def _done(started: float, first: float | None, text: str, logprobs: dict[str, Any] | None, ids: bool) -> Timed:
    now = time.perf_counter()
    token_ids = token_ids_of(logprobs["tokens"]) if ids and logprobs else []
    ttft = float("nan") if first is None else first - started  # a whole response has no first token
    return Timed(ok=True, status=200, ttft_s=ttft, latency_s=now - started, tokens=len(token_ids),
                 token_ids=token_ids, text=text)  # fmt: skip


def _error_of(status: int, raw: bytes, retry_after: str | None) -> Timed:
    """A non-200 answer: its OpenAI error code, or `no JSON error body` (a lost request)."""
    try:
        code = json.loads(raw)["error"]["code"] or "error"
    except (ValueError, KeyError, TypeError):
        code = "no JSON error body"
    return Timed(ok=False, status=status, error=str(code), retry_after=retry_after)


# -- process memory ---------------------------------------------------------------------


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (the gateway and its engine core)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


def gpu_memory_bytes() -> int | None:
    """Memory allocated on the GPU by all processes (None without a GPU): nvidia's view, since the
    engine's tensors live in another process than this one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        return int(total - free)
    except Exception:
        return None


# -- report files ----------------------------------------------------------------------


def ms(seconds: float) -> str:
    return "n/a" if seconds != seconds else f"{seconds * 1000:.1f}"


def write_report(out: Path, name: str, report: dict[str, Any], table: str, plot: Callable[[Path], None]) -> None:
    """OUT/NAME.json, OUT/NAME.md (the table, printed too) and OUT/NAME.png (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", report)
    (out / f"{name}.md").write_text(table + "\n")
    plot(out / f"{name}.png")
    print(table)
    progress(f"wrote {out / name}.json, .md and .png")


@contextlib.contextmanager
def bench_work_dir(name: str) -> Iterator[Path]:
    """What every engine bench starts with: SIGTERM unwinds through its `with` blocks (servers stop),
    vLLM's logs stay off stdout (the table's), and a temporary folder for model, adapters and logs."""
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    quiet_vllm()
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        yield Path(tmp)


def quiet_vllm() -> None:
    """vLLM logs to stdout by default: keep stdout for the table (set before vLLM is imported)."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
