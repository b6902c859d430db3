"""`lora-gateway bench scale`: how many adapters one base model serves before throughput falls.

For each engine configuration of the grid (`--max-loras`:`--max-cpu-loras`) one gateway is started
(alone), and mixed streams of greedy completions are measured, spread uniformly at random over 1,
4, 16, 64 and 256 distinct adapters, each next to a stream of base-model requests only (the
denominator: same server, same minute). Each stream is warmed up unmeasured (files on disk,
adapters resident where they fit), so beyond max_cpu_loras it measures the steady churn of
engine loads. Reported: requests/s, tokens/s, p50/p99 latency and errors, the requests vLLM ran at once
(mean), and throughput as a ratio to a base-only stream measured just before it (the host's load drifts;
a pair shares it). --compare-unscheduled runs each configuration again on a gateway with the
admission scheduler's aids off, right after: before and after in one run.
Targets: 64 adapters keep >= 0.8x base throughput with max_loras >= 8, 256 adapters >= 0.6x.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import itertools
import random
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gateway_tools.bench.harness import (
    PROMPTS,
    UNSCHEDULED,
    BaseModel,
    Client,
    Timed,
    add_model_options,
    admin_key,
    base_model,
    bench_work_dir,
    gateway_server,
    progress,
    publish_synthetic,
    running,
    stream_stats,
    write_report,
)
from gateway_tools.bench.report import (
    RequestStats,
    config_of,
    cpu_seconds,
    flat_json,
    markdown_table,
    median,
    median_of_rounds,
    ratio_of,
)

# Adapters in a stream -> the least throughput vs base they keep, judged on max_loras >= TARGET_MAX_LORAS.
TARGET_RATIOS = {64: 0.8, 256: 0.6}
TARGET_MAX_LORAS = 8
BASE = 0  # "0 adapters": the base model only
ENGINE_RUNNING = "vllm:num_requests_running"
T = TypeVar("T")
SCHEDULED, UNSCHEDULED_GATEWAY = "scheduled", "unscheduled"


@dataclass(frozen=True)
class Point:
    """One stream on one engine configuration (or its rounds, aggregated)."""

    max_loras: int
    max_cpu_loras: int
    adapters: int  # 0: base only
    stream: RequestStats
    first_errors: tuple[str, ...] = ()
    other_cores: float = 0.0  # CPU the rest of the host used meanwhile: a busy neighbour skews a result
    # vLLM's requests running (its gauge, sampled through the stream): the sequences a step carried.
    # With a backlog, what bounds it is max_loras: a step runs the requests of so many adapters.
    engine_running: float = 0.0


# -- pure helpers (unit-tested) ---------------------------------------------------------


def parse_grid(text: str) -> list[tuple[int, int]]:
    """`8:16,16:64` -> [(8, 16), (16, 64)]; max_cpu_loras must be at least max_loras."""
    grid = []
    for item in text.split(","):
        loras, _, cpu = item.strip().partition(":")
        pair = (int(loras), int(cpu))
        if pair[0] < 1 or pair[1] < pair[0]:
            raise ValueError(f"grid point {item!r}: need 1 <= max_loras <= max_cpu_loras")
        grid.append(pair)
    return grid


def point_of(max_loras: int, max_cpu_loras: int, adapters: int, results: Sequence[Timed], duration_s: float) -> Point:
    errors = tuple(f"{r.status} {r.error}" for r in results if not r.ok)
    return Point(max_loras, max_cpu_loras, adapters, stream_stats(results, duration_s), errors[:3])


def paired_ratios(points: Sequence[Point]) -> dict[tuple[int, int, int], list[float]]:
    """Each adapter stream's throughput over the base-only stream measured just before it on the same
    engine configuration (the host's speed drifts over a run, and a pair shares it); one per round."""
    ratios: dict[tuple[int, int, int], list[float]] = collections.defaultdict(list)
    last_base: dict[tuple[int, int], float] = {}
    for p in points:
        config = (p.max_loras, p.max_cpu_loras)
        if p.adapters == BASE:
            last_base[config] = p.stream.requests_per_s
            ratios[(*config, BASE)].append(1.0)
        else:
            ratios[(*config, p.adapters)].append(ratio_of(p.stream.requests_per_s, last_base.get(config, 0.0)))
    return ratios


def vs_base(points: Sequence[Point]) -> dict[tuple[int, int, int], float]:
    """The median over rounds of the paired ratios: a stall of the engine that hits one stream of a
    pair (seen here: 2 s steps for tens of seconds) moves one round, not the result."""
    return {key: median(values) for key, values in paired_ratios(points).items()}


def aggregate(points: Sequence[Point]) -> list[Point]:
    """One point per configuration and adapter count: medians over rounds, errors summed."""
    groups: dict[tuple[int, int, int], list[Point]] = collections.defaultdict(list)
    for p in points:
        groups[(p.max_loras, p.max_cpu_loras, p.adapters)].append(p)
    return [
        Point(*key, median_of_rounds([p.stream for p in g]), tuple(e for p in g for e in p.first_errors)[:3],
              other_cores=sum(p.other_cores for p in g) / len(g), engine_running=median([p.engine_running for p in g]))
        for key, g in groups.items()
    ]  # fmt: skip


def target_met(points: Sequence[Point]) -> bool | None:
    """Each adapter count with a target at its ratio or above, without errors, on every configuration
    with max_loras >= 8 (None: none measured)."""
    ratio = vs_base(points)
    judged = [p for p in aggregate(points) if p.adapters in TARGET_RATIOS and p.max_loras >= TARGET_MAX_LORAS]
    if not judged:
        return None
    return all(
        ratio[(p.max_loras, p.max_cpu_loras, p.adapters)] >= TARGET_RATIOS[p.adapters] and not p.stream.errors
        for p in judged
    )


def target_text() -> str:
    wanted = ", ".join(f"{n} adapters >= {r}x" for n, r in TARGET_RATIOS.items())
    return f"{wanted} base with max_loras >= {TARGET_MAX_LORAS}"


def render(points: Sequence[Point]) -> str:
    ratio = vs_base(points)
    rows = []
    for p in aggregate(points):
        s = p.stream
        rows.append([f"{p.max_loras}:{p.max_cpu_loras}", "base only" if p.adapters == BASE else str(p.adapters),
                     f"{s.requests_per_s:.1f}", f"{s.tokens_per_s:.0f}", f"{s.p50_s:.3f}", f"{s.p99_s:.3f}",
                     str(s.errors), f"{ratio[(p.max_loras, p.max_cpu_loras, p.adapters)]:.2f}x",
                     f"{p.engine_running:.1f}", f"{p.other_cores:.2f}"])  # fmt: skip
    table = markdown_table(["max_loras:max_cpu_loras", "adapters", "requests/s", "tokens/s", "p50 (s)", "p99 (s)",
                            "errors", "vs base (paired, p50 of rounds)", "running in the engine (mean)",
                            "other load (cores)"], rows)  # fmt: skip
    met = target_met(points)
    verdict = "met" if met else "not measured (no max_loras >= 8 with 64 or 256 adapters)" if met is None else "MISSED"
    return table + f"\n\nTargets: {target_text()}: {verdict}. Rows: medians over rounds."


def plot(points: Sequence[Point], path: Path) -> None:
    import matplotlib.pyplot as plt

    ratio = vs_base(points)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for (loras, cpu), group in itertools.groupby(aggregate(points), key=lambda p: (p.max_loras, p.max_cpu_loras)):
        pts = [p for p in group if p.adapters != BASE]
        label = f"max_loras {loras}, max_cpu_loras {cpu}"
        left.plot([p.adapters for p in pts], [ratio[(loras, cpu, p.adapters)] for p in pts], marker="o", label=label)
        right.plot([p.adapters for p in pts], [p.stream.p99_s for p in pts], marker="o", label=label)
    for adapters, minimum in TARGET_RATIOS.items():
        left.plot([adapters], [minimum], marker="_", markersize=20, color="grey", linestyle="none")
    left.plot([], [], marker="_", color="grey", linestyle="none", label="targets")
    left.set(xscale="log", xlabel="distinct adapters in the stream", ylabel="throughput / base-only", ylim=(0, None))
    right.set(xscale="log", xlabel="distinct adapters in the stream", ylabel="p99 latency (s)")
    left.legend(fontsize=8)
    fig.suptitle("Many adapters on one base model")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- measurement ------------------------------------------------------------------------


async def run_stream(
    client: Client, models: Sequence[str], requests: int, concurrency: int, max_tokens: int, seed: int
) -> tuple[list[Timed], float]:
    """`requests` whole completions from `concurrency` workers, each naming a model drawn at random."""
    rng = random.Random(seed)
    plan = [(rng.choice(models), PROMPTS[i % len(PROMPTS)]) for i in range(requests)]
    results: list[Timed] = []
    jobs = iter(plan)

    async def worker() -> None:
        for model, prompt in jobs:
            results.append(await client.complete(model, prompt, max_tokens, stream=False))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - started


async def engine_running_meanwhile(client: Client, measured: Awaitable[T], every_s: float = 0.5) -> tuple[T, float]:
    """`measured`'s result, and the mean of vLLM's requests running, sampled every `every_s` while it ran
    (two scrapes a second: they cost the gateway little beside the stream)."""
    samples: list[float] = []

    async def sample() -> None:
        while True:
            samples.append(await client.metric_sum(ENGINE_RUNNING))
            await asyncio.sleep(every_s)

    sampler = asyncio.create_task(sample())
    try:
        result = await measured
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    return result, sum(samples) / len(samples) if samples else 0.0


async def _measure_config(
    opts: argparse.Namespace, url: str, api_key: str, pid: int, model: BaseModel, refs: list[str],
    grid: tuple[int, int],
) -> list[Point]:  # fmt: skip
    points = []
    async with Client(url, api_key, connections=opts.concurrency + 1) as client:  # one for the sampler
        streams = [(r, m) for r in range(opts.rounds) for adapters in opts.adapters for m in (BASE, adapters)]
        for round_no, n in streams:  # each adapter stream next to a base stream, in rounds
            models = [model.served_name] if n == BASE else refs[:n]
            # Warm-up: every adapter of the stream on disk (and resident where it fits), the engine compiled.
            await run_stream(client, models, max(2 * opts.concurrency, n), opts.concurrency, opts.max_tokens,
                             seed=n + 10_000 * round_no)  # fmt: skip
            host_before, ours_before = cpu_seconds({pid})
            (results, duration), running_mean = await engine_running_meanwhile(
                client, run_stream(client, models, opts.requests, opts.concurrency, opts.max_tokens,
                                   seed=1000 + n + 10_000 * round_no))  # fmt: skip
            host_after, ours_after = cpu_seconds({pid})
            other = max(0.0, (host_after - host_before) - (ours_after - ours_before)) / duration
            points.append(dataclasses.replace(point_of(*grid, n, results, duration), other_cores=other,
                                              engine_running=running_mean))  # fmt: skip
            p, s = points[-1], points[-1].stream
            what = "base" if n == BASE else f"{n} adapters"
            progress(f"round {round_no + 1}: {grid[0]}:{grid[1]} {what}: {s.requests_per_s:.1f} req/s, "
                     f"p50 {s.p50_s:.3f} s, p99 {s.p99_s:.3f} s, errors {s.errors} {list(p.first_errors[:1])}, "
                     f"{p.engine_running:.1f} running in the engine, other load {p.other_cores:.2f} cores")  # fmt: skip
    return points


def gateways(opts: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """The gateways measured on each configuration, by name, with their extra flags."""
    return [(SCHEDULED, {})] + ([(UNSCHEDULED_GATEWAY, UNSCHEDULED)] if opts.compare_unscheduled else [])


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lora-gateway bench scale", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    add_model_options(p, "scale")
    p.add_argument("--adapters", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64, 256],
                   help="distinct adapters per stream")  # fmt: skip
    p.add_argument("--grid", type=parse_grid, default=parse_grid("8:16,8:64,16:64"),
                   help="engine configurations max_loras:max_cpu_loras, each one gateway start")  # fmt: skip
    p.add_argument("--requests", type=int, default=256, help="measured requests per stream")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (base, adapters) stream pairs: medians over them")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="the engine's sequences a step (default: vLLM's); below --concurrency, a backlog forms",
    )
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument(
        "--compare-unscheduled",
        action="store_true",
        help="each configuration again with the admission scheduler's aids off: " + str(UNSCHEDULED),
    )
    p.add_argument("--quick", action="store_true", help="1 and 4 adapters, grid 2:4, 32 requests (for tests)")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.adapters, opts.grid, opts.requests, opts.concurrency, opts.rounds = [1, 4], [(2, 4)], 32, 8, 1
    if opts.requests < 1 or opts.concurrency < 1 or opts.rounds < 1 or min(opts.adapters) < 1:
        p.error("--requests, --concurrency, --rounds and each adapter count must be at least 1")
    return opts


