"""The Engine interface on vLLM's in-process AsyncLLM (engine core in a child process)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

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
        cpu_flags = _cpu_flags()
    if "amx_bf16" in cpu_flags:
        return "bfloat16", "auto: this CPU has AMX, whose bfloat16 matrix units vLLM's CPU kernels use"
    return "float32", "auto: this CPU has no AMX; bfloat16 measured no faster than float32 without it"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    except OSError:
        return set()


def build_engine_args(settings: ServeSettings, dtype: str, extra_lora_slots: int) -> Any:
    """vLLM engine arguments; `extra_lora_slots` are taken by the gateway's own zero adapter."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    memory_fraction = settings.gpu_memory_utilization
    if memory_fraction is None and current_platform.is_cpu():
        memory_fraction = CPU_MEMORY_FRACTION
    optional: dict[str, Any] = {}
    if memory_fraction is not None:
        optional["gpu_memory_utilization"] = memory_fraction
    if settings.max_num_seqs is not None:
        optional["max_num_seqs"] = settings.max_num_seqs
    if settings.engine_otlp_traces_endpoint is not None:
        optional["otlp_traces_endpoint"] = settings.engine_otlp_traces_endpoint
    return AsyncEngineArgs(
        model=str(settings.model),
        served_model_name=[settings.base_model_name],
        dtype=dtype,
        max_model_len=settings.max_model_len,
        kv_cache_memory_bytes=int(settings.kv_cache_gib * (1 << 30)),
        enable_lora=True,
        max_loras=settings.max_loras + extra_lora_slots,
        max_cpu_loras=settings.max_cpu_loras + extra_lora_slots,
        max_lora_rank=settings.max_lora_rank,
        enable_log_requests=False,
        **optional,
    )


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
    def __init__(self, llm: Any, base_via_zero_adapter: bool, base_requests: str) -> None:
        self._llm = llm
        self.base_via_zero_adapter = base_via_zero_adapter
        self.base_requests = base_requests
        self._tokenizer = llm.get_tokenizer()
        self.max_model_len: int = llm.model_config.max_model_len
        # vLLM warns on every request that carries trace context while its own tracing is off.
        self._tracing: bool = llm.observability_config.otlp_traces_endpoint is not None

    @classmethod
    def start(cls, settings: ServeSettings) -> VllmEngine:
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        zero, how = base_request_path(settings)
        dtype, why = choose_dtype(settings.dtype)
        log.info("engine dtype %s (%s)", dtype, why)
        llm = AsyncLLM.from_engine_args(build_engine_args(settings, dtype, extra_lora_slots=1 if zero else 0))
        engine = cls(llm, zero, how)
        niceness = settings.engine_niceness
        if niceness is None:
            niceness = CPU_ENGINE_NICENESS if current_platform.is_cpu() else 0
        if niceness:
            lower_engine_priority(niceness)
        return engine

    # -- prompts ---------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def render_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        rendered = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template writes the special tokens itself.
        return list(self._tokenizer.encode(rendered, add_special_tokens=False))

    # -- generation ------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        adapter: EngineAdapter | None,
        trace_headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[GenerationDelta]:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, SamplingParams
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        try:
            params = SamplingParams(
                n=options.n,
                max_tokens=options.max_tokens,
                temperature=options.temperature,
                top_p=options.top_p,
                seed=options.seed,
                stop=list(options.stop) or None,
                logprobs=options.logprobs,
                output_kind=RequestOutputKind.DELTA if options.incremental else RequestOutputKind.FINAL_ONLY,
            )
        except VLLMClientError as exc:  # e.g. n > 1 with greedy sampling
            raise ValueError(str(exc)) from exc
        stream = self._llm.generate(
            TokensPrompt(prompt_token_ids=prompt_token_ids),
            params,
            request_id,
            lora_request=_lora_request(adapter),
            trace_headers=trace_headers if self._tracing else None,
        )
        try:
            async for output in stream:
                yield GenerationDelta(
                    prompt_tokens=len(output.prompt_token_ids or prompt_token_ids),
                    choices=[self._choice_delta(c, options.logprobs) for c in output.outputs],
                )
        except VllmEngineDeadError as exc:
            raise EngineDeadError(str(exc)) from exc
        except VLLMClientError as exc:  # the request's own fault; not a ValueError since vLLM 0.32
            raise ValueError(str(exc)) from exc
        finally:
            # Closing vLLM's generator aborts the request in the engine (client gone).
            await stream.aclose()

    def _choice_delta(self, output: Any, top_k: int | None) -> ChoiceDelta:
        logprobs = None
        if top_k is not None and output.logprobs is not None:
            logprobs = [
                _token_logprob(token_id, alternatives, top_k)
                for token_id, alternatives in zip(output.token_ids, output.logprobs)
            ]
        return ChoiceDelta(
            index=output.index,
            text=output.text,
            token_count=len(output.token_ids),
            logprobs=logprobs,
            finish_reason=output.finish_reason,
        )

    # -- adapters --------------------------------------------------------------

    async def add_adapter(self, adapter: EngineAdapter) -> None:
        try:
            await self._llm.add_lora(_lora_request(adapter))
        except Exception as exc:  # vLLM raises whatever the loader raised
            if self._llm.errored:
                raise EngineDeadError(str(exc)) from exc
            raise AdapterLoadError(_first_line(exc)) from exc

    async def remove_adapter(self, adapter: EngineAdapter) -> None:
        await self._llm.remove_lora(adapter.engine_id)

    # -- lifetime --------------------------------------------------------------

    def is_alive(self) -> bool:
        return not self._llm.errored

    def shutdown(self) -> None:
        self._llm.shutdown()


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


def _lora_request(adapter: EngineAdapter | None) -> Any:
    if adapter is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=adapter.engine_name, lora_int_id=adapter.engine_id, lora_path=str(adapter.path))


def _token_logprob(token_id: int, alternatives: Mapping[int, Any], top_k: int) -> TokenLogprob:
    # vLLM adds the sampled token to the top-k when it is not among them: keep the k best.
    ranked = sorted(alternatives.items(), key=lambda item: item[1].rank or 0)[:top_k]
    chosen = alternatives[token_id]
    return TokenLogprob(
        token_id=token_id,
        token=chosen.decoded_token or "",
        logprob=chosen.logprob,
        top=[Alternative(i, lp.decoded_token or "", lp.logprob) for i, lp in ranked],
    )


# vLLM wraps a worker's error as: Call to add_lora method failed: Worker failed with error '<why>', ...
_WORKER_ERROR = re.compile(r"failed with error '(?P<why>.*)', please check", re.DOTALL)


def _first_line(exc: BaseException) -> str:
    """The reason in one line, without vLLM's wrapping: this text reaches the API caller."""
    text = str(exc).strip() or type(exc).__name__
    if match := _WORKER_ERROR.search(text):
        text = match["why"]
    return text.splitlines()[0][:500]
