"""`lora-gateway bench rank`: what an adapter's rank buys in quality and costs in speed and memory.

With `--train`, first one adapter per rank is trained on the same generated dataset (six small
tasks, `--train-rows` rows) and scored on held-out questions of the same tasks: the loss there is
the quality the rank buys. Without it the adapters hold seeded random weights (cost only).
Then one gateway (`--max-lora-rank` the largest rank, room in the engine for every adapter), started
alone. Per rank (8, 16, 64 by default): the host RSS of the gateway and its engine core processes
(GPU memory too where there is a GPU) before and after `--per-rank` adapters of that rank (copies
of the trained one, each its own adapter to the engine) are loaded into the engine, one request
each; then the speed of a stream over `--max-loras` of them (so the stream measures the rank, not
engine loads) next to a base-model stream just before it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.settings import MAX_LORA_RANKS
from gateway_tools.bench.harness import (
    Client,
    add_model_options,
    admin_key,
    base_model,
    bench_work_dir,
    gateway_server,
    gpu_memory_bytes,
    progress,
    publish_copies,
    publish_synthetic,
    running,
    stream_stats,
    tree_rss_bytes,
    write_report,
)
from gateway_tools.bench.report import (
    RequestStats,
    config_of,
    flat_json,
    markdown_table,
    median,
    median_of_rounds,
    ratio_of,
)
from gateway_tools.bench.scale import run_stream

SETTLE_S = 1.0  # after loads, before reading memory: the allocator and the engine settle


def warm_ref(rank: int) -> str:
    return f"bench/warm-r{rank}"


@dataclass(frozen=True)
class Quality:
    """A trained adapter's scores: per target token, on its training data and on held-out questions."""

    train_loss: float
    held_out_loss: float
    held_out_accuracy: float
    training_s: float


@dataclass(frozen=True)
class RankResult:
    rank: int  # 0: the base model
    adapter_bytes: int  # the weights file of one adapter
    loaded: int  # adapters of this rank loaded into the engine
    rss_added_bytes: int
    gpu_added_bytes: int | None
    stream: RequestStats  # the speed stream over --max-loras of them (the base model's: the median of its rounds)
    errors: int  # the stream's and the loading requests' (one per adapter) that failed
    base_tokens_per_s: float = float("nan")  # the base model's, measured just before: the speed's yardstick
    quality: Quality | None = None  # with --train

    @property
    def rss_per_adapter(self) -> float:
        return self.rss_added_bytes / self.loaded if self.loaded else float("nan")

    @property
    def gpu_per_adapter(self) -> float | None:
        return None if self.gpu_added_bytes is None or not self.loaded else self.gpu_added_bytes / self.loaded


# -- pure helpers (unit-tested) ---------------------------------------------------------


def render(results: Sequence[RankResult]) -> str:
    trained = any(r.quality for r in results)
    rows = []
    for r in results:
        quality = _quality_cells(r.quality) if trained else []
        tokens_s, p50 = f"{r.stream.tokens_per_s:.0f}", f"{r.stream.p50_s:.3f}"
        if r.rank == 0:
            rows.append(["base", *quality, "", "", tokens_s, p50, "1.00x", "", "", str(r.errors)])
            continue
        speed = f"{ratio_of(r.stream.tokens_per_s, r.base_tokens_per_s):.2f}x"
        gpu = "n/a (no GPU)" if r.gpu_per_adapter is None else f"{r.gpu_per_adapter / 1024:.0f}"
        rows.append([str(r.rank), *quality, f"{r.adapter_bytes / 1024:.0f}", str(r.loaded), tokens_s, p50, speed,
                     f"{r.rss_per_adapter / 1024:.0f}", gpu, str(r.errors)])  # fmt: skip
    quality_columns = ["held-out loss", "held-out tokens right", "training loss"] if trained else []
    return markdown_table(["rank", *quality_columns, "file (KiB)", "adapters loaded", "tokens/s", "p50 (s)",
                           "vs base (paired)", "host RSS per adapter (KiB)", "GPU per adapter (KiB)", "errors"],
                          rows)  # fmt: skip


def _quality_cells(quality: Quality | None) -> list[str]:
    if quality is None:
        return ["", "", ""]
    return [f"{quality.held_out_loss:.3f}", f"{quality.held_out_accuracy:.0%}", f"{quality.train_loss:.3f}"]


