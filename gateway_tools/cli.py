"""The tooling commands: `lora-gateway dev make-model`, `lora-gateway bench NAME`, `lora-gateway demo`."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCHMARKS = ("serve", "load", "fairness", "swap", "scale", "rank", "compare", "soak", "ops", "route")


def make_model(args: list[str]) -> int:
    from gateway_tools.dev.models import BASES, make_model
    from gateway_tools.dev.smollm2 import ModelPackageMissing

    parser = argparse.ArgumentParser(
        prog="lora-gateway dev make-model",
        description="Build a base model (the tiny random one, or SmolLM2-135M-Instruct from its PyPI wheel) "
        "and seeded random adapters into OUT/base and OUT/store, offline.",
    )
    parser.add_argument("out", type=Path, help="folder to write base/ and store/ into")
    parser.add_argument("--base", choices=BASES, default="tiny", help="which base model (default: tiny)")
    parser.add_argument("--adapters", default="alice/chat,bob/chat", help="comma-separated owner/name list")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the adapters")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights' dtype")
    opts = parser.parse_args(args)
    refs = [ref.strip() for ref in opts.adapters.split(",") if ref.strip()]
    try:
        made = make_model(opts.out, refs, rank=opts.rank, base=opts.base, dtype=opts.dtype)
    except (ModelPackageMissing, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"base model: {made.base} (serve it as {made.served_name})")
    print(f"store:      {made.store}")
    for record in made.adapters:
        print(f"adapter:    {record.ref} version {record.version} rank {record.rank}")
    return 0


def bench(args: list[str]) -> int:
    if args[:1] and args[0] in BENCHMARKS:
        # One module per benchmark, imported only when run: most pull in vLLM or matplotlib.
        return int(importlib.import_module(f"gateway_tools.bench.{args[0]}").main(args[1:]))
    print(f"usage: lora-gateway bench {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
    return 2


def demo(args: list[str]) -> int:
    from gateway_tools.demo import main

    return main(args)


def dev(args: list[str]) -> int:
    if args[:1] == ["make-model"]:
        return make_model(args[1:])
    print("usage: lora-gateway dev make-model OUT [options]", file=sys.stderr)
    return 2
