"""vLLM's own OpenAI server as a child process, set up like the gateway's engine: the yardstick of
the serve benchmark and the oracle of the API parity tests."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from gateway_tools.dev.process import ServerProcess, free_port

KV_CACHE_GIB = 1  # the gateway's default kv_cache_gib
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)}


def memory_flags() -> list[str]:
    from vllm.platforms import current_platform

    from gateway.engine.vllm_engine import CPU_MEMORY_FRACTION

    # Only on the CPU: there the gateway passes this fraction, on a GPU both keep vLLM's default.
    return ["--gpu-memory-utilization", str(CPU_MEMORY_FRACTION)] if current_platform.is_cpu() else []


def gateway_extra_lora_slots() -> int:
    """Where the gateway's grouped CPU LoRA ops cannot apply it serves base requests through an
    all-zero adapter in a LoRA slot of its own; vLLM's server then gets as many slots in all."""
    from gateway.engine.cpu_lora_ops import unsupported_reason

    return 0 if unsupported_reason() is None else 1


def vllm_server(
    base: Path,
    served_model_name: str,
    adapters: Mapping[str, Path],
    log_path: Path,
    *,
    dtype: str,
    max_loras: int,
    max_cpu_loras: int,
    max_lora_rank: int,
    extra_args: Sequence[str] = (),
) -> ServerProcess:
    """`python -m vllm.entrypoints.openai.api_server` on a free loopback port, not yet started;
    `adapters` maps each served name (`owner/name` like the gateway's) to its PEFT folder."""
    port = free_port()
    extra = gateway_extra_lora_slots()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
               "--served-model-name", served_model_name, "--dtype", dtype,
               "--host", "127.0.0.1", "--port", str(port), "--kv-cache-memory-bytes", str(KV_CACHE_GIB << 30),
               "--enable-lora", "--max-loras", str(max_loras + extra),
               "--max-cpu-loras", str(max_cpu_loras + extra),
               "--max-lora-rank", str(max_lora_rank), *memory_flags()]  # fmt: skip
    if adapters:
        command += ["--lora-modules", *(f"{ref}={path}" for ref, path in adapters.items())]
    command += list(extra_args)
    return ServerProcess(command, port, log_path, "/health", ENGINE_ENV)
