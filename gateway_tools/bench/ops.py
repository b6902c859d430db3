"""`lora-gateway bench ops`: where a LoRA step's time goes on the CPU, vLLM's CPU LoRA path
against the gateway's, on one model's shapes.

One engine step's LoRA work is, per decoder layer and per LoRA-wrapped linear layer, one call of
vLLM's CPU punica wrapper (`add_lora_linear`: a shrink, tokens x A, and an expand, x B, per output
slice) over the stacked weights of every engine slot (padded to `--max-lora-rank`). The bench
feeds a real wrapper a real step mapping, once with vLLM's ops and once with the gateway's
installed as its engines have them, on the same inputs: `--tokens` tokens from `--sequences`
sequences (one token each for a decode step; a prefill gives each its prompt's tokens side by
side), the sequences' adapters N in turn, `--base-share` of the sequences without one; timed
interleaved, `--repeats` times each, one thread per core as the engine uses them. The table gives
the LoRA time per step (all layers) for each, and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway_tools.bench.report import config_of, markdown_table, write_json

# The linear layers vLLM wraps in a Llama block: (name, input features, output slices) as
# functions of hidden size h, intermediate size i, query heads q, KV heads kv, head dim d.
LAYERS: dict[str, Callable[[dict[str, int]], tuple[int, tuple[int, ...]]]] = {
    "qkv_proj": lambda c: (c["h"], (c["q"] * c["d"], c["kv"] * c["d"], c["kv"] * c["d"])),
    "o_proj": lambda c: (c["q"] * c["d"], (c["h"],)),
    "gate_up_proj": lambda c: (c["h"], (c["i"], c["i"])),
    "down_proj": lambda c: (c["i"], (c["h"],)),
}


@dataclass(frozen=True)
class Point:
    tokens: int
    adapters: int  # distinct adapters among the tokens
    base_share: float
    vllm_ms: float  # one step's LoRA time, every layer, median of repeats
    gateway_ms: float

    @property
    def speedup(self) -> float:
        return self.vllm_ms / self.gateway_ms


def shapes_of(model: Path) -> dict[str, int]:
    import json

    config = json.loads((model / "config.json").read_text())
    heads = config["num_attention_heads"]
    return {
        "h": config["hidden_size"],
        "i": config["intermediate_size"],
        "q": heads,
        "kv": config.get("num_key_value_heads", heads),
        "d": config.get("head_dim") or config["hidden_size"] // heads,
        "layers": config["num_hidden_layers"],
    }


def _step(wrapper: object, layers: list[tuple], x: dict[int, object]) -> None:
    import torch

    for in_features, slices, a_stacked, b_stacked in layers:
        tokens = x[in_features]
        y = torch.zeros(tokens.shape[0], sum(slices))
        wrapper.add_lora_linear(y, tokens, a_stacked, b_stacked, 1.0, slices)


def step_slots(tokens: int, sequences: int, adapters: int, base_share: float) -> list[int]:
    """Each token's adapter slot (-1: none): sequences' tokens side by side, their adapters in turn."""
    sequences = min(sequences, tokens)
    base = round(sequences * base_share)
    slots = [-1] * base + [k % adapters for k in range(sequences - base)]
    return [slots[t * sequences // tokens] for t in range(tokens)]


@contextlib.contextmanager
def _lora_path(gateways: bool) -> Iterator[None]:
    """vLLM's CPU LoRA path as vLLM ships it, or with the gateway's ops installed over it."""
    import importlib

    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from gateway.engine import cpu_lora_ops

    modules = [importlib.import_module(name) for name in cpu_lora_ops.OP_MODULES]
    saved = [(module, op, getattr(module, op)) for module in modules for op in cpu_lora_ops.OPS]
    saved.append((PunicaWrapperCPU, "add_lora_linear", PunicaWrapperCPU.add_lora_linear))
    if gateways:
        cpu_lora_ops.install()
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def measure(shapes: dict[str, int], opts: argparse.Namespace, tokens: int, adapters: int) -> Point:
    import torch
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    generator = torch.Generator().manual_seed(0)
    slots = max(opts.max_loras, adapters)
    layers = []
    for name in opts.layers:
        in_features, slices = LAYERS[name](shapes)
        a = tuple(torch.randn(slots, 1, opts.max_lora_rank, in_features, generator=generator) for _ in slices)
        b = tuple(torch.randn(slots, 1, size, opts.max_lora_rank, generator=generator) for size in slices)
        layers.append((in_features, slices, a, b))
    layers *= shapes["layers"]
    x = {n: torch.randn(tokens, n, generator=generator) for n in {layer[0] for layer in layers}}
    slot_ids = list(range(1, slots + 1))  # the engine's adapter ids, by slot
    indices = step_slots(tokens, opts.sequences, adapters, opts.base_share)
    mapping = LoRAMapping(tuple(slot_ids[s] if s >= 0 else 0 for s in indices), (), is_prefill=tokens > opts.sequences)
    times: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(opts.repeats + 1):  # the first round warms up
        for gateways in times:
            wrapper = PunicaWrapperCPU(max_num_batched_tokens=tokens, max_batches=opts.sequences, device="cpu")
            wrapper.update_metadata(mapping, slot_ids, max_loras=slots, vocab_size=32)
            with _lora_path(gateways):
                started = time.perf_counter()
                _step(wrapper, layers, x)
                elapsed = time.perf_counter() - started
            if repeat:
                times[gateways].append(elapsed)
    return Point(tokens, adapters, opts.base_share, 1000 * statistics.median(times[False]),
                 1000 * statistics.median(times[True]))  # fmt: skip


def render(points: list[Point], model: str, rank: int) -> str:
    rows = [[str(p.tokens), str(p.adapters), f"{p.base_share:.0%}", f"{p.vllm_ms:.1f}", f"{p.gateway_ms:.1f}",
             f"{p.speedup:.1f}x"] for p in points]  # fmt: skip
    header = [
        "tokens in the step",
        "adapters",
        "sequences without one",
        "vLLM's path (ms)",
        "the gateway's (ms)",
        "speedup",
    ]
    return f"LoRA time per engine step, every layer of {model}, max rank {rank}:\n\n" + markdown_table(header, rows)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lora-gateway bench ops", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--base", default="smollm2", help="tiny, smollm2 or a model folder: the shapes")
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[16, 128])
    p.add_argument("--adapters", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--sequences", type=int, default=16, help="sequences in the step")
    p.add_argument("--base-share", type=float, default=0.25, help="share of the sequences without an adapter")
    p.add_argument("--max-loras", type=int, default=4, help="engine slots (at least the adapters in a step)")
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--layers", type=lambda s: s.split(","), default=list(LAYERS), help="LoRA-wrapped layers")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("artifacts/bench-ops.json"))
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    import tempfile

    import torch

    from gateway_tools.dev.models import BASES, make_model

    opts = _parse(argv)
    torch.set_num_threads(torch.get_num_threads())  # as the engine: one thread per core
    if opts.base in BASES:
        with tempfile.TemporaryDirectory() as tmp:
            shapes = shapes_of(make_model(Path(tmp), [], base=opts.base).base)
    else:
        shapes = shapes_of(Path(opts.base))
    points = [measure(shapes, opts, tokens, n) for tokens in opts.tokens for n in opts.adapters]
    table = render(points, opts.base, opts.max_lora_rank)
    print(table)
    write_json(opts.out, {"config": config_of(opts), "shapes": shapes,
                          "points": [asdict(p) | {"speedup": p.speedup} for p in points]})  # fmt: skip
    return 0
