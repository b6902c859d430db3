"""`lora-gateway bench compare`: the base model and each adapter, side by side.

Through one gateway, per model: its first request (for an adapter: fetched, validated and loaded
into the engine) against the same request warm, the host memory its load added, and its speed
alone (a stream of greedy requests naming only it); then the same prompts through every model: a
table of prompt x model, and a plot of how many of each adapter's tokens agree with the base
model's (position by position): what each adapter changes. By default a dev base (`tiny`, or
`smollm2`) with seeded adapters made offline; `--base DIR --store URL --adapters owner/name,...`
compares a real model's adapters from a store.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from gateway_tools.bench.harness import (
    Client,
    add_model_options,
    admin_key,
    base_model,
    bench_work_dir,
    gateway_server,
    progress,
    publish_synthetic,
    running,
    stream_stats,
    tree_rss_bytes,
    write_report,
)
from gateway_tools.bench.report import RequestStats, config_of, flat_json, markdown_table
from gateway_tools.bench.scale import run_stream
from gateway_tools.dev.models import BASES

DEFAULT_PROMPTS = ("def parse(value):", "import os\n", "The capital of France is", "Once upon a time,")
SHOWN_CHARS = 60


@dataclass(frozen=True)
class Completion:
    prompt: str
    model: str
    text: str
    token_ids: list[int]
    error: str = ""
    dtype: str = ""  # the engine's


@dataclass(frozen=True)
class ModelCost:
    """One model served alone: what its first use costs and how fast it runs."""

    model: str
    first_s: float  # the first request, load included for an adapter
    warm_s: float  # the same request again, the adapter resident
    rss_added_bytes: int  # host memory (gateway + engine) the first request added
    stream: RequestStats  # a stream naming only this model
    errors: int  # the stream's, the first and the warm request's that failed
    dtype: str = ""

    @property
    def load_s(self) -> float:
        return self.first_s - self.warm_s


# -- pure helpers (unit-tested) ---------------------------------------------------------


def agreement(ids: Sequence[int], base_ids: Sequence[int]) -> float:
    """The fraction of positions where two completions have the same token (the longer one counts)."""
    length = max(len(ids), len(base_ids))
    return sum(a == b for a, b in zip(ids, base_ids)) / length if length else 1.0


def shown(text: str) -> str:
    """A completion as one table cell: escaped (newlines, control bytes), pipes too, and shortened."""
    cell = repr(text)[1:-1].replace("|", "\\|")
    return cell if len(cell) <= SHOWN_CHARS else cell[: SHOWN_CHARS - 1] + "…"


def render(completions: Sequence[Completion], base_name: str) -> str:
    """Prompt x model (x dtype): each completion, the share of its tokens equal to its base model's
    (same dtype), and with several dtypes the share equal to the same model's in the first dtype."""
    by = {(c.prompt, c.model, c.dtype): c for c in completions}
    dtypes = list(dict.fromkeys(c.dtype for c in completions))
    rows = []
    for c in completions:
        base = by[c.prompt, base_name, c.dtype]
        same = "" if c.model == base_name else f"{agreement(c.token_ids, base.token_ids):.0%}"
        row = [shown(c.prompt), c.model, *([c.dtype] if len(dtypes) > 1 else []), c.error or shown(c.text), same]
        if len(dtypes) > 1:
            row.append(f"{agreement(c.token_ids, by[c.prompt, c.model, dtypes[0]].token_ids):.0%}")
        rows.append(row)
    columns = ["prompt", "model", "completion (greedy)", "tokens as base"]
    if len(dtypes) > 1:
        columns[2:2] = ["dtype"]
        columns.append(f"tokens as {dtypes[0]}")
    return markdown_table(columns, rows, text_columns=len(columns) - 1 - (len(dtypes) > 1))


def render_costs(costs: Sequence[ModelCost]) -> str:
    base = {c.dtype: c.stream for c in costs if c.model == costs[0].model}
    rows = [
        [c.model, c.dtype, f"{c.first_s * 1000:.0f}", f"{c.warm_s * 1000:.0f}",
         "" if c.model == costs[0].model else f"{c.load_s * 1000:.0f}", f"{c.rss_added_bytes / 2**20:+.1f}",
         f"{c.stream.tokens_per_s:.1f}", f"{c.stream.tokens_per_s / base[c.dtype].tokens_per_s:.2f}x",
         f"{c.stream.tokens_per_s / costs[0].stream.tokens_per_s:.2f}x", f"{c.stream.p50_s:.2f}", str(c.errors)]
        for c in costs
    ]  # fmt: skip
    return markdown_table(["model", "dtype", "first request (ms)", "warm (ms)", "load (ms)", "host RSS added (MiB)",
                           "tokens/s alone", "vs base", f"vs base in {costs[0].dtype}", "p50 (s)", "errors"],
                          rows, text_columns=2)  # fmt: skip


