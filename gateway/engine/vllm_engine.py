"""The Engine interface on vLLM's in-process AsyncLLM (engine core in a child process)."""

from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Any

from gateway.engine.cpu_features import cpu_flags as host_cpu_flags
from gateway.engine.interface import AdapterLoadError, EngineAdapter, EngineDeadError
from gateway.settings import ServeSettings

log = logging.getLogger(__name__)

CPU_MEMORY_FRACTION = 0.15  # of host memory; vLLM's default asks for more than a small host has
# On a few-core host the engine core's loop and its worker busy-poll at the same priority as the
# gateway, which then barely runs: steps stall for seconds (measured on 2 cores; README, Benchmarks).
CPU_ENGINE_NICENESS = 10


def choose_dtype(setting: str, cpu_flags: set[str] | None = None) -> tuple[str, str]:
    """(the engine's dtype, why). `auto` on the CPU build: bfloat16 only where the CPU has AMX;
    elsewhere float32, which measured as fast as bfloat16 (AVX-512 with AVX512_BF16, no AMX:
    README, Benchmarks) and matches the float32 reference exactly. On a GPU: vLLM's own choice."""
    from vllm.platforms import current_platform

    if setting != "auto":
        return setting, "as configured"
    if not current_platform.is_cpu():
        return "auto", "vLLM's choice for the model on this GPU"
    if cpu_flags is None:
        cpu_flags = host_cpu_flags()
    if "amx_bf16" in cpu_flags:
        return "bfloat16", "auto: this CPU has AMX, whose bfloat16 matrix units vLLM's CPU kernels use"
    return "float32", "auto: this CPU has no AMX; bfloat16 measured no faster than float32 without it"


def vllm_args(settings: ServeSettings, dtype: str, extra_lora_slots: int) -> argparse.Namespace:
    """The settings as `vllm serve` flags, parsed by vLLM's own parser: one namespace configures both the
    engine and vLLM's OpenAI layer, with vLLM's defaults for everything the gateway does not set.
    `extra_lora_slots` are taken by the gateway's own zero adapter."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.platforms import current_platform
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    memory_fraction = settings.gpu_memory_utilization
    if memory_fraction is None and current_platform.is_cpu():
        memory_fraction = CPU_MEMORY_FRACTION
    flags: dict[str, object] = {
        "model": settings.model,
        "served-model-name": settings.base_model_name,
        "dtype": dtype,
        "kv-cache-memory-bytes": int(settings.kv_cache_gib * (1 << 30)),
        # vLLM refuses more adapters in a batch than it holds: the batch is bounded by what is resident.
        "max-loras": min(settings.max_loras, settings.max_cpu_loras) + extra_lora_slots,
        "max-cpu-loras": settings.max_cpu_loras + extra_lora_slots,
        "max-lora-rank": settings.max_lora_rank,
        "max-model-len": settings.max_model_len,
        "max-num-seqs": settings.max_num_seqs,
        "gpu-memory-utilization": memory_fraction,
        "otlp-traces-endpoint": settings.engine_otlp_traces_endpoint,
        "chat-template": settings.chat_template,
        "tool-call-parser": settings.tool_call_parser,
        "reasoning-parser": settings.reasoning_parser,
    }
    argv = ["--enable-lora"] + (["--enable-auto-tool-choice"] if settings.enable_auto_tool_choice else [])
    for flag, value in flags.items():
        if value is not None:
            argv += [f"--{flag}", str(value)]
    args = make_arg_parser(FlexibleArgumentParser(prog="vllm serve")).parse_args(argv)
    validate_parsed_serve_args(args)
    return args


def build_engine_args(args: argparse.Namespace) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(args)


def base_request_path(settings: ServeSettings) -> tuple[bool, str]:
    """(through the zero adapter?, how base requests run). On the CPU build this also arranges for
    the gateway's grouped LoRA ops in the engine processes about to start, where they apply."""
    from vllm.platforms import current_platform

    from gateway.engine import cpu_lora_ops

    zero_asked, plain_asked = settings.base_requests == "zero-adapter", settings.base_requests == "plain"
    if not current_platform.is_cpu():
        if zero_asked:
            return True, "through an all-zero adapter (--base-requests zero-adapter)"
        return False, "plain (vLLM's GPU LoRA kernels give LoRA-less tokens no delta)"
    if settings.cpu_lora_ops == "vllm":
        unsupported: str | None = "vLLM's own CPU LoRA ops asked for (--cpu-lora-ops vllm)"
    else:
        unsupported = cpu_lora_ops.unsupported_reason()
    if unsupported is None:
        cpu_lora_ops.enable_in_engine_processes()
        ops = "the gateway's grouped CPU LoRA ops, which give LoRA-less tokens no delta"
        if zero_asked:
            return True, f"through an all-zero adapter (--base-requests zero-adapter); {ops}"
        return False, f"plain ({ops})"
    if plain_asked:
        log.warning(
            "base-model requests run plain although %s: batched with adapter requests they may get an "
            "adapter's delta (vLLM's CPU ops give LoRA-less tokens the last slot)",
            unsupported,
        )
        return False, f"plain (--base-requests plain), INEXACT in mixed batches: {unsupported}"
    log.warning("base-model requests run through an all-zero adapter (one LoRA slot): %s", unsupported)
    return True, f"through an all-zero adapter: {unsupported}"