def plot(results: Sequence[RankResult], path: Path) -> None:
    import matplotlib.pyplot as plt

    ranked = [r for r in results if r.rank]
    labels = [str(r.rank) for r in ranked]
    trained = all(r.quality for r in results)
    fig, axes = plt.subplots(1, 3 if trained else 2, figsize=(15 if trained else 10, 4))
    base = next((r for r in results if r.rank == 0), None)
    speed, memory = axes[-2], axes[-1]
    if trained:
        quality = axes[0]
        quality.plot(labels, [r.quality.held_out_loss for r in ranked], "o-", label="held out")  # type: ignore[union-attr]
        quality.plot(labels, [r.quality.train_loss for r in ranked], "s--", label="training")  # type: ignore[union-attr]
        if base is not None and base.quality is not None:
            quality.axhline(base.quality.held_out_loss, color="grey", linestyle="--", label="base model, held out")
        quality.set(xlabel="adapter rank", ylabel="loss per target token", title="Quality", yscale="log")
        quality.legend()
    speed.bar(labels, [r.stream.tokens_per_s for r in ranked])
    if base is not None:
        speed.axhline(base.stream.tokens_per_s, color="grey", linestyle="--", label="base model")
        speed.legend()
    speed.set(xlabel="adapter rank", ylabel="tokens/s", title="Speed")
    memory.bar(labels, [r.rss_per_adapter / 1024 for r in ranked], label="host RSS")
    memory.plot(labels, [r.adapter_bytes / 1024 for r in ranked], "ko--", label="weights file")
    memory.set(xlabel="adapter rank", ylabel="KiB per resident adapter", title="Memory")
    memory.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- measurement ------------------------------------------------------------------------


async def _memory(pid: int) -> tuple[int, int | None]:
    """(host RSS of the gateway's process tree, GPU memory in use), each a median of 3 reads."""
    await asyncio.sleep(SETTLE_S)
    rss, gpu = [], []
    for _ in range(3):
        rss.append(tree_rss_bytes(pid))
        gpu.append(gpu_memory_bytes())
        await asyncio.sleep(0.2)
    gpus = [g for g in gpu if g is not None]
    return int(median(rss)), int(median(gpus)) if gpus else None


async def _measure(
    opts: argparse.Namespace, url: str, api_key: str, pid: int, served: str, refs: dict[int, list[str]],
    sizes: dict[int, int], quality: dict[int, Quality],
) -> list[RankResult]:  # fmt: skip
    results = []
    async with Client(url, api_key, connections=opts.concurrency) as client:

        async def speed(models: list[str]) -> RequestStats:
            await run_stream(client, models, opts.concurrency, opts.concurrency, opts.max_tokens, seed=0)  # warm
            done, duration = await run_stream(client, models, opts.requests, opts.concurrency, opts.max_tokens, 1)
            return stream_stats(done, duration)

        # One adapter of each rank first, unmeasured: the first load's one-time allocations (code paths,
        # buffers) would otherwise count against the first rank's adapters.
        for rank in opts.ranks:
            await client.complete(warm_ref(rank), "x", 1, stream=False)
        bases = []
        for rank in opts.ranks:
            rss_before, gpu_before = await _memory(pid)
            failed = 0
            for ref in refs[rank]:  # one request each: loaded into the engine, and resident after
                failed += 0 if (await client.complete(ref, "x", 1, stream=False)).ok else 1
            rss_after, gpu_after = await _memory(pid)
            bases.append(await speed([served]))  # just before the rank's own: the host's load drifts
            stream = await speed(refs[rank][: opts.max_loras])
            gpu = None if gpu_before is None or gpu_after is None else gpu_after - gpu_before
            results.append(RankResult(rank, sizes[rank], len(refs[rank]) - failed, rss_after - rss_before, gpu,
                                      stream, stream.errors + failed, bases[-1].tokens_per_s,
                                      quality.get(rank)))  # fmt: skip
            progress(f"rank {rank}: {stream.tokens_per_s:.0f} tokens/s (base {bases[-1].tokens_per_s:.0f}), "
                     f"host RSS +{(rss_after - rss_before) / 1024:.0f} KiB for {len(refs[rank]) - failed} "
                     "adapters")  # fmt: skip
    base = RankResult(0, 0, 0, 0, None, median_of_rounds(bases), sum(b.errors for b in bases), quality=quality.get(0))
    return [base, *results]


