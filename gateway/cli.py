"""`lora-gateway`: serve, adapters, keys, dev make-model, bench (serve, load, fairness, swap, route, ...), demo."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _serve(args: list[str]) -> int:
    import uvloop  # vLLM's own dependency, and its server's event loop: a faster loop for the hot path
    from pydantic_settings import CliApp

    from gateway.server import serve
    from gateway.settings import ServeSettings

    settings = CliApp.run(ServeSettings, cli_args=args)
    return uvloop.run(serve(settings))


def _make_model(args: list[str]) -> int:
    from gateway.dev.models import BASES, make_model
    from gateway.dev.smollm2 import ModelPackageMissing

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


BENCHMARKS = ("serve", "load", "fairness", "swap", "scale", "rank", "compare", "soak", "ops", "route")


def _bench(args: list[str]) -> int:
    if args[:1] and args[0] in BENCHMARKS:
        import importlib

        # One module per benchmark, imported only when run: most pull in vLLM or matplotlib.
        return int(importlib.import_module(f"gateway.bench.{args[0]}").main(args[1:]))
    print(f"usage: lora-gateway bench {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
    return 2


def _demo(args: list[str]) -> int:
    from gateway.demo import main as demo

    return demo(args)


def _adapters(args: list[str]) -> int:
    from adapters_manifest.cli import main as adapters

    return adapters(args)


def _keys(args: list[str]) -> int:
    from gateway.auth.cli import main as keys

    return keys(args)


COMMANDS = {
    "serve": _serve,
    "adapters": _adapters,
    "keys": _keys,
    "dev": lambda args: _make_model(args[1:]) if args[:1] == ["make-model"] else _usage(),
    "bench": _bench,
    "demo": _demo,
}


def _usage() -> int:
    commands = "serve,adapters,keys,dev make-model,bench " + "|".join(BENCHMARKS) + ",demo"
    print(f"usage: lora-gateway {{{commands}}} ...", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        return _usage()
    # The server logs its work; the other commands print their results and log only trouble.
    if argv[0] == "serve":  # JSON lines with the trace and span ids of each record
        from gateway.telemetry.logs import configure_json_logging

        configure_json_logging(logging.INFO)
    else:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return COMMANDS[argv[0]](argv[1:])
