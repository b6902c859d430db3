"""`lora-gateway bench soak`: correct and alive under sustained load while the store fails and adapters change.

One gateway on an S3 store (moto on loopback, in a process of its own) serves a bounded load:
`--requests` greedy completions (default 5,000) over `--adapters` adapters (32) and the base model,
`--concurrency` at once (64), streaming and not in turn, through an engine that holds only
`--max-cpu-loras` adapters (4) and a disk cache that holds only half of them, so adapters keep
moving store -> disk -> engine. Meanwhile the S3 server is stopped and restarted (`--outages`
times, `--outage-s` each) and `--new-versions` adapters get a new version pushed.

Checked, with targets (exit 1 if one fails):
- 0 wrong outputs: every `--check-every`th request asks for its exact token ids, compared afterwards
  with transformers + PEFT greedy output (gateway_tools.dev.oracle) for its adapter; after a new version
  either version's output is right for a request that began before the gateway was seen serving
  the new one, only the new one's after;
- 0 lost requests: each gets a response or a clear JSON error; errors are counted by type, and a
  503 with Retry-After (the store is down and the adapter is not on this replica's disk; every
  slot busy) is a clear error, not a lost request; any other error fails;
- at least `--min-ok` of the requests succeed;
- host RSS (gateway + engine core) flat: at most `--rss-tolerance` above its level after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway_tools.bench.harness import (
    PROMPTS,
    BaseModel,
    Client,
    Published,
    Timed,
    add_model_options,
    admin_key,
    base_model,
    bench_work_dir,
    gateway_server,
    progress,
    publish_synthetic,
    running,
    tree_rss_bytes,
    write_report,
)
from gateway_tools.bench.report import config_of, markdown_table, per_second
from gateway_tools.bench.s3_process import S3Process

BUCKET = "bench-soak"
STORE = f"s3://{BUCKET}/soak"
CLEAR_ERRORS = {(503, "service_unavailable"), (503, "adapter_capacity_exhausted")}  # with Retry-After
LOST = {"no JSON error body", "stream cut off before [DONE]"}
RSS_INTERVAL_S = 0.5
VERSION_SEEN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Outcome:
    """One request: what was asked, when, and what came back."""

    index: int
    model: str
    prompt: str
    stream: bool
    checked: bool
    started: float
    ended: float
    ok: bool
    status: int
    error: str
    retry_after: str | None
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class VersionEvent:
    """A version of an adapter: when its push began, and when the gateway was first seen serving it."""

    ref: str
    version: str
    pushed: float
    seen: float  # inf: never seen within VERSION_SEEN_TIMEOUT_S


@dataclass
class Timeline:
    events: list[str] = field(default_factory=list)
    versions: list[VersionEvent] = field(default_factory=list)
    rss: list[tuple[float, int, int]] = field(default_factory=list)  # (time, requests done, bytes)

    def note(self, started: float, what: str) -> None:
        self.events.append(f"{time.perf_counter() - started:6.1f} s: {what}")
        progress(what)


# -- pure helpers (unit-tested) ---------------------------------------------------------


def error_kind(o: Outcome) -> str:
    """`ok`, `lost: ...`, `clear: STATUS CODE` or `unexpected: STATUS CODE` for one request."""
    if o.ok:
        return "ok"
    if o.status == 0 or o.error in LOST:
        return f"lost: {o.status} {o.error}"
    if o.status == 200:  # an error event in a stream that had begun: a clear error, in OpenAI's shape
        return f"clear: {o.error}"
    if (o.status, o.error) in CLEAR_ERRORS and o.retry_after:
        return f"clear: {o.status} {o.error}"
    return f"unexpected: {o.status} {o.error}"


def acceptable_versions(versions: Sequence[VersionEvent], started: float, ended: float) -> list[str]:
    """The versions a request for one adapter may rightly get: pushed before it ended, and not yet
    superseded by a version the gateway was seen serving before it began. `versions` in push order."""
    ok = []
    for i, v in enumerate(versions):
        superseded = i + 1 < len(versions) and versions[i + 1].seen <= started
        if v.pushed <= ended and not superseded:
            ok.append(v.version)
    return ok


def rss_growth(samples: Sequence[tuple[float, int, int]], warmed_up_after: int) -> tuple[int, int, float]:
    """(RSS at the end of warm-up, the most after it, the growth as a fraction): from the first sample
    taken once `warmed_up_after` requests were done."""
    after = [rss for _, done, rss in samples if done >= warmed_up_after]
    if not after:
        return 0, 0, float("nan")
    return after[0], max(after), max(after) / after[0] - 1


def summarize(
    outcomes: Sequence[Outcome], wrong: Sequence[dict[str, Any]], checked: int, rss: tuple[int, int, float],
    opts: argparse.Namespace, duration_s: float,
) -> dict[str, Any]:  # fmt: skip
    kinds = collections.Counter(error_kind(o) for o in outcomes)
    ok = kinds.get("ok", 0)
    lost = sum(n for k, n in kinds.items() if k.startswith("lost"))
    unexpected = sum(n for k, n in kinds.items() if k.startswith("unexpected"))
    warm_rss, max_rss, growth = rss
    figures = {
        "requests": len(outcomes), "ok": ok, "duration_s": duration_s,
        "requests_per_s": per_second(ok, duration_s),
        "errors_by_type": {k: n for k, n in sorted(kinds.items()) if k != "ok"},
        "lost": lost, "unexpected_errors": unexpected, "checked": checked, "wrong": len(wrong),
        "rss_after_warmup_bytes": warm_rss, "rss_max_bytes": max_rss, "rss_growth": growth,
    }  # fmt: skip
    figures["targets_met"] = {
        "all_requests_answered": len(outcomes) == opts.requests,
        **({"no_wrong_outputs": not wrong and checked > 0} if opts.check_every else {}),
        "no_lost_requests": lost == 0,
        "no_unexpected_errors": unexpected == 0,
        "ok_fraction": ok >= opts.min_ok * opts.requests,
        "rss_flat": growth <= opts.rss_tolerance,
    }
    return figures


def render(figures: dict[str, Any], opts: argparse.Namespace) -> str:
    met = {k: "met" if v else "MISSED" for k, v in figures["targets_met"].items()}
    rows = [
        ["requests answered", f"{figures['requests']} of {opts.requests}", met["all_requests_answered"]],
        ["succeeded", f"{figures['ok']} ({figures['ok'] / max(1, figures['requests']):.1%}; "
                      f"{figures['requests_per_s']:.1f}/s)", f"{met['ok_fraction']} (>= {opts.min_ok:.0%})"],
        ["wrong outputs (oracle-checked)", f"{figures['wrong']} of {figures['checked']} checked "
         f"({figures.get('checked_on_new_versions', 0)} on versions pushed during the run)",
         met.get("no_wrong_outputs", "not checked (--check-every 0)")],
        ["lost requests (no response, no JSON error)", str(figures["lost"]), met["no_lost_requests"]],
        ["unexpected errors", str(figures["unexpected_errors"]), met["no_unexpected_errors"]],
        ["host RSS after warm-up -> max", f"{figures['rss_after_warmup_bytes'] / 2**20:.0f} -> "
         f"{figures['rss_max_bytes'] / 2**20:.0f} MiB ({figures['rss_growth']:+.1%})",
         f"{met['rss_flat']} (<= {opts.rss_tolerance:+.0%})"],
    ]  # fmt: skip
    rows += [[f"error: {k}", str(n), ""] for k, n in figures["errors_by_type"].items()]
    return markdown_table(["soak", "figure", "target"], rows)


def plot(outcomes: Sequence[Outcome], timeline: Timeline, started: float, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    by_second: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        by_second[int(o.ended - started)][error_kind(o).split(":")[0]] += 1
    seconds = sorted(by_second)
    for kind, color in (("ok", "tab:green"), ("clear", "tab:orange"), ("lost", "tab:red"), ("unexpected", "black")):
        top.plot(seconds, [by_second[s][kind] for s in seconds], color=color, label=kind)
    top.set(ylabel="requests ended per second")
    top.legend(fontsize=8)
    bottom.plot([t - started for t, _, _ in timeline.rss], [b / 2**20 for _, _, b in timeline.rss])
    bottom.set(xlabel="seconds", ylabel="host RSS, gateway + engine (MiB)")
    for event in timeline.events:
        at = float(event.split(" s:")[0])
        for ax in (top, bottom):
            ax.axvline(at, color="grey", linewidth=0.6, linestyle=":")
    fig.suptitle("Soak: outcomes and memory over time (dotted: S3 stops/starts, version pushes)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- the run ----------------------------------------------------------------------------


class Soak:
    def __init__(self, opts: argparse.Namespace, model: BaseModel, s3: S3Process, work: Path,
                 adapters: dict[str, Published]) -> None:  # fmt: skip
        self.opts, self.model, self.s3, self.work = opts, model, s3, work
        self.folders: dict[tuple[str, str], Path] = {
            (p.record.ref, p.record.version): p.folder for p in adapters.values()
        }
        self.timeline = Timeline()
        self.timeline.versions = [VersionEvent(ref, p.record.version, float("-inf"), float("-inf"))
                                  for ref, p in adapters.items()]  # fmt: skip
        self.outcomes: list[Outcome] = []
        self.refs = list(adapters)
        self.started = 0.0
        self.faults_done = asyncio.Event()

    def plan(self) -> list[tuple[str, str, bool, bool]]:
        """(model, prompt, stream, checked) per request: adapters uniformly, the base now and then."""
        rng = random.Random(0)
        plan = []
        for i in range(self.opts.requests):
            model = self.model.served_name if rng.random() < self.opts.base_fraction else rng.choice(self.refs)
            checked = self.opts.check_every > 0 and i % self.opts.check_every == 0
            plan.append((model, PROMPTS[i % len(PROMPTS)], i % 2 == 0, checked))
        return plan

    def fault_schedule(self) -> list[tuple[float, str, list[str]]]:
        """(fraction of the requests done, "outage" or "versions", the adapters to push), in order."""
        rounds = max(1, self.opts.outages)
        schedule = [((2 * k + 1) / (2 * rounds + 2), "outage", []) for k in range(self.opts.outages)]
        chunks = [self.refs[: self.opts.new_versions][k::rounds] for k in range(rounds)]
        schedule += [((k + 1) / (rounds + 1), "versions", chunk) for k, chunk in enumerate(chunks) if chunk]
        return sorted(schedule)

    async def load(self, client: Client) -> None:
        jobs = iter(enumerate(self.plan()))
        # The requests after the last fault's mark wait for the faults to be over (S3 back, new versions
        # seen served): however fast the engine, the run ends with requests on the new versions.
        schedule = self.fault_schedule()
        tail_start = math.ceil(schedule[-1][0] * self.opts.requests) if schedule else self.opts.requests

        async def worker() -> None:
            for i, (model, prompt, stream, checked) in jobs:
                if i >= tail_start:
                    await self.faults_done.wait()
                t0 = time.perf_counter()
                r: Timed = await client.complete(model, prompt, self.opts.max_tokens, stream=stream, ids=checked)
                self.outcomes.append(Outcome(i, model, prompt, stream, checked, t0, time.perf_counter(), r.ok,
                                             r.status, r.error, r.retry_after, tuple(r.token_ids)))  # fmt: skip

        await asyncio.gather(*(worker() for _ in range(self.opts.concurrency)))

    async def faults(self, client: Client) -> None:
        """S3 outages and version pushes in turn, spread over the run by requests done."""
        try:
            for fraction, what, refs in self.fault_schedule():
                while len(self.outcomes) < fraction * self.opts.requests:
                    await asyncio.sleep(0.1)
                if what == "outage":
                    await asyncio.to_thread(self.s3.stop)
                    self.timeline.note(self.started, f"S3 stopped ({len(self.outcomes)} requests done)")
                    await asyncio.sleep(self.opts.outage_s)
                    await asyncio.to_thread(self.s3.start)
                    self.timeline.note(self.started, "S3 started again")
                else:
                    await self.push_versions(client, refs)
        finally:
            self.faults_done.set()

    async def push_versions(self, client: Client, refs: list[str]) -> None:
        pushed_at = time.perf_counter()
        salt = f"-v{len(self.timeline.versions)}"
        published = await publish_synthetic(STORE, self.model, refs, self.opts.rank, self.work, salt=salt)
        self.timeline.note(self.started, f"new versions of {', '.join(refs)} pushed")
        for p in published:
            self.folders[(p.record.ref, p.record.version)] = p.folder
        seen: dict[str, float] = {}
        deadline = time.perf_counter() + VERSION_SEEN_TIMEOUT_S
        while len(seen) < len(published) and time.perf_counter() < deadline:
            for p in published:
                if p.record.ref not in seen and await client.version_served(p.record.ref) == p.record.version:
                    seen[p.record.ref] = time.perf_counter()
            await asyncio.sleep(0.05)
        for p in published:
            self.timeline.versions.append(
                VersionEvent(p.record.ref, p.record.version, pushed_at, seen.get(p.record.ref, float("inf")))
            )
        self.timeline.note(self.started, f"gateway serving {len(seen)} of {len(published)} new versions")

    async def sample_rss(self, pid: int) -> None:
        while True:
            self.timeline.rss.append((time.perf_counter(), len(self.outcomes), tree_rss_bytes(pid)))
            await asyncio.sleep(RSS_INTERVAL_S)

    async def run(self, url: str, api_key: str, pid: int) -> float:
        async with Client(url, api_key, connections=self.opts.concurrency + 8) as client:
            self.started = time.perf_counter()
            sampler = asyncio.create_task(self.sample_rss(pid))
            faults = asyncio.create_task(self.faults(client))
            last = 0
            load = asyncio.create_task(self.load(client))
            while not load.done():
                await asyncio.wait({load}, timeout=10)
                if len(self.outcomes) - last:
                    progress(f"{len(self.outcomes)}/{self.opts.requests} requests done")
                last = len(self.outcomes)
            duration = time.perf_counter() - self.started
            await load
            faults.cancel()
            sampler.cancel()
            return duration

    def check(self) -> tuple[int, int, list[dict[str, Any]]]:
        """Every checked success against the reference for the versions it may rightly have:
        (checked, of them equal to a version pushed during the run, the wrong ones)."""
        from gateway_tools.dev.oracle import ReferenceModel

        oracle = ReferenceModel(self.model.path)
        expected: dict[tuple[str | None, str], list[int]] = {}

        def reference(folder: Path | None, prompt: str) -> list[int]:
            key = (str(folder) if folder else None, prompt)
            if key not in expected:
                expected[key] = oracle.greedy_ids(folder, oracle.prompt_ids(prompt), self.opts.max_tokens)
            return expected[key]

        by_ref = collections.defaultdict(list)
        for v in self.timeline.versions:
            by_ref[v.ref].append(v)
        initial = {v.ref: v.version for v in self.timeline.versions if v.pushed == float("-inf")}
        checked, on_new_versions, wrong = 0, 0, []
        # Grouped by adapter: the reference keeps few models in memory at once.
        for o in sorted((o for o in self.outcomes if o.ok and o.checked), key=lambda o: o.model):
            checked += 1
            if o.model == self.model.served_name:
                allowed = {None: reference(None, o.prompt)}
            else:
                allowed = {v: reference(self.folders[(o.model, v)], o.prompt)
                           for v in acceptable_versions(by_ref[o.model], o.started, o.ended)}  # fmt: skip
            matched = [v for v, ids in allowed.items() if ids == list(o.token_ids)]
            if matched and o.model in initial and initial[o.model] not in matched:
                on_new_versions += 1
            if not matched:
                allowed_ids = {str(k): v for k, v in allowed.items()}
                wrong.append({"request": o.index, "model": o.model, "prompt": o.prompt, "stream": o.stream,
                              "got": list(o.token_ids), "allowed": allowed_ids})  # fmt: skip
        return checked, on_new_versions, wrong


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lora-gateway bench soak", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    add_model_options(p, "soak")
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--max-cpu-loras", type=int, default=4)
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--base-fraction", type=float, default=0.1, help="requests for the base model")
    p.add_argument("--check-every", type=int, default=2,
                   help="every Nth request is checked against the reference (float32 transformers on the CPU: "
                        "the tiny model; 0 turns the check off, e.g. for a real model on a GPU)")  # fmt: skip
    p.add_argument("--outages", type=int, default=2, help="S3 stops and restarts")
    p.add_argument("--outage-s", type=float, default=8.0, help="seconds S3 stays down each time")
    p.add_argument("--new-versions", type=int, default=4, help="adapters that get a new version pushed")
    p.add_argument("--sync-interval-s", type=float, default=2.0, help="the gateway's store polling interval")
    p.add_argument("--disk-cache-fraction", type=float, default=0.5, help="of all adapters' bytes: the disk cache")
    p.add_argument("--warmup-fraction", type=float, default=0.2, help="of the requests, before RSS is judged")
    p.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed RSS growth after warm-up")
    p.add_argument("--min-ok", type=float, default=0.8, help="fraction of requests that must succeed")
    opts = p.parse_args(argv)
    if opts.max_loras > opts.max_cpu_loras or opts.new_versions > opts.adapters or opts.check_every < 0:
        p.error("need --max-loras <= --max-cpu-loras, --new-versions <= --adapters, --check-every >= 0")
    return opts


def main(argv: list[str]) -> int:
    opts = _parse(argv)
    with bench_work_dir("soak") as work, S3Process(BUCKET) as s3:
        os.environ.update(s3.env)  # this process publishes into the store too
        model = base_model(opts, work)
        keys_file, api_key = admin_key(work)
        refs = [f"user{i:02d}/soak" for i in range(opts.adapters)]
        progress(f"publishing {len(refs)} adapters to moto S3")
        published = asyncio.run(publish_synthetic(STORE, model, refs, opts.rank, work))
        adapter_bytes = sum(f.size for p in published for f in p.record.files)
        soak = Soak(opts, model, s3, work, {p.record.ref: p for p in published})
        flags = {"kv_cache_gib": opts.kv_cache_gib, "max_loras": opts.max_loras, "max_cpu_loras": opts.max_cpu_loras,
                 "max_lora_rank": max(8, opts.rank),
                 "sync_interval_s": opts.sync_interval_s, "max_running_per_user": opts.concurrency,
                 "cache_max_bytes": int(opts.disk_cache_fraction * adapter_bytes)}  # fmt: skip
        server = gateway_server(model, STORE, keys_file, opts.out / "logs" / "gateway.log", s3.env, **flags)
        progress(f"gateway starting (log: {server.log_path})")
        with running(server, opts.startup_timeout):
            assert server.process is not None
            duration = asyncio.run(soak.run(server.base_url, api_key, server.process.pid))
            exit_code = server.process.poll()
        if exit_code is not None:
            soak.timeline.note(soak.started, f"the gateway exited with {exit_code} during the soak")
        checked, on_new_versions, wrong = 0, 0, []
        if opts.check_every:
            progress("checking outputs against the reference (transformers + PEFT)")
            checked, on_new_versions, wrong = soak.check()
    rss = rss_growth(soak.timeline.rss, int(opts.warmup_fraction * opts.requests))
    figures = summarize(soak.outcomes, wrong, checked, rss, opts, duration)
    figures["checked_on_new_versions"] = on_new_versions
    report = {"config": config_of(opts), "model": str(model.path), "figures": figures,
              "events": soak.timeline.events, "versions": [asdict(v) for v in soak.timeline.versions],
              "wrong": wrong[:20], "rss_samples": soak.timeline.rss}  # fmt: skip
    write_report(opts.out, "soak", report, render(figures, opts),
                 lambda path: plot(soak.outcomes, soak.timeline, soak.started, path))  # fmt: skip
    return 0 if all(figures["targets_met"].values()) else 1