class VllmEngine:
    def __init__(self, llm: Any, frontend_args: argparse.Namespace, base_via_zero_adapter: bool, base_requests: str):
        self.client = llm
        self.frontend_args = frontend_args
        self.base_via_zero_adapter = base_via_zero_adapter
        self.base_requests = base_requests
        self.max_model_len: int = llm.model_config.max_model_len

    @classmethod
    def start(cls, settings: ServeSettings) -> VllmEngine:
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        zero, how = base_request_path(settings)
        dtype, why = choose_dtype(settings.dtype)
        log.info("engine dtype %s (%s)", dtype, why)
        args = vllm_args(settings, dtype, extra_lora_slots=1 if zero else 0)
        llm = AsyncLLM.from_engine_args(build_engine_args(args))
        engine = cls(llm, args, zero, how)
        niceness = settings.engine_niceness
        if niceness is None:
            niceness = CPU_ENGINE_NICENESS if current_platform.is_cpu() else 0
        if niceness:
            lower_engine_priority(niceness)
        return engine

    # -- adapters --------------------------------------------------------------

    async def add_adapter(self, adapter: EngineAdapter) -> None:
        try:
            await self.client.add_lora(lora_request(adapter))
        except Exception as exc:  # vLLM raises whatever the loader raised
            if self.client.errored:
                raise EngineDeadError(str(exc)) from exc
            raise AdapterLoadError(_first_line(exc)) from exc

    async def remove_adapter(self, adapter: EngineAdapter) -> None:
        await self.client.remove_lora(adapter.engine_id)

    # -- lifetime --------------------------------------------------------------

    def is_alive(self) -> bool:
        return not self.client.errored

    def shutdown(self) -> None:
        self.client.shutdown()


def lower_engine_priority(niceness: int) -> None:
    """Renice every thread of this process's children (the engine core and its workers): on Linux a
    nice value belongs to a thread, and their threads already run."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            for thread in child.threads():
                os.setpriority(os.PRIO_PROCESS, thread.id, niceness)
        except (psutil.Error, OSError) as exc:  # gone, or not ours: the engine runs as it is
            log.warning("could not renice engine process %d: %s", child.pid, exc)
            continue
        log.info("engine process %d (%s) runs at nice %d", child.pid, child.name(), niceness)


def lora_request(adapter: EngineAdapter | None) -> Any:
    """The adapter as vLLM's engine takes it (None: the base model)."""
    if adapter is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=adapter.engine_name, lora_int_id=adapter.engine_id, lora_path=str(adapter.path))


# vLLM wraps a worker's error as: Call to add_lora method failed: Worker failed with error '<why>', ...
_WORKER_ERROR = re.compile(r"failed with error '(?P<why>.*)', please check", re.DOTALL)


def _first_line(exc: BaseException) -> str:
    """The reason in one line, without vLLM's wrapping: this text reaches the API caller."""
    text = str(exc).strip() or type(exc).__name__
    if match := _WORKER_ERROR.search(text):
        text = match["why"]
    return text.splitlines()[0][:500]
