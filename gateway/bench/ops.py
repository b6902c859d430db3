"""`lora-gateway bench ops`: where a LoRA step's time goes on the CPU, vLLM's torch ops against the
gateway's grouped ones, on one model's shapes.

One engine step's LoRA work is, per decoder layer and per LoRA-wrapped linear layer, a shrink
(tokens x A) and an expand (x B) per output slice, over the stacked weights of every engine slot
(padded to `--max-lora-rank`). Both implementations get the same inputs: `--tokens` tokens (a
decode step of that many sequences, or a prefill chunk), spread over N adapters in turn, with
`--base-share` of them carrying no adapter; timed interleaved, `--repeats` times each, one thread
per core as the engine uses them. The table gives the LoRA time per step (all layers) for each,
and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.bench.report import config_of, markdown_table, write_json

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
    grouped_ms: float

    @property
    def speedup(self) -> float:
        return self.vllm_ms / self.grouped_ms


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


def _step(ops: dict[str, Callable[..., None]], layers: list[tuple], x: dict[int, object], indices: object) -> None:
    """One step's LoRA work as vLLM's punica wrapper does it (add_lora_linear: shrink, then expand)."""
    import torch

    for in_features, slices, a_stacked, b_stacked in layers:
        tokens = x[in_features]
        rank = a_stacked[0].shape[2]
        buffers = [torch.zeros(tokens.shape[0], rank) for _ in slices]
        for buffer, a in zip(buffers, a_stacked):
            ops["bgmv_shrink"](tokens, a, buffer, indices, 1.0)
        y = torch.zeros(tokens.shape[0], sum(slices))
        offset = 0
        for buffer, b, size in zip(buffers, b_stacked, slices):
            ops["bgmv_expand_slice"](buffer, b, y, indices, offset, size, True)
            offset += size


def measure(shapes: dict[str, int], opts: argparse.Namespace, tokens: int, adapters: int) -> Point:
    import torch
    from vllm.lora.ops.torch_ops import lora_ops

    from gateway.engine import cpu_lora_ops

    generator = torch.Generator().manual_seed(0)
    slots = max(opts.max_loras, adapters)
    layers = []
    for name in opts.layers:
        in_features, slices = LAYERS[name](shapes)
        a = [torch.randn(slots, 1, opts.max_lora_rank, in_features, generator=generator) for _ in slices]
        b = [torch.randn(slots, 1, size, opts.max_lora_rank, generator=generator) for size in slices]
        layers.append((in_features, slices, a, b))
    layers *= shapes["layers"]
    x = {n: torch.randn(tokens, n, generator=generator) for n in {layer[0] for layer in layers}}
    base = round(tokens * opts.base_share)
    indices = torch.tensor([-1] * base + [t % adapters for t in range(tokens - base)])
    implementations = {
        "vllm": {op: getattr(lora_ops, op) for op in cpu_lora_ops.OPS},
        "grouped": cpu_lora_ops.GROUPED,
    }
    times: dict[str, list[float]] = {name: [] for name in implementations}
    for repeat in range(opts.repeats + 1):  # the first round warms up
        for name, ops in implementations.items():
            started = time.perf_counter()
            _step(ops, layers, x, indices)
            if repeat:
                times[name].append(time.perf_counter() - started)
    return Point(tokens, adapters, opts.base_share, 1000 * statistics.median(times["vllm"]),
                 1000 * statistics.median(times["grouped"]))  # fmt: skip


def render(points: list[Point], model: str, rank: int) -> str:
    rows = [[str(p.tokens), str(p.adapters), f"{p.base_share:.0%}", f"{p.vllm_ms:.1f}", f"{p.grouped_ms:.1f}",
             f"{p.speedup:.1f}x"] for p in points]  # fmt: skip
    header = ["tokens in the step", "adapters", "tokens without one", "vLLM's ops (ms)", "grouped ops (ms)", "speedup"]
    return f"LoRA time per engine step, every layer of {model}, max rank {rank}:\n\n" + markdown_table(header, rows)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lora-gateway bench ops", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--base", default="smollm2", help="tiny, smollm2 or a model folder: the shapes")
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[16, 128])
    p.add_argument("--adapters", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--base-share", type=float, default=0.25, help="share of the tokens without an adapter")
    p.add_argument("--max-loras", type=int, default=4, help="engine slots (at least the adapters in a step)")
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--layers", type=lambda s: s.split(","), default=list(LAYERS), help="LoRA-wrapped layers")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("artifacts/bench-ops.json"))
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    import tempfile

    import torch

    from gateway.dev.models import BASES, make_model

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
