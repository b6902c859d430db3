"""`lora-gateway bench serve`: the gateway against vLLM's own OpenAI server.

Same base model, adapters, engine settings and load for both (with `--engine-niceness 0,5,10`:
the gateway at each CPU priority of its engine processes instead, and no vLLM server). The load
is streamed completions (time to first token, and the whole request), by default cycling over
the base and `--adapters`; with `--mixes 0,1,4,16` one load per mix after each start: the base
model alone (0), then streams over that many distinct adapters. In alternating rounds each
server is started, warmed up, measured and stopped, one at a time (an idle engine's worker
spins on its core, so two engines on a small host slow each other), so drift and other work
on the host hit both alike. Per server: requests/s, completion tokens/s, p50/p99 latency and
errors over all its rounds; then gateway/vLLM ratios against the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from math import nan
from pathlib import Path

import aiohttp

from gateway.auth.keys import add_key
from gateway.bench.report import config_of, cpu_seconds, percentile, raise_on_sigterm, ratio_of, write_json
from gateway.bench.report import markdown_table as table
from gateway.dev.process import ServerProcess, free_port, gateway_command
from gateway.dev.vllm_server import ENGINE_ENV, KV_CACHE_GIB
from gateway.dev.vllm_server import vllm_server as dev_vllm_server

PROMPTS = ("def fibonacci(n):\n", "import os\nimport sys\n", "class Stack:\n    def ", "for i in range(")
TARGETS = {"throughput_ratio_min": 1.0, "p50_ratio_max": 1.05}


@dataclass(frozen=True)
class Summary:
    requests: int
    errors: int
    duration_s: float
    requests_per_s: float
    tokens_per_s: float
    p50_s: float
    p99_s: float
    other_cores: float  # CPU the rest of the host used meanwhile: a busy host skews a result
    ttft_p50_s: float = float("nan")
    # The server's health endpoint, polled during the load: does the HTTP side still answer?
    probe_p99_s: float = float("nan")
    probe_max_s: float = float("nan")


@dataclass
class LoadResult:
    """Raw outcome of one measured run: one latency per successful request."""

    latencies_s: list[float] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    errors: int = 0
    duration_s: float = 0.0
    first_errors: list[str] = field(default_factory=list)
    other_cpu_s: float = 0.0  # busy CPU time of processes other than the servers and this one
    probe_latencies_s: list[float] = field(default_factory=list)


# -- pure helpers (unit-tested) ---------------------------------------------------------


def summarize(results: Sequence[LoadResult]) -> Summary:
    """Pool several runs: percentiles over all latencies, rates over the summed wall time."""
    latencies = [x for r in results for x in r.latencies_s]
    duration = sum(r.duration_s for r in results)
    ok = len(latencies)
    tokens = sum(r.completion_tokens for r in results)
    return Summary(
        requests=ok + sum(r.errors for r in results),
        errors=sum(r.errors for r in results),
        duration_s=duration,
        requests_per_s=ok / duration if duration > 0 else 0.0,
        tokens_per_s=tokens / duration if duration > 0 else 0.0,
        p50_s=percentile(latencies, 50),
        p99_s=percentile(latencies, 99),
        other_cores=sum(r.other_cpu_s for r in results) / duration if duration > 0 else 0.0,
        ttft_p50_s=percentile(ttfts, 50) if (ttfts := [x for r in results for x in r.ttfts_s]) else nan,
        probe_p99_s=percentile(probes, 99) if (probes := [x for r in results for x in r.probe_latencies_s]) else nan,
        probe_max_s=max(probes, default=nan),
    )


def ratios(gateway: Summary, vllm: Summary) -> dict[str, float]:
    """Gateway over vLLM: above 1 is better for throughput, worse for latency."""
    return {
        "throughput": ratio_of(gateway.requests_per_s, vllm.requests_per_s),
        "tokens_per_s": ratio_of(gateway.tokens_per_s, vllm.tokens_per_s),
        "ttft_p50": ratio_of(gateway.ttft_p50_s, vllm.ttft_p50_s),
        "p50": ratio_of(gateway.p50_s, vllm.p50_s),
        "p99": ratio_of(gateway.p99_s, vllm.p99_s),
    }


def meets_targets(ratio: dict[str, float]) -> dict[str, bool]:
    return {
        "throughput": ratio["throughput"] >= TARGETS["throughput_ratio_min"],
        "p50": ratio["p50"] <= TARGETS["p50_ratio_max"],
    }


def markdown_table(summaries: dict[str, Summary], ratio_rows: dict[str, dict[str, float]]) -> str:
    """One row per (server, load), then a gateway / vLLM row per load."""
    rows = [
        [name, f"{s.requests_per_s:.2f}", f"{s.tokens_per_s:.1f}", f"{s.ttft_p50_s:.3f}", f"{s.p50_s:.3f}",
         f"{s.p99_s:.3f}", str(s.errors), f"{s.probe_p99_s * 1000:.0f} / {s.probe_max_s * 1000:.0f}",
         f"{s.other_cores:.2f}"]
        for name, s in summaries.items()
    ]  # fmt: skip
    for label, ratio in ratio_rows.items():
        rows.append([label, *(f"{ratio[k]:.3f}x" for k in ("throughput", "tokens_per_s", "ttft_p50", "p50", "p99")),
                     "", "", ""])  # fmt: skip
    header = ["server", "requests/s", "tokens/s", "TTFT p50 (s)", "p50 (s)", "p99 (s)", "errors",
              "health probe p99 / max (ms)", "other load (cores)"]  # fmt: skip
    return table(header, rows)


def targets_text(ratio: dict[str, float]) -> str:
    met = {k: "met" if ok else "MISSED" for k, ok in meets_targets(ratio).items()}
    return (
        f"Targets: throughput >= {TARGETS['throughput_ratio_min']:.2f}x: {met['throughput']}; "
        f"p50 <= {TARGETS['p50_ratio_max']:.2f}x: {met['p50']}"
    )


# The real-model targets, with --mixes 0,4: ratios measured in the same run.
MIX_TARGETS = {
    "base only, gateway / vLLM throughput": (">=", 1.0),
    "base only, gateway / vLLM TTFT p50": ("<=", 1.05),
    "4 adapters, gateway / vLLM throughput": (">=", 1.2),
    "4 adapters / base only, the gateway's throughput": (">=", 0.75),
}


def mix_targets(summaries: dict[str, Summary]) -> dict[str, float]:
    """MIX_TARGETS' ratios from summaries named `SERVER, LOAD` (gateway and vLLM; base only and 4 adapters)."""
    g0, v0 = summaries["gateway, base only"], summaries["vLLM, base only"]
    g4, v4 = summaries["gateway, 4 adapters"], summaries["vLLM, 4 adapters"]
    values = [
        ratio_of(g0.requests_per_s, v0.requests_per_s),
        ratio_of(g0.ttft_p50_s, v0.ttft_p50_s),
        ratio_of(g4.requests_per_s, v4.requests_per_s),
        ratio_of(g4.requests_per_s, g0.requests_per_s),
    ]
    return dict(zip(MIX_TARGETS, values))


