"""`lora-gateway train`: train a LoRA adapter on a JSONL dataset, then optionally publish it to a store."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from adapter_training.dataset import DatasetError
from adapters_manifest.cli import record_fields, store_option, upload, upload_options
from adapters_manifest.open_store import open_store
from adapters_manifest.store import StoreUnavailableError
from adapters_manifest.validation import AdapterValidationError


def _parser() -> argparse.ArgumentParser:
    train = argparse.ArgumentParser(
        prog="lora-gateway train",
        parents=[store_option(), upload_options(required=False)],
        description='Train a PEFT LoRA adapter. DATA is JSON lines of {"prompt", "completion"} or chat '
        '{"messages": [{"role", "content"}, ...]}; the loss is on the completion (assistant) tokens only.',
    )
    train.add_argument("data", type=Path, help="the dataset (JSONL)")
    train.add_argument("--base", type=Path, required=True, help="base model folder (Hugging Face layout)")
    train.add_argument("--out", type=Path, required=True, help="folder the adapter is written to")
    train.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8; at most the gateway's max rank)")
    train.add_argument("--alpha", type=float, help="LoRA alpha (default: 2 x rank)")
    train.add_argument(
        "--target-modules",
        nargs="+",
        default=[],
        metavar="MODULE",
        help="e.g. q_proj v_proj (default: every linear layer)",
    )
    train.add_argument(
        "--epochs",
        type=int,
        help="passes over the data (default: from the data: at least 3 passes and 500 steps, "
        "stopping once every target token is learned)",
    )
    train.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: 2e-3)")
    train.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    train.add_argument("--seed", type=int, default=0, help="same data + seed + machine = the same adapter (default: 0)")
    train.add_argument("--eval", type=Path, metavar="FILE", help="held-out JSONL: report the adapter's loss on it")
    train.add_argument("--push", action="store_true", help="then publish it to --store as --owner/--name")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    return train


def main(argv: list[str]) -> int:
    """Train (torch and PEFT imported only here), then optionally publish like `adapters push` does."""
    opts = _parser().parse_args(argv)
    if opts.push and not (opts.owner and opts.name):
        print("error: --push needs --owner and --name", file=sys.stderr)
        return 2
    try:
        if opts.push:  # names, routes and store checked before minutes of training, not after
            record_fields(opts)
            store = open_store(opts.store)
        if opts.max_lora_rank is not None and opts.rank > opts.max_lora_rank:
            raise ValueError(f"--rank {opts.rank} exceeds --max-lora-rank {opts.max_lora_rank}")
        from adapter_training.trainer import TrainingOptions, train_adapter

        options = TrainingOptions(
            rank=opts.rank,
            alpha=opts.alpha,
            target_modules=tuple(opts.target_modules),
            epochs=opts.epochs,
            lr=opts.lr,
            batch_size=opts.batch_size,
            seed=opts.seed,
        )
        result = train_adapter(opts.data, opts.base, opts.out, options, progress=not opts.quiet, eval_data=opts.eval)
        first, last = result.epochs[0], result.epochs[-1]
        print(
            f"trained {opts.out} on {result.examples} examples ({result.target_tokens} target tokens): "
            f"{len(result.epochs)} epochs, {result.steps} steps in {result.seconds:.1f} s; loss {first.loss:.3f} "
            f"(first epoch) -> {last.loss:.3f} (final); {last.accuracy:.0%} of target tokens predicted"
        )
        if result.held_out is not None:
            print(
                f"held out ({opts.eval}): loss {result.held_out.loss:.3f}, "
                f"{result.held_out.accuracy:.0%} of target tokens predicted"
            )
        if warning := result.convergence_warning():
            print(f"warning: {warning}", file=sys.stderr)
        if opts.push:
            opts.model = opts.model or opts.base  # check modules and shapes against the base it trained on
            record = asyncio.run(upload(store, opts.out, opts))
            print(f"pushed {record.ref} version {record.version} to {store.url}")
        return 0
    except DatasetError as exc:
        print(exc, file=sys.stderr)  # FILE:LINE: what is wrong
        return 2
    except (AdapterValidationError, ValueError) as exc:  # TrainingError too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (StoreUnavailableError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
