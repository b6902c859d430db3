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