def mix_targets_text(values: dict[str, float]) -> str:
    lines = []
    for name, value in values.items():
        op, bound = MIX_TARGETS[name]
        met = value >= bound if op == ">=" else value <= bound
        lines.append(f"{name}: {value:.2f}x (target {op} {bound:.2f}x: {'met' if met else 'MISSED'})")
    return "\n".join(lines)


def loads_of(base_name: str, adapters: Sequence[str], mixes: Sequence[int] | None) -> dict[str, list[str]]:
    """Load name -> the models its requests cycle over."""
    if mixes is None:
        return {"": [base_name, *adapters]}
    return {("base only" if n == 0 else f"{n} adapter{'s' * (n > 1)}"): [base_name] if n == 0 else list(adapters[:n])
            for n in mixes}  # fmt: skip


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


# -- load -------------------------------------------------------------------------------


PROBE_INTERVAL_S = 0.25


async def run_load(
    url: str, models: Sequence[str], requests: int, concurrency: int, max_tokens: int, api_key: str,
    probe_path: str | None = None,
) -> LoadResult:  # fmt: skip
    """`requests` completions from `concurrency` workers, `model` cycling over `models`; meanwhile
    `probe_path` (the server's health endpoint) is timed every PROBE_INTERVAL_S."""
    result = LoadResult()
    next_index = itertools.count()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=timeout,
        headers={"Authorization": f"Bearer {api_key}"},  # vLLM's server ignores it
    ) as session:

        async def worker() -> None:
            while (i := next(next_index)) < requests:
                body = {"model": models[i % len(models)], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                        "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
                started = time.perf_counter()
                try:
                    first, tokens = await _stream(session, f"{url}/v1/completions", body)
                    result.latencies_s.append(time.perf_counter() - started)
                    result.ttfts_s.append(first - started)
                    result.completion_tokens += tokens
                except Exception as exc:  # counted, not fatal: the error count is a result
                    result.errors += 1
                    if len(result.first_errors) < 5:
                        result.first_errors.append(f"{models[i % len(models)]}: {type(exc).__name__}: {exc}")

        async def probe() -> None:
            async with aiohttp.ClientSession(timeout=timeout) as probes:  # its own connection, never queued
                while True:
                    sent = time.perf_counter()
                    async with probes.get(f"{url}{probe_path}") as response:
                        await response.read()
                    result.probe_latencies_s.append(time.perf_counter() - sent)
                    await asyncio.sleep(PROBE_INTERVAL_S)

        prober = asyncio.create_task(probe()) if probe_path else None
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.duration_s = time.perf_counter() - started
        if prober is not None:
            prober.cancel()
    return result


async def _stream(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> tuple[float, int]:
    """POST a streamed completion and read it to the end: (when the first token came, completion tokens)."""
    first: float | None = None
    tokens = 0
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
        async for line in response.content:
            data = line.decode().strip().removeprefix("data:").strip()
            if not data or data == "[DONE]":
                continue
            payload = json.loads(data)
            if "error" in payload:
                raise RuntimeError(f"stream error: {str(payload['error'])[:200]}")
            if first is None and payload.get("choices"):
                first = time.perf_counter()
            if payload.get("usage"):
                tokens = int(payload["usage"]["completion_tokens"])
    if first is None:
        raise RuntimeError("stream without a token")
    return first, tokens


# -- inputs and main --------------------------------------------------------------------


def _inputs(opts: argparse.Namespace, work_dir: Path) -> tuple[Path, str, dict[str, Path]]:
    """Base model folder, store URL, and a local copy of each adapter (vLLM's --lora-modules reads folders)."""
    from adapters_manifest.open_store import open_store
    from gateway.dev.models import BASES, make_model

    refs = [r.strip() for r in opts.adapters.split(",") if r.strip()]
    if opts.mixes and opts.base in BASES:  # as many adapters as the largest mix
        refs = [f"user{i:02d}/chat" for i in range(max(opts.mixes))]
    if opts.mixes and len(refs) < max(opts.mixes):
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
    from gateway.dev.models import BASES

    p = argparse.ArgumentParser(prog="lora-gateway bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--base", default="tiny", help="tiny, smollm2 (from its wheel) or a base model folder")
    p.add_argument("--store", help="adapter store, file:///path or a path (with --base DIR)")
    p.add_argument("--adapters", default="alice/chat,bob/chat",
                   help="owner/name,... (with --mixes on a dev base: user00/chat, user01/chat, ...)")  # fmt: skip
    p.add_argument("--mixes", type=lambda v: [int(x) for x in v.split(",")],
                   help="e.g. 0,1,4,16: a load per mix after each start, the base alone (0) or N adapters")  # fmt: skip
    p.add_argument("--served-model-name", help="the base model's name (default: the dev base's, or the folder's)")
    p.add_argument("--dtype", default="float32", help="both servers' engine dtype")
    p.add_argument("--requests", type=int, default=300, help="measured requests per round and server")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=48, help="unmeasured requests after each start")
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


def main(argv: list[str]) -> int:
    opts = _parse(argv)
    signal.signal(signal.SIGTERM, raise_on_sigterm)  # unwinds through `running`
    logs = opts.out.parent / "bench-serve-logs"
    # server name -> the gateway's extra flags (None: vLLM's own server)
    servers: dict[str, dict[str, object] | None] = (
        {f"gateway, engine nice {n}": {"engine_niceness": n} for n in opts.engine_niceness}
        if opts.engine_niceness
        else {"gateway": {}, "vLLM": None}
    )
    if opts.compare_vllm_ops:
        servers["gateway with vLLM's ops"] = {"cpu_lora_ops": "vllm"}
    results: dict[str, list[LoadResult]] = {}
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
                log_path.unlink(missing_ok=True)
                if flags is None:
                    server, probe = vllm_server(opts, base, adapters, log_path), "/health"
                else:
                    server, probe = gateway_server(opts, base, store, keys_file, log_path, **flags), "/healthz"
                print(f"round {round_no}: {server_name} starting (log: {log_path})", file=sys.stderr, flush=True)
                with running(server, opts.startup_timeout) as url:
                    assert server.process is not None
                    pgids = {server.process.pid}  # the server leads its process group (engine processes too)
                    for load, models in loads.items():
                        name = f"{server_name}, {load}" if load else server_name
                        warm = max(opts.warmup, len(models))  # every adapter of the load once: loads are not measured
                        asyncio.run(run_load(url, models, warm, opts.concurrency, opts.max_tokens, api_key))
                        host_before, ours_before = cpu_seconds(pgids)
                        result = asyncio.run(
                            run_load(url, models, opts.requests, opts.concurrency, opts.max_tokens, api_key, probe)
                        )
                        host_after, ours_after = cpu_seconds(pgids)
                        result.other_cpu_s = max(0.0, (host_after - host_before) - (ours_after - ours_before))
                        results.setdefault(name, []).append(result)
                        s = summarize([result])
                        print(
                            f"round {round_no}: {name} {s.requests_per_s:.2f} req/s, TTFT p50 {s.ttft_p50_s:.3f} s, "
                            f"p50 {s.p50_s:.3f} s, health probe p99 {s.probe_p99_s * 1000:.0f} ms, errors {s.errors} "
                            f"{result.first_errors[:1]}, other load {s.other_cores:.2f} cores",
                            file=sys.stderr,
                            flush=True,
                        )

    summaries = {name: summarize(runs) for name, runs in results.items()}
    ratio_rows = {}
    if not opts.engine_niceness:
        for load in loads:
            label = f"gateway / vLLM, {load}" if load else "gateway / vLLM"
            ratio_rows[label] = ratios(*(summaries[f"{s}, {load}" if load else s] for s in ("gateway", "vLLM")))
            if opts.compare_vllm_ops:
                before = summaries[f"gateway with vLLM's ops, {load}" if load else "gateway with vLLM's ops"]
                ratio_rows[label.replace("gateway", "gateway with vLLM's ops", 1)] = ratios(
                    before, summaries[f"vLLM, {load}" if load else "vLLM"]
                )
    text = markdown_table(summaries, ratio_rows)
    targets: dict[str, object] = {}
    if opts.mixes and {0, 4} <= set(opts.mixes) and not opts.engine_niceness:
        targets = mix_targets(summaries)
        text += "\n\n" + mix_targets_text(targets)
    elif len(ratio_rows) == 1:
        targets = {k: v for k, v in meets_targets(next(iter(ratio_rows.values()))).items()}
        text += "\n\n" + targets_text(next(iter(ratio_rows.values())))
    print(text)
    report = {
        "config": config_of(opts),
        "summary": {name: asdict(s) for name, s in summaries.items()},
        "rounds": {name: [asdict(summarize([r])) for r in runs] for name, runs in results.items()},
        "first_errors": {name: [e for r in runs for e in r.first_errors][:5] for name, runs in results.items()},
        "ratios": ratio_rows,
        "targets": targets,
    }
    opts.out.with_suffix(".md").write_text(text + "\n")
    write_json(opts.out, report)
    return 1 if any(s.errors for s in summaries.values()) else 0