def plot(completions: Sequence[Completion], base_name: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    prompts = list(dict.fromkeys(c.prompt for c in completions))
    rows = [m for m in dict.fromkeys((c.model, c.dtype) for c in completions) if m[0] != base_name]
    by = {(c.prompt, c.model, c.dtype): c for c in completions}
    grid = [[agreement(by[p, m, d].token_ids, by[p, base_name, d].token_ids) for p in prompts] for m, d in rows]
    several_dtypes = len({d for _, d in rows}) > 1
    models = [f"{m} ({d})" if several_dtypes else m for m, d in rows]
    fig, ax = plt.subplots(figsize=(1.8 * len(prompts) + 3, 0.6 * len(models) + 2))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(prompts)), [shown(p)[:20] for p in prompts], rotation=20)
    ax.set_yticks(range(len(models)), models)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0%}", ha="center", va="center", color="white" if value < 0.6 else "black")
    fig.colorbar(image, label="tokens equal to the base model's")
    ax.set_title("What each adapter changes (greedy, same prompts)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- measurement ------------------------------------------------------------------------


async def _costs(
    opts: argparse.Namespace, url: str, api_key: str, pid: int, models: Sequence[str], dtype: str
) -> list[ModelCost]:
    """Per model, one after the other: first and warm request, memory, then a stream naming only it."""
    costs = []
    async with Client(url, api_key, connections=opts.concurrency) as client:
        await run_stream(client, [models[0]], opts.concurrency, opts.concurrency, opts.max_tokens, seed=0)  # warm-up
        for model in models:
            rss_before = tree_rss_bytes(pid)
            first = await client.complete(model, opts.prompt_list[0], 1, stream=False)
            rss_after = tree_rss_bytes(pid)
            warm = await client.complete(model, opts.prompt_list[0], 1, stream=False)
            done, duration = await run_stream(client, [model], opts.requests, opts.concurrency, opts.max_tokens, 1)
            stream = stream_stats(done, duration)
            costs.append(ModelCost(model, first.latency_s, warm.latency_s, rss_after - rss_before, stream,
                                   stream.errors + (not first.ok) + (not warm.ok), dtype))  # fmt: skip
            progress(
                f"{model} ({dtype}): first request {first.latency_s * 1000:.0f} ms, {stream.tokens_per_s:.1f} tokens/s"
            )
    return costs


async def _complete_all(url: str, api_key: str, prompts: Sequence[str], models: Sequence[str],
                        max_tokens: int, dtype: str) -> list[Completion]:  # fmt: skip
    async with Client(url, api_key) as client:

        async def one(prompt: str, model: str) -> Completion:
            timed = await client.complete(model, prompt, max_tokens, stream=False, ids=True)
            error = "" if timed.ok else f"error {timed.status} {timed.error}"
            return Completion(prompt, model, timed.text, timed.token_ids, error, dtype)

        return list(await asyncio.gather(*(one(p, m) for p in prompts for m in models)))


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lora-gateway bench compare", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    add_model_options(p, "compare")
    p.add_argument("--store", help="adapter store with --base: s3://bucket/prefix, file:///path or a path")
    p.add_argument("--adapters", default="alice/chat,bob/chat,carol/code", help="comma-separated owner/name")
    p.add_argument("--prompts", default="\x1f".join(DEFAULT_PROMPTS),
                   help="prompts separated by the unit separator \\x1f (or use --prompt, repeatable)")  # fmt: skip
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; replaces the defaults)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--requests", type=int, default=24, help="requests of each model's speed stream")
    p.add_argument("--concurrency", type=int, default=8, help="of each model's speed stream")
    p.add_argument("--dtypes", help="comma-separated engine dtypes to run one after the other, e.g. float32,bfloat16")
    opts = p.parse_args(argv)
    if opts.dtypes and opts.dtype:
        p.error("--dtype or --dtypes, not both")
    if opts.store is not None and opts.base in BASES:
        p.error("--store goes with --base DIR (a dev base makes its own adapters)")
    if not [r for r in opts.adapters.split(",") if r.strip()]:
        p.error("--adapters names at least one adapter")
    opts.prompt_list = opts.prompt or [x for x in opts.prompts.split("\x1f") if x]
    return opts


def main(argv: list[str]) -> int:
    opts = _parse(argv)
    refs = [r.strip() for r in opts.adapters.split(",") if r.strip()]
    with bench_work_dir("compare") as work:
        model = base_model(opts, work)
        store = opts.store
        if store is None:
            progress(f"publishing {len(refs)} seeded adapters")
            store = str(work / "store")
            asyncio.run(publish_synthetic(store, model, refs, 8, work))
        keys_file, api_key = admin_key(work)
        models = [model.served_name, *refs]
        dtypes = opts.dtypes.split(",") if opts.dtypes else [model.dtype]
        costs, completions = [], []
        for dtype in dtypes:  # one engine at a time, each dtype from a fresh start
            server = gateway_server(replace(model, dtype=dtype), store, keys_file,
                                    opts.out / "logs" / f"gateway-{dtype}.log", kv_cache_gib=opts.kv_cache_gib,
                                    max_loras=len(refs), max_cpu_loras=len(refs),
                                    max_lora_rank=opts.max_lora_rank)  # fmt: skip
            progress(f"gateway starting ({dtype})")
            with running(server, opts.startup_timeout):
                assert server.process is not None
                costs += asyncio.run(_costs(opts, server.base_url, api_key, server.process.pid, models, dtype))
                completions += asyncio.run(_complete_all(server.base_url, api_key, opts.prompt_list, models,
                                                         opts.max_tokens, dtype))  # fmt: skip
    completions.sort(key=lambda c: (opts.prompt_list.index(c.prompt), models.index(c.model), dtypes.index(c.dtype)))
    report = {"config": config_of(opts), "model": str(model.path),
              "costs": [flat_json(c, "tokens_per_s", "p50_s") | {"load_s": c.load_s} for c in costs],
              "completions": [asdict(c) for c in completions]}  # fmt: skip
    table = render_costs(costs) + "\n\n" + render(completions, model.served_name)
    write_report(opts.out, "compare", report, table, lambda path: plot(completions, model.served_name, path))
    return 1 if any(c.error for c in completions) or any(c.errors for c in costs) else 0
