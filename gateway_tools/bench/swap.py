"""`lora-gateway bench swap`: how fast a user's adapter comes in, as time to first token, per tier.

One gateway on an S3 store (moto on loopback), `--max-loras 1` (vLLM's active slots: 1 for users,
plus the gateway's zero adapter for the base) and `--max-cpu-loras 4` (the engine's CPU cache,
mirrored by the gateway's pool). Each repeat times, sequentially, one streamed greedy request
whose adapter is:

- running: used by the request just before, so in one of vLLM's active slots;
- cpu cache: registered in the engine (confirmed in /admin/resident) but pushed out of the
  active slots by two other adapters since its last use: vLLM copies it into a slot;
- disk: on the gateway's disk cache only, evicted from the engine by 4 other adapters
  (confirmed absent from /admin/resident): validation and `add_lora` first;
- store: never requested before: fetched from S3, verified, validated, registered;
- base: the base model (through the gateway's always-registered zero adapter).

Next to them, in the same run, a full base-model reload: a gateway process started from nothing
until its first token (every start of the run is one sample). Medians over the repeats; the
targets: running TTFT <= 1.05x base, and an engine-CPU-cache swap adds <= 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway_tools.bench.harness import (
    BaseModel,
    Client,
    add_model_options,
    admin_key,
    base_model,
    bench_work_dir,
    gateway_server,
    ms,
    progress,
    publish_synthetic,
    running,
    write_report,
)
from gateway_tools.bench.report import config_of, markdown_table, median, ratio_of
from gateway_tools.bench.s3_process import S3Process

TIERS = ("running", "cpu cache", "disk", "store", "base")
MAX_LORAS = 1  # user adapters per batch: a second adapter pushes the first out of vLLM's active slots
MAX_CPU_LORAS = 4
FILLERS = MAX_CPU_LORAS  # requests for this many other adapters push an adapter out of the engine
PROMPT = "def fibonacci(n):\n"
TARGETS = {"running_vs_base_max": 1.05, "cpu_cache_swap_added_ms_max": 5.0}
BUCKET = "bench-swap"


@dataclass
class Samples:
    ttft_s: dict[str, list[float]] = field(default_factory=lambda: {t: [] for t in TIERS})
    restart_s: list[float] = field(default_factory=list)  # process start -> first token
    tier_checks_failed: list[str] = field(default_factory=list)


# -- pure helpers (unit-tested) ---------------------------------------------------------


def summarize(samples: Samples) -> dict[str, Any]:
    """Medians per tier and of the reload; the ratios the targets name, paired within each repeat:
    a repeat times its tiers back to back, and the host's load drifts over seconds (a neighbour's
    busy phase slows every tier of a repeat alike), so per-repeat ratios cancel it, medians do not."""
    ttft = samples.ttft_s
    med = {tier: median(values) for tier, values in ttft.items()}
    restart = median(samples.restart_s)
    added_ms = {tier: median([(x - r) * 1000 for x, r in zip(ttft[tier], ttft["running"])]) for tier in TIERS}
    return {
        "median_ttft_s": med,
        "restart_to_first_token_s": restart,
        "running_vs_base": median([ratio_of(r, b) for r, b in zip(ttft["running"], ttft["base"])]),
        "added_vs_running_ms": added_ms,
        "cpu_cache_swap_added_ms": added_ms["cpu cache"],
        "restart_vs_cpu_cache_swap": ratio_of(restart, med["cpu cache"]),
    }


def targets_met(summary: dict[str, Any]) -> dict[str, bool]:
    """NaN (nothing measured) fails."""
    return {
        "running_vs_base": summary["running_vs_base"] <= TARGETS["running_vs_base_max"],
        "cpu_cache_swap": summary["cpu_cache_swap_added_ms"] <= TARGETS["cpu_cache_swap_added_ms_max"],
    }


def render(samples: Samples, summary: dict[str, Any]) -> str:
    running = summary["median_ttft_s"]["running"]
    rows = []
    for tier in TIERS:
        values = samples.ttft_s[tier]
        med = summary["median_ttft_s"][tier]
        rows.append([tier, str(len(values)), ms(med), ms(min(values) if values else float("nan")),
                     ms(max(values) if values else float("nan")),
                     f"{summary['added_vs_running_ms'][tier]:+.1f}"])  # fmt: skip
    restart = summary["restart_to_first_token_s"]
    rows.append(["engine restart (process start -> first token)", str(len(samples.restart_s)), ms(restart),
                 ms(min(samples.restart_s, default=float("nan"))), ms(max(samples.restart_s, default=float("nan"))),
                 f"{(restart - running) * 1000:+.0f}"])  # fmt: skip
    met = {k: "met" if v else "MISSED" for k, v in targets_met(summary).items()}
    header = ["adapter is", "n", "TTFT p50 (ms)", "min (ms)", "max (ms)", "vs running (ms, paired p50)"]
    table = markdown_table(header, rows)
    notes = [
        f"running / base TTFT (paired p50): {summary['running_vs_base']:.3f}x "
        f"(target <= {TARGETS['running_vs_base_max']}x: {met['running_vs_base']})",
        f"CPU-cache swap adds {summary['cpu_cache_swap_added_ms']:.2f} ms (paired p50) "
        f"(target <= {TARGETS['cpu_cache_swap_added_ms_max']} ms: {met['cpu_cache_swap']})",
        f"engine restart / CPU-cache swap TTFT: {summary['restart_vs_cpu_cache_swap']:.0f}x",
    ]
    if samples.tier_checks_failed:
        notes.append(f"tier checks failed ({len(samples.tier_checks_failed)}): {samples.tier_checks_failed[:3]}")
    return table + "\n\n" + "\n".join(notes)


def plot(samples: Samples, summary: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    labels = [*TIERS, "engine restart"]
    values = [[v * 1000 for v in samples.ttft_s[t]] for t in TIERS] + [[v * 1000 for v in samples.restart_s]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    medians = [*(summary["median_ttft_s"][t] * 1000 for t in TIERS), summary["restart_to_first_token_s"] * 1000]
    ax.bar(range(len(labels)), medians, color="lightgrey", label="median")
    for i, vs in enumerate(values):
        ax.scatter([i] * len(vs), vs, s=12, alpha=0.6, color="tab:blue", label="samples" if i == 0 else None)
    ax.legend()
    ax.set_xticks(range(len(labels)), labels, rotation=20)
    ax.set(yscale="log", ylabel="time to first token (ms, log)", title="Adapter swap: TTFT by tier vs engine restart")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- measurement ------------------------------------------------------------------------


class _Run:
    def __init__(self, client: Client, model: BaseModel, refs: dict[str, str], samples: Samples, max_tokens: int):
        self.client, self.model, self.refs, self.samples, self.max_tokens = client, model, refs, samples, max_tokens

    async def use(self, model: str) -> float:
        timed = await self.client.complete(model, PROMPT, self.max_tokens)
        if not timed.ok:
            raise RuntimeError(f"request for {model} failed: {timed.status} {timed.error}")
        return timed.ttft_s

    async def check(self, ref: str, resident: bool, tier: str) -> None:
        names = {n.partition("@")[0] for n in await self.client.resident()}
        if (ref in names) != resident:
            self.samples.tier_checks_failed.append(f"{tier}: {ref} {'not ' if resident else ''}resident")

    async def repeat(self, store_ref: str) -> None:
        s, r = self.samples.ttft_s, self.refs
        # disk: used, then pushed out of the engine by FILLERS others; its files stay on disk.
        await self.use(r["disk"])
        for i in range(FILLERS):
            await self.use(r[f"filler{i}"])
        await self.check(r["disk"], False, "disk")
        s["disk"].append(await self.use(r["disk"]))
        # store: never asked for before.
        await self.check(store_ref, False, "store")
        s["store"].append(await self.use(store_ref))
        # running: just used, so in vLLM's active slot.
        await self.use(r["running"])
        await self.check(r["running"], True, "running")
        s["running"].append(await self.use(r["running"]))
        # base, the same way (its zero adapter is always registered).
        await self.use(self.model.served_name)
        s["base"].append(await self.use(self.model.served_name))
        # cpu cache: used, then 2 other adapters take vLLM's 2 active slots (1 user + the zero adapter).
        await self.use(r["cpu cache"])
        await self.use(r["running"])
        await self.use(self.model.served_name)
        await self.check(r["cpu cache"], True, "cpu cache")
        s["cpu cache"].append(await self.use(r["cpu cache"]))


async def _first_token(url: str, api_key: str, model: str, max_tokens: int) -> None:
    async with Client(url, api_key) as client:
        timed = await client.complete(model, PROMPT, max_tokens)
        if not timed.ok:
            raise RuntimeError(f"first request failed: {timed.status} {timed.error}")


async def _measure(opts: argparse.Namespace, url: str, api_key: str, model: BaseModel, samples: Samples) -> None:
    refs = {"running": "bench/running", "cpu cache": "bench/cached", "disk": "bench/disk"}
    refs |= {f"filler{i}": f"bench/filler{i}" for i in range(FILLERS)}
    async with Client(url, api_key) as client:
        run = _Run(client, model, refs, samples, opts.max_tokens)
        for i in range(opts.warmup):  # unmeasured: first compilations, the first requests of each adapter
            await run.repeat(f"bench/warm{i}")
        samples.ttft_s = {t: [] for t in TIERS}
        samples.tier_checks_failed.clear()
        for i in range(opts.repeats):
            await run.repeat(f"bench/store{i}")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lora-gateway bench swap", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    add_model_options(p, "swap")
    p.add_argument("--repeats", type=int, default=20, help="timed requests per tier")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured repeats first")
    p.add_argument("--restarts", type=int, default=1, help="engine restarts timed after the first start")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--rank", type=int, default=8, help="rank of the adapters")
    p.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up, no extra restart (for tests)")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.repeats, opts.warmup, opts.restarts = 3, 1, 0
    if opts.repeats < 1 or opts.warmup < 1 or opts.restarts < 0:
        p.error("--repeats and --warmup must be at least 1, --restarts at least 0")
    return opts


def main(argv: list[str]) -> int:
    opts = _parse(argv)
    samples = Samples()
    with bench_work_dir("swap") as work, S3Process(BUCKET) as s3:
        model = base_model(opts, work)
        keys_file, api_key = admin_key(work)
        store = f"s3://{BUCKET}/swap"
        refs = ["bench/running", "bench/cached", "bench/disk", *(f"bench/filler{i}" for i in range(FILLERS))]
        refs += [f"bench/warm{i}" for i in range(opts.warmup)] + [f"bench/store{i}" for i in range(opts.repeats)]
        progress(f"publishing {len(refs)} rank-{opts.rank} adapters to moto S3")
        os.environ.update(s3.env)
        asyncio.run(publish_synthetic(store, model, refs, opts.rank, work))
        flags = {"kv_cache_gib": opts.kv_cache_gib, "max_loras": MAX_LORAS, "max_cpu_loras": MAX_CPU_LORAS,
                 "max_lora_rank": max(8, opts.rank), "sync_interval_s": 60}  # fmt: skip
        for start_no in range(1 + opts.restarts):
            log_path = opts.out / "logs" / f"gateway-{start_no}.log"
            log_path.unlink(missing_ok=True)
            server = gateway_server(model, store, keys_file, log_path, s3.env, **flags)
            progress(f"start {start_no + 1}/{1 + opts.restarts}: gateway starting (log: {log_path})")
            started = time.perf_counter()
            with running(server, opts.startup_timeout):
                asyncio.run(_first_token(server.base_url, api_key, model.served_name, opts.max_tokens))
                samples.restart_s.append(time.perf_counter() - started)
                progress(f"process start -> first token: {samples.restart_s[-1]:.1f} s")
                if start_no == 0:
                    progress(f"{opts.warmup} warm-up and {opts.repeats} timed repeats")
                    asyncio.run(_measure(opts, server.base_url, api_key, model, samples))
    summary = summarize(samples)
    report = {"config": config_of(opts), "model": str(model.path), "summary": summary, "targets": TARGETS,
              "targets_met": targets_met(summary), "samples": asdict(samples)}  # fmt: skip
    write_report(opts.out, "swap", report, render(samples, summary), lambda path: plot(samples, summary, path))
    return 1 if samples.tier_checks_failed else 0