def main(argv: list[str]) -> int:
    opts = _parse(argv)
    started = time.monotonic()
    measured: dict[str, list[Point]] = {name: [] for name, _ in gateways(opts)}
    with bench_work_dir("scale") as work:
        model = base_model(opts, work)
        keys_file, api_key = admin_key(work)
        store = str(work / "store")
        refs = [f"bench/a{i:03d}" for i in range(max(opts.adapters))]
        progress(f"publishing {len(refs)} rank-{opts.rank} adapters")
        asyncio.run(publish_synthetic(store, model, refs, opts.rank, work))
        for grid in opts.grid:
            for name, flags in gateways(opts):  # one at a time, each alone on the host
                log_path = opts.out / "logs" / f"gateway-{grid[0]}-{grid[1]}-{name}.log"
                log_path.unlink(missing_ok=True)
                server = gateway_server(model, store, keys_file, log_path, kv_cache_gib=opts.kv_cache_gib,
                                        max_loras=grid[0], max_cpu_loras=grid[1],
                                        max_lora_rank=max(8, opts.rank), max_num_seqs=opts.max_num_seqs,
                                        # one client, the bench's: it may fill the engine and queue in the gateway
                                        max_seqs_per_user=opts.max_num_seqs,
                                        max_running_per_user=max(64, opts.concurrency), **flags)  # fmt: skip
                progress(f"max_loras {grid[0]}, max_cpu_loras {grid[1]}, {name}: gateway starting (log: {log_path})")
                with running(server, opts.startup_timeout):
                    assert server.process is not None  # it leads its process group: the engine processes too
                    measured[name] += asyncio.run(_measure_config(opts, server.base_url, api_key, server.process.pid,
                                                                  model, refs, grid))  # fmt: skip
    points = measured[SCHEDULED]
    report: dict[str, Any] = {
        "config": config_of(opts), "model": str(model.path), "duration_s": time.monotonic() - started,
        "points": [flat_json(p) for p in points],
        "summary": [flat_json(p) for p in aggregate(points)],
        "vs_base": [{"max_loras": k[0], "max_cpu_loras": k[1], "adapters": k[2], "ratio": median(v), "rounds": v}
                    for k, v in paired_ratios(points).items()],
        "target": {"ratios": TARGET_RATIOS, "min_max_loras": TARGET_MAX_LORAS}, "target_met": target_met(points),
    }  # fmt: skip
    text = render(points)
    if UNSCHEDULED_GATEWAY in measured:
        unscheduled = measured[UNSCHEDULED_GATEWAY]
        report["unscheduled"] = {"flags": UNSCHEDULED, "points": [flat_json(p) for p in unscheduled],
                                 "summary": [flat_json(p) for p in aggregate(unscheduled)]}  # fmt: skip
        text += f"\n\nThe same on a gateway with the admission scheduler's aids off ({UNSCHEDULED}):\n\n"
        text += render(unscheduled)
    write_report(opts.out, "scale", report, text, lambda path: plot(points, path))
    return 1 if target_met(points) is False or any(p.stream.errors for p in points) else 0