def _train_each_rank(opts: argparse.Namespace, base: Path, work: Path) -> dict[int, Quality]:
    """One adapter per rank on the same generated rows (same seed, order and steps); 0: the base's scores."""
    from adapter_training.trainer import TrainingOptions, evaluate, train_adapter
    from gateway_tools.bench.tasks import write_task_dataset

    train, held_out = work / "tasks-train.jsonl", work / "tasks-held-out.jsonl"
    write_task_dataset(train, held_out, opts.train_rows, opts.held_out_rows)
    base_train, base_held_out = evaluate(train, base), evaluate(held_out, base)
    quality = {0: Quality(base_train.loss, base_held_out.loss, base_held_out.accuracy, 0.0)}
    progress(f"base model: held-out loss {base_held_out.loss:.3f}")
    for rank in opts.ranks:
        progress(f"training rank {rank} ({opts.train_rows} rows, {opts.train_epochs} epochs)")
        options = TrainingOptions(rank=rank, epochs=opts.train_epochs, seed=0)
        result = train_adapter(train, base, work / "trained" / f"r{rank}", options, progress=False, eval_data=held_out)
        assert result.held_out is not None
        quality[rank] = Quality(result.epochs[-1].loss, result.held_out.loss, result.held_out.accuracy,
                                result.seconds)  # fmt: skip
        progress(f"rank {rank}: held-out loss {result.held_out.loss:.3f} after {result.seconds:.0f} s")
    return quality


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lora-gateway bench rank", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    add_model_options(p, "rank")
    p.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 64])
    p.add_argument("--per-rank", type=int, default=32, help="adapters of each rank loaded (memory per adapter)")
    p.add_argument("--max-loras", type=int, default=4, help="engine slots; the speed stream uses this many adapters")
    p.add_argument("--requests", type=int, default=128, help="measured requests per speed stream")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--train", action="store_true", help="train one adapter per rank; held-out loss is its quality")
    p.add_argument("--train-rows", type=int, default=200, help="generated training rows (with --train)")
    p.add_argument("--held-out-rows", type=int, default=60, help="generated held-out rows (with --train)")
    p.add_argument("--train-epochs", type=int, default=2, help="passes over the training rows (with --train)")
    p.add_argument("--quick", action="store_true", help="ranks 8 and 64, 4 adapters each, 32 requests (for tests)")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.ranks, opts.per_rank, opts.requests, opts.concurrency = [8, 64], 4, 32, 8
    if max(opts.ranks) > MAX_LORA_RANKS[-1] or min(opts.ranks) < 1 or opts.per_rank < opts.max_loras:
        p.error(f"ranks must be within 1..{MAX_LORA_RANKS[-1]}, --per-rank at least --max-loras")
    return opts


def main(argv: list[str]) -> int:
    opts = _parse(argv)
    started = time.monotonic()
    with bench_work_dir("rank") as work:
        model = base_model(opts, work)
        keys_file, api_key = admin_key(work)
        store = str(work / "store")
        refs = {rank: [f"bench/r{rank}-{i:03d}" for i in range(opts.per_rank)] for rank in opts.ranks}
        quality = _train_each_rank(opts, model.path, work) if opts.train else {}
        sizes = {}
        for rank in opts.ranks:
            progress(f"publishing {opts.per_rank} rank-{rank} adapters")
            names = [warm_ref(rank), *refs[rank]]
            if opts.train:
                records = asyncio.run(publish_copies(store, model, work / "trained" / f"r{rank}", names))
            else:
                records = asyncio.run(publish_synthetic(store, model, names, rank, work))
            sizes[rank] = next(f.size for f in records[0].record.files if f.name.endswith(".safetensors"))
        loaded = (opts.per_rank + 1) * len(opts.ranks)  # every adapter stays resident: memory adds up
        max_rank = min(r for r in MAX_LORA_RANKS if r >= max(opts.ranks))
        server = gateway_server(model, store, keys_file, opts.out / "logs" / "gateway.log",
                                kv_cache_gib=opts.kv_cache_gib, max_loras=opts.max_loras, max_cpu_loras=loaded,
                                max_lora_rank=max_rank)  # fmt: skip
        progress("gateway starting")
        with running(server, opts.startup_timeout):
            assert server.process is not None
            results = asyncio.run(_measure(opts, server.base_url, api_key, server.process.pid, model.served_name,
                                           refs, sizes, quality))  # fmt: skip
    report = {"config": config_of(opts), "model": str(model.path), "duration_s": time.monotonic() - started,
              "results": [flat_json(r, "tokens_per_s", "p50_s") | {"rss_per_adapter_bytes": r.rss_per_adapter,
                          "gpu_per_adapter_bytes": r.gpu_per_adapter} for r in results]}  # fmt: skip
    write_report(opts.out, "rank", report, render(results), lambda path: plot(results, path))
    return 1 if any(r.errors for r in results) else 0
