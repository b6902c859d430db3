"""The grouped CPU LoRA ops: each token gets exactly its own slot's delta, a token without an
adapter (slot -1) none, and where every token has an adapter they agree with vLLM's own ops."""

from __future__ import annotations

import pytest
import torch
from vllm.lora.ops.torch_ops import lora_ops as vllm_ops

from gateway.engine import cpu_lora_ops as grouped

SLOTS, RANK, IN, OUT = 3, 4, 16, 12


@pytest.fixture
def weights() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(SLOTS, 1, RANK, IN, generator=generator)  # vLLM's stacked shapes
    b = torch.randn(SLOTS, 1, OUT, RANK, generator=generator)
    return a, b


def per_token(x: torch.Tensor, w: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """The definition, token by token: x[t] @ W[slot].T, nothing for slot -1."""
    rows = [x[t] @ w[s, 0].T if s >= 0 else torch.zeros(w.shape[2]) for t, s in enumerate(indices)]
    return torch.stack(rows)


MIXES = [[0, -1, 2, 2, -1, 1], [-1, -1, -1], [1, 1, 1, 1], [2, -1], [-1, 0], [0] * 9 + [-1] * 3 + [2] * 8]


@pytest.mark.parametrize("indices", MIXES, ids=[str(m) for m in MIXES])
def test_shrink_and_expand_give_each_token_its_own_slots_delta(
    weights: tuple[torch.Tensor, torch.Tensor], indices: list[int]
) -> None:
    a, b = weights
    x = torch.randn(len(indices), IN)
    slots = torch.tensor(indices)
    shrunk = torch.full((len(indices), RANK), 7.0)  # stale values: the op must overwrite every row
    grouped.bgmv_shrink(x, a, shrunk, slots, scaling=0.5)
    torch.testing.assert_close(shrunk, 0.5 * per_token(x, a, indices))

    y0 = torch.randn(len(indices), OUT + 2)  # the model's output may be wider than the adapter's
    y = y0.clone()
    grouped.bgmv_expand(shrunk, b, y, slots, add_inputs=True)
    expected = y0.clone()
    expected[:, :OUT] += per_token(shrunk, b, indices)
    torch.testing.assert_close(y, expected)

    sliced = y0.clone()
    grouped.bgmv_expand_slice(shrunk, b, sliced, slots, 1, OUT, add_inputs=True)
    expected = y0.clone()
    expected[:, 1 : 1 + OUT] += per_token(shrunk, b, indices)
    torch.testing.assert_close(sliced, expected)


def test_where_every_token_has_an_adapter_they_agree_with_vllms_ops(weights: tuple[torch.Tensor, torch.Tensor]) -> None:
    a, b = weights
    slots = torch.tensor([2, 0, 0, 1, 2, 2])
    x = torch.randn(6, IN)
    ours, theirs = torch.zeros(6, RANK), torch.zeros(6, RANK)
    grouped.bgmv_shrink(x, a, ours, slots, 0.25)
    vllm_ops.bgmv_shrink(x, a, theirs, slots, 0.25)
    torch.testing.assert_close(ours, theirs)
    y = torch.randn(6, OUT)
    ours_y, theirs_y = y.clone(), y.clone()
    grouped.bgmv_expand(ours, b, ours_y, slots, add_inputs=True)
    vllm_ops.bgmv_expand(theirs, b, theirs_y, slots, add_inputs=True)
    torch.testing.assert_close(ours_y, theirs_y)


def test_vllms_ops_give_a_token_without_an_adapter_the_last_slot(weights: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Why the replacement exists: if this stops failing vLLM's way, the patch may retire."""
    a, _ = weights
    x = torch.randn(2, IN)
    out = torch.zeros(2, RANK)
    vllm_ops.bgmv_shrink(x, a, out, torch.tensor([0, -1]), 1.0)
    torch.testing.assert_close(out[1], x[1] @ a[SLOTS - 1, 0].T)


def test_the_ops_are_installed_only_where_the_gateway_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.lora.punica_wrapper import punica_cpu

    originals = {op: getattr(vllm_ops, op) for op in grouped.OPS}
    monkeypatch.delenv(grouped.ENV_FLAG, raising=False)
    grouped.register()
    assert all(getattr(vllm_ops, op) is originals[op] for op in grouped.OPS)
    for module in (vllm_ops, punica_cpu):
        for op in grouped.OPS:
            monkeypatch.setattr(module, op, getattr(module, op))  # restored after the test
    monkeypatch.setenv(grouped.ENV_FLAG, "1")
    grouped.register()
    assert all(getattr(module, op) is grouped.GROUPED[op] for module in (vllm_ops, punica_cpu) for op in grouped.OPS)


def test_an_unchecked_vllm_version_is_refused_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grouped, "vllm_version", lambda: "9.9.9")
    assert "vLLM 9.9.9 is not one" in (grouped.unsupported_reason() or "")
    monkeypatch.setenv(grouped.ENV_FLAG, "1")
    with pytest.raises(RuntimeError, match="cannot apply"):
        grouped.register()


SLICES = (12, 5, 5)  # a merged layer's output slices, as qkv_proj's


def layer_weights() -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(1)
    a = tuple(torch.randn(SLOTS, 1, RANK, IN, generator=generator) for _ in SLICES)
    b = tuple(torch.randn(SLOTS, 1, size, RANK, generator=generator) for size in SLICES)
    return a, b


def layer_by_token(x: torch.Tensor, a: tuple, b: tuple, indices: list[int], scale: float) -> torch.Tensor:
    """The definition of a layer's LoRA, slice by slice and token by token."""
    return torch.cat([scale * per_token(per_token(x, ai, indices), bi, indices) for ai, bi in zip(a, b)], dim=1)


# Steps past the dense path's size whose tokens come in long runs of one adapter (prompts).
RUN_MIXES = [[0] * 40 + [-1] * 30 + [2] * 50 + [1] * 17, [1] * 100, [-1] * 70 + [0] * 30]


@pytest.mark.parametrize("indices", MIXES + RUN_MIXES, ids=[str(m)[:40] for m in MIXES + RUN_MIXES])
def test_the_fused_layer_gives_each_token_its_own_slots_delta_in_every_slice(indices: list[int]) -> None:
    a, b = layer_weights()
    x = torch.randn(len(indices), IN)
    y0 = torch.randn(len(indices), sum(SLICES))
    y = y0.clone()
    assert grouped.fused_add_lora_linear(y, x, a, b, 0.5, SLICES, torch.tensor(indices + [0, 0]), {})  # padded
    torch.testing.assert_close(y, y0 + layer_by_token(x, a, b, indices, 0.5))


def test_a_layer_too_big_for_the_dense_block_is_left_to_the_grouped_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = layer_weights()
    monkeypatch.setattr(grouped, "DENSE_MAX_BLOCK_ELEMENTS", SLOTS * len(SLICES) * RANK * sum(SLICES) - 1)
    y = torch.zeros(4, sum(SLICES))
    assert not grouped.fused_add_lora_linear(y, torch.randn(4, IN), a, b, 1.0, SLICES, torch.tensor([0, 1, 2, -1]), {})
    assert not y.any()


def test_a_long_step_of_scattered_adapters_is_left_to_the_grouped_ops() -> None:
    a, b = layer_weights()
    indices = [t % SLOTS for t in range(grouped.DENSE_UP_TO_TOKENS + 1)]
    y = torch.zeros(len(indices), sum(SLICES))
    assert not grouped.fused_add_lora_linear(y, torch.randn(len(indices), IN), a, b, 1.0, SLICES,
                                             torch.tensor(indices), {})  # fmt: skip
    assert not y.any()


def test_the_fused_layer_follows_an_adapter_loaded_into_a_slot_after_its_weights_were_laid_out() -> None:
    a, b = layer_weights()
    cache: dict = {}
    indices = [1, 0, 1]
    x = torch.randn(3, IN)
    grouped.fused_add_lora_linear(torch.zeros(3, sum(SLICES)), x, a, b, 1.0, SLICES, torch.tensor(indices), cache)
    a[0][1].normal_()  # vLLM copies a new adapter into the stacked weights in place
    b[2][1].zero_()
    y = torch.zeros(3, sum(SLICES))
    grouped.fused_add_lora_linear(y, x, a, b, 1.0, SLICES, torch.tensor(indices), cache)
    torch.testing.assert_close(y, layer_by_token(x, a, b, indices, 1.0))


@pytest.mark.parametrize(("prefill", "scattered"), [(False, True), (True, False), (True, True)],
                         ids=["decode: dense", "prefill: runs", "scattered prefill: grouped ops"])  # fmt: skip
def test_vllms_cpu_wrapper_with_the_ops_installed_gives_each_token_its_own_delta(
    monkeypatch: pytest.MonkeyPatch, prefill: bool, scattered: bool
) -> None:
    """vLLM's CPU punica wrapper, fed a real step mapping, with the gateway's ops installed as the
    engine has them, on each of its paths."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    for module_name in grouped.OP_MODULES:  # restored after the test
        module = __import__(module_name, fromlist=["_"])
        for op in grouped.OPS:
            monkeypatch.setattr(module, op, getattr(module, op))
    monkeypatch.setattr(PunicaWrapperCPU, "add_lora_linear", PunicaWrapperCPU.add_lora_linear)
    monkeypatch.setenv(grouped.ENV_FLAG, "1")
    grouped.register()

    a, b = layer_weights()
    tokens = grouped.DENSE_UP_TO_TOKENS + 8 if prefill else 8
    slot_ids = [7, 8, 9]  # the engine's adapter ids, by slot
    # slots -1, 0, 1, 2 in turn, or a prompt's tokens side by side
    indices = [(t % 4 if scattered else t * 4 // tokens) - 1 for t in range(tokens)]
    wrapper = PunicaWrapperCPU(max_num_batched_tokens=256, max_batches=256, device="cpu")
    mapping = LoRAMapping(tuple(slot_ids[i] if i >= 0 else 0 for i in indices), (), is_prefill=prefill)
    wrapper.update_metadata(mapping, slot_ids, max_loras=SLOTS, vocab_size=32)
    assert wrapper.token_lora_indices.tolist() == indices

    x = torch.randn(tokens, IN)
    y0 = torch.randn(tokens, sum(SLICES))
    y = y0.clone()
    wrapper.add_lora_linear(y, x, a, b, 0.5, SLICES)
    took_fused_path = bool(wrapper.__dict__.get("_lora_gateway_fused_weights"))
    assert took_fused_path is not (prefill and scattered)
    torch.testing.assert_close(y, y0 + layer_by_token(x, a, b, indices, 0.5))
