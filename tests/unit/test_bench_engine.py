"""The pure parts of `lora-gateway bench swap|scale|rank|compare|soak`: summaries, ratios, targets,
tables, plots, the synthetic adapters they run on, and the soak's verdicts."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
from pathlib import Path

import pytest

from adapters_manifest.validation import BaseModelSpec, validate_adapter_dir
from gateway_tools.bench import compare, rank, scale, soak, swap
from gateway_tools.bench.harness import ALL_LINEAR, Timed, sse_payloads, token_ids_of, write_synthetic_adapter
from gateway_tools.bench.report import RequestStats, flat_json, request_stats
from gateway_tools.dev.tiny_model import build_base_model, build_tokenizer

# -- swap ---------------------------------------------------------------------------------


def swap_samples(running: float, cache: float, base: float) -> swap.Samples:
    s = swap.Samples()
    s.ttft_s = {"running": [running] * 3, "cpu cache": [cache] * 3, "disk": [0.02] * 3, "store": [0.05] * 3,
                "base": [base] * 3}  # fmt: skip
    s.restart_s = [20.0, 22.0]
    return s


def test_swap_summary_ratios_and_targets() -> None:
    summary = swap.summarize(swap_samples(running=0.0104, cache=0.0130, base=0.0100))
    assert summary["running_vs_base"] == pytest.approx(1.04)
    assert summary["cpu_cache_swap_added_ms"] == pytest.approx(2.6)
    assert summary["restart_to_first_token_s"] == pytest.approx(21.0)
    assert summary["restart_vs_cpu_cache_swap"] == pytest.approx(21.0 / 0.013)
    assert swap.targets_met(summary) == {"running_vs_base": True, "cpu_cache_swap": True}
    slow = swap.summarize(swap_samples(running=0.0110, cache=0.0170, base=0.0100))
    assert swap.targets_met(slow) == {"running_vs_base": False, "cpu_cache_swap": False}


def test_swap_ratios_are_paired_within_repeats() -> None:
    """The host slowed down after the first repeat, for every tier alike: no tier is slower than another."""
    s = swap.Samples()
    s.ttft_s = {"running": [0.008, 0.008, 0.020], "cpu cache": [0.009, 0.021, 0.021], "disk": [0.01] * 3,
                "store": [0.03] * 3, "base": [0.008, 0.020, 0.020]}  # fmt: skip
    summary = swap.summarize(s)
    assert summary["median_ttft_s"]["base"] / summary["median_ttft_s"]["running"] == pytest.approx(2.5)  # unpaired
    assert summary["running_vs_base"] == pytest.approx(1.0)
    assert summary["cpu_cache_swap_added_ms"] == pytest.approx(1.0)


def test_swap_without_samples_misses_its_targets() -> None:
    summary = swap.summarize(swap.Samples())
    assert math.isnan(summary["running_vs_base"])
    assert swap.targets_met(summary) == {"running_vs_base": False, "cpu_cache_swap": False}


def test_swap_table_and_plot(tmp_path: Path) -> None:
    samples = swap_samples(running=0.0104, cache=0.0130, base=0.0100)
    summary = swap.summarize(samples)
    table = swap.render(samples, summary)
    assert "| cpu cache | 3 | 13.0 | 13.0 | 13.0 | +2.6 |" in table
    assert "| engine restart (process start -> first token) | 2 | 21000.0 |" in table
    assert "running / base TTFT (paired p50): 1.040x (target <= 1.05x: met)" in table
    swap.plot(samples, summary, tmp_path / "swap.png")
    assert (tmp_path / "swap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- scale --------------------------------------------------------------------------------


def timed(latency: float, ok: bool = True, tokens: int = 16) -> Timed:
    return Timed(ok=ok, status=200 if ok else 503, latency_s=latency, tokens=tokens if ok else 0,
                 error="" if ok else "adapter_capacity_exhausted")  # fmt: skip


def test_scale_grid_parsing() -> None:
    assert scale.parse_grid("8:16, 16:64") == [(8, 16), (16, 64)]
    with pytest.raises(ValueError, match="max_loras <= max_cpu_loras"):
        scale.parse_grid("8:4")


def test_scale_points_ratios_and_target(tmp_path: Path) -> None:
    base = scale.point_of(8, 64, scale.BASE, [timed(0.1)] * 100, 1.0)
    many = scale.point_of(8, 64, 64, [timed(0.2)] * 75 + [timed(0.3)] * 5, 1.0)
    few_slots = scale.point_of(2, 64, 64, [timed(0.5)] * 10, 1.0)
    few_slots_base = scale.point_of(2, 64, scale.BASE, [timed(0.1)] * 100, 1.0)
    assert many.stream.requests_per_s == 80 and many.stream.tokens_per_s == 80 * 16 and many.stream.errors == 0
    assert list(flat_json(many)) == ["max_loras", "max_cpu_loras", "adapters", "requests", "errors", "duration_s",
                                     "requests_per_s", "tokens_per_s", "p50_s", "p99_s", "first_errors",
                                     "other_cores", "engine_running"]  # as in docs/bench/*scale.json  # fmt: skip
    ratio = scale.vs_base([base, many, few_slots_base, few_slots])
    assert ratio[(8, 64, 64)] == pytest.approx(0.8)
    assert ratio[(2, 64, 64)] == pytest.approx(0.1)
    # Only max_loras >= 8 is judged: the 2-slot engine's 0.1x does not fail the target.
    assert scale.target_met([base, many, few_slots_base, few_slots]) is True
    slow = scale.point_of(8, 64, 64, [timed(0.2)] * 60, 1.0)
    assert scale.target_met([base, slow]) is False
    failing = scale.point_of(8, 64, 64, [timed(0.2)] * 90 + [timed(0, ok=False)], 1.0)
    assert failing.stream.errors == 1 and failing.first_errors == ("503 adapter_capacity_exhausted",)
    assert scale.target_met([base, failing]) is False
    assert scale.target_met([few_slots_base, few_slots]) is None
    table = scale.render([base, dataclasses.replace(many, engine_running=10.5)])
    assert "| 8:64 | base only | 100.0 | 1600 | 0.100 | 0.100 | 0 | 1.00x | 0.0 |" in table
    assert "| 8:64 | 64 | 80.0 |" in table and "0.80x | 10.5 |" in table
    assert table.endswith("Targets: 64 adapters >= 0.8x, 256 adapters >= 0.6x base with max_loras >= 8: met. "
                          "Rows: medians over rounds.")  # fmt: skip
    scale.plot([base, many, few_slots_base, few_slots], tmp_path / "scale.png")
    assert (tmp_path / "scale.png").stat().st_size > 1000


async def test_scale_samples_the_engines_running_requests_while_the_stream_runs() -> None:
    class Gauges:  # the gateway's /metrics page: vLLM's gauge rises as the stream fills the engine
        def __init__(self) -> None:
            self.scrapes: list[str] = []

        async def metric_sum(self, name: str) -> float:
            self.scrapes.append(name)
            return float(min(len(self.scrapes), 3) * 10)

    async def stream() -> str:
        await asyncio.sleep(0.2)
        return "results"

    gauges = Gauges()
    result, mean = await scale.engine_running_meanwhile(gauges, stream(), every_s=0.01)  # type: ignore[arg-type]
    assert result == "results"
    assert set(gauges.scrapes) == {"vllm:num_requests_running"} and len(gauges.scrapes) >= 5
    assert 20 < mean <= 30  # 10, 20, then 30 for every later scrape
    scrapes = len(gauges.scrapes)
    await asyncio.sleep(0.05)
    assert len(gauges.scrapes) == scrapes  # the sampler stopped with the stream
    rounds = [
        dataclasses.replace(scale.point_of(8, 64, 64, [timed(0.1)] * 10, 1.0), engine_running=r) for r in (4, 9, 5)
    ]
    assert scale.aggregate(rounds)[0].engine_running == 5  # the median of rounds, as the other figures


def test_scale_ratios_pair_each_stream_with_the_base_stream_before_it() -> None:
    """The host slowed to half speed midway: each adapter stream is judged against its own neighbour."""
    streams = ((scale.BASE, 100), (4, 80), (scale.BASE, 50), (64, 40), (scale.BASE, 60), (256, 36))
    points = [scale.point_of(8, 64, n, [timed(0.1)] * rps, 1.0) for n, rps in streams]
    ratio = scale.vs_base(points)
    assert ratio[(8, 64, 4)] == pytest.approx(0.8) and ratio[(8, 64, 64)] == pytest.approx(0.8)
    assert ratio[(8, 64, 256)] == pytest.approx(0.6)
    assert scale.target_met(points) is True  # against the first base stream, 64 adapters would read 0.4x
    # 256 adapters have a target of their own (0.6x): 0.5x misses it, though 64 adapters meet theirs.
    slower = [*points[:-1], scale.point_of(8, 64, 256, [timed(0.1)] * 30, 1.0)]
    assert scale.target_met(slower) is False
    table = scale.render(points)
    assert table.count("base only") == 1 and "| 8:64 | base only | 60.0 |" in table  # the median base stream


def test_scale_takes_the_median_of_rounds_so_one_stalled_stream_does_not_decide() -> None:
    streams = ((scale.BASE, 100), (64, 30), (scale.BASE, 100), (64, 80), (scale.BASE, 40), (64, 90))
    points = [scale.point_of(8, 64, n, [timed(0.1)] * rps, 1.0) for n, rps in streams]
    assert scale.paired_ratios(points)[(8, 64, 64)] == pytest.approx([0.3, 0.8, 2.25])
    assert scale.vs_base(points)[(8, 64, 64)] == pytest.approx(0.8)
    assert scale.target_met(points) is True
    rows = scale.aggregate(points)
    assert [(p.adapters, p.stream.requests_per_s, p.stream.requests) for p in rows] == [
        (0, 100.0, 240),
        (64, 80.0, 200),
    ]


# -- rank ---------------------------------------------------------------------------------


def stream(tokens_per_s: int, p50_s: float) -> RequestStats:
    """A one-second stream of one request."""
    return request_stats([p50_s], duration_s=1.0, tokens=tokens_per_s)


def test_rank_table_per_adapter_memory_and_speed(tmp_path: Path) -> None:
    results = [
        rank.RankResult(0, 0, 0, 0, None, stream(1000, 0.3), 0),
        rank.RankResult(8, 48 * 1024, 32, 32 * 100 * 1024, None, stream(950, 0.31), 0, 1000.0),
        rank.RankResult(64, 355 * 1024, 32, 32 * 700 * 1024, 32 * 400 * 1024, stream(800, 0.4), 0, 1100.0),
    ]
    assert results[1].rss_per_adapter == 100 * 1024
    assert results[1].gpu_per_adapter is None and results[2].gpu_per_adapter == 400 * 1024
    table = rank.render(results)
    assert "| base |  |  | 1000 | 0.300 | 1.00x |" in table
    assert "| 8 | 48 | 32 | 950 | 0.310 | 0.95x | 100 | n/a (no GPU) | 0 |" in table
    assert "| 64 | 355 | 32 | 800 | 0.400 | 0.73x | 700 | 400 | 0 |" in table  # vs its own base stream
    rank.plot(results, tmp_path / "rank.png")
    assert (tmp_path / "rank.png").stat().st_size > 1000


def test_rank_table_with_trained_adapters_leads_with_their_quality(tmp_path: Path) -> None:
    quality = {0: rank.Quality(2.5, 2.6, 0.4, 0.0), 8: rank.Quality(0.2, 0.31, 0.91, 60.0)}
    results = [
        rank.RankResult(0, 0, 0, 0, None, stream(50, 0.3), 0, quality=quality[0]),
        rank.RankResult(8, 9800 * 1024, 32, 32 * 10000 * 1024, None, stream(40, 0.31), 0, 50.0, quality[8]),
    ]
    table = rank.render(results)
    assert table.splitlines()[0].startswith(
        "| rank | held-out loss | held-out tokens right | training loss | file (KiB) |"
    )
    assert "| base | 2.600 | 40% | 2.500 |  |  | 50 | 0.300 | 1.00x |" in table
    assert "| 8 | 0.310 | 91% | 0.200 | 9800 | 32 | 40 | 0.310 | 0.80x | 10000 | n/a (no GPU) | 0 |" in table
    rank.plot(results, tmp_path / "rank.png")
    assert (tmp_path / "rank.png").stat().st_size > 1000


def test_the_task_dataset_holds_out_questions_it_never_trains_on(tmp_path: Path) -> None:
    from gateway_tools.bench.tasks import TASKS, write_task_dataset

    write_task_dataset(tmp_path / "train.jsonl", tmp_path / "held.jsonl", 60, 30)
    again = tmp_path / "again"
    again.mkdir()
    write_task_dataset(again / "train.jsonl", again / "held.jsonl", 60, 30)
    assert (again / "train.jsonl").read_bytes() == (tmp_path / "train.jsonl").read_bytes()  # seeded
    train = [json.loads(line)["messages"] for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line)["messages"] for line in (tmp_path / "held.jsonl").read_text().splitlines()]
    assert (len(train), len(held)) == (60, 30)
    assert not {m[0]["content"] for m in train} & {m[0]["content"] for m in held}
    sums = [m for m in train if m[0]["content"].startswith("What is ")]
    assert len(sums) == 60 // len(TASKS)
    for question, answer in ((m[0]["content"], m[1]["content"]) for m in sums):
        a, b = (int(x) for x in question.removeprefix("What is ").removesuffix("?").split(" plus "))
        assert answer == f"{a} plus {b} is {a + b}."


# -- compare ------------------------------------------------------------------------------


def test_compare_agreement_cells_and_table(tmp_path: Path) -> None:
    assert compare.agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert compare.agreement([1, 2], [1, 2, 3, 4]) == 0.5  # a shorter completion differs where it stops
    assert compare.agreement([], []) == 1.0
    assert compare.shown("a|b\n") == "a\\|b\\n"
    assert len(compare.shown("x" * 500)) == compare.SHOWN_CHARS
    completions = [
        compare.Completion("def f():", "tiny", " return 1", [1, 2, 3]),
        compare.Completion("def f():", "alice/chat", " pass", [1, 5, 6]),
        compare.Completion("def f():", "bob/chat", "", [], "error 422 adapter_load_failed"),
    ]
    table = compare.render(completions, "tiny")
    assert "| def f(): | tiny |  return 1 |  |" in table
    assert "| def f(): | alice/chat |  pass | 33% |" in table
    assert "| def f(): | bob/chat | error 422 adapter_load_failed | 0% |" in table
    compare.plot(completions, "tiny", tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_compare_with_two_dtypes_sets_each_beside_the_first(tmp_path: Path) -> None:
    completions = [
        compare.Completion("Hi", "base", " a b c d", [1, 2, 3, 4], dtype="float32"),
        compare.Completion("Hi", "base", " a b c e", [1, 2, 3, 5], dtype="bfloat16"),
        compare.Completion("Hi", "alice/chat", " x y", [7, 8, 9, 10], dtype="float32"),
        compare.Completion("Hi", "alice/chat", " x z", [7, 8, 3, 4], dtype="bfloat16"),
    ]
    table = compare.render(completions, "base").splitlines()
    assert table[:2] == [
        "| prompt | model | dtype | completion (greedy) | tokens as base | tokens as float32 |",
        "|---|---|---|---|---:|---:|",
    ]
    assert "| Hi | base | bfloat16 |  a b c e |  | 75% |" in table
    assert "| Hi | alice/chat | bfloat16 |  x z | 25% | 50% |" in table  # vs the bfloat16 base: 1 of 4
    compare.plot(completions, "base", tmp_path / "compare.png")
    costs = [
        compare.ModelCost("base", 0.5, 0.4, 0, stream(40, 1.0), 0, "float32"),
        compare.ModelCost("alice/chat", 0.7, 0.45, 10 << 20, stream(30, 1.2), 0, "float32"),
        compare.ModelCost("base", 0.3, 0.2, 0, stream(80, 0.5), 0, "bfloat16"),
        compare.ModelCost("alice/chat", 0.4, 0.25, 5 << 20, stream(60, 0.6), 0, "bfloat16"),
    ]
    rows = compare.render_costs(costs).splitlines()
    assert rows[0].startswith("| model | dtype | first request (ms) | warm (ms) | load (ms) | host RSS added (MiB) |")
    assert "| alice/chat | float32 | 700 | 450 | 250 | +10.0 | 30.0 | 0.75x | 0.75x | 1.20 | 0 |" in rows
    assert "| alice/chat | bfloat16 | 400 | 250 | 150 | +5.0 | 60.0 | 0.75x | 1.50x | 0.60 | 0 |" in rows


# -- soak ---------------------------------------------------------------------------------


def outcome(ok: bool = True, status: int = 200, error: str = "", retry_after: str | None = None,
            ids: tuple[int, ...] = (1, 2)) -> soak.Outcome:  # fmt: skip
    return soak.Outcome(0, "a/x", "p", False, True, 0.0, 1.0, ok, status, error, retry_after, ids)


def test_soak_error_kinds() -> None:
    assert soak.error_kind(outcome()) == "ok"
    assert soak.error_kind(outcome(False, 503, "service_unavailable", "5")) == "clear: 503 service_unavailable"
    # A 503 without Retry-After does not tell the client what to do: not a clear error.
    assert soak.error_kind(outcome(False, 503, "service_unavailable")) == "unexpected: 503 service_unavailable"
    assert soak.error_kind(outcome(False, 500, "error", "1")) == "unexpected: 500 error"
    assert soak.error_kind(outcome(False, 0, "ClientConnectionError")) == "lost: 0 ClientConnectionError"
    assert soak.error_kind(outcome(False, 502, "no JSON error body")) == "lost: 502 no JSON error body"
    assert soak.error_kind(outcome(False, 200, "stream cut off before [DONE]")).startswith("lost")
    assert soak.error_kind(outcome(False, 200, "stream error event: service_unavailable")).startswith("clear")


def test_soak_acceptable_versions_around_a_switch() -> None:
    inf = float("inf")
    versions = [soak.VersionEvent("a/x", "v1", -inf, -inf), soak.VersionEvent("a/x", "v2", 10.0, 12.0)]
    assert soak.acceptable_versions(versions, 5.0, 9.0) == ["v1"]  # before the push
    assert soak.acceptable_versions(versions, 9.0, 11.0) == ["v1", "v2"]  # across it
    assert soak.acceptable_versions(versions, 11.0, 11.5) == ["v1", "v2"]  # pushed, not yet seen served
    assert soak.acceptable_versions(versions, 12.5, 13.0) == ["v2"]  # seen served before it began
    never_seen = [versions[0], soak.VersionEvent("a/x", "v2", 10.0, inf)]
    assert soak.acceptable_versions(never_seen, 100.0, 101.0) == ["v1", "v2"]


def test_soak_rss_growth_after_warm_up() -> None:
    samples = [(0.0, 0, 500), (1.0, 10, 1000), (2.0, 50, 1050), (3.0, 90, 1020)]
    assert soak.rss_growth(samples, 10) == (1000, 1050, pytest.approx(0.05))
    assert math.isnan(soak.rss_growth(samples, 1000)[2])


def soak_opts(**overrides: object) -> argparse.Namespace:
    return argparse.Namespace(**({"requests": 4, "min_ok": 0.5, "rss_tolerance": 0.1, "check_every": 1} | overrides))


def test_soak_summary_targets_and_table() -> None:
    outcomes = [outcome(), outcome(), outcome(), outcome(False, 503, "service_unavailable", "5")]
    figures = soak.summarize(outcomes, [], 3, (1000, 1050, 0.05), soak_opts(), 2.0)
    assert figures["ok"] == 3 and figures["lost"] == 0 and figures["requests_per_s"] == 1.5
    assert figures["errors_by_type"] == {"clear: 503 service_unavailable": 1}
    assert all(figures["targets_met"].values())
    table = soak.render(figures, soak_opts())
    assert "| wrong outputs (oracle-checked) | 0 of 3 checked (0 on versions pushed during the run) | met |" in table
    assert "| error: clear: 503 service_unavailable | 1 |  |" in table
    lost = soak.summarize([*outcomes[:3], outcome(False, 0, "ServerDisconnectedError")], [], 3, (1, 1, 0.0),
                          soak_opts(), 2.0)  # fmt: skip
    assert lost["targets_met"]["no_lost_requests"] is False
    wrong = soak.summarize(outcomes, [{"request": 1}], 3, (1, 1, 0.0), soak_opts(), 2.0)
    assert wrong["targets_met"]["no_wrong_outputs"] is False
    unchecked = soak.summarize(outcomes, [], 0, (1, 1, 0.0), soak_opts(), 2.0)
    assert unchecked["targets_met"]["no_wrong_outputs"] is False  # nothing checked proves nothing
    check_off = soak.summarize(outcomes, [], 0, (1, 1, 0.0), soak_opts(check_every=0), 2.0)
    assert "no_wrong_outputs" not in check_off["targets_met"]  # not judged, and the table says so
    assert "| 0 of 0 checked (0 on versions pushed during the run) | not checked (--check-every 0) |" in soak.render(
        check_off, soak_opts(check_every=0)
    )
    grew = soak.summarize(outcomes, [], 3, (1000, 1200, 0.2), soak_opts(), 2.0)
    assert grew["targets_met"]["rss_flat"] is False
    short = soak.summarize(outcomes[:3], [], 3, (1, 1, 0.0), soak_opts(), 2.0)
    assert short["targets_met"]["all_requests_answered"] is False


# -- the harness ---------------------------------------------------------------------------


def test_sse_payloads_and_token_ids() -> None:
    raw = b'data: {"choices": [{"text": "a"}]}\n\ndata: {"error": {"code": "x"}}\n\ndata: [DONE]\n\n'
    assert sse_payloads(raw) == [{"choices": [{"text": "a"}]}, {"error": {"code": "x"}}]
    assert token_ids_of(["token_id:5", "token_id:17"]) == [5, 17]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("base")
    build_tokenizer(base)
    build_base_model(base)
    return base


@pytest.mark.parametrize("rank_", [8, 64])
def test_synthetic_adapters_pass_validation_and_differ_by_seed(tiny_base: Path, tmp_path: Path, rank_: int) -> None:
    from safetensors.numpy import load_file

    write_synthetic_adapter(tiny_base, tmp_path / "a", rank_, seed=1)
    write_synthetic_adapter(tiny_base, tmp_path / "b", rank_, seed=2)
    summary = validate_adapter_dir(tmp_path / "a", BaseModelSpec.from_model_dir(tiny_base, max_lora_rank=64))
    assert summary.rank == rank_ and set(summary.target_modules) == set(ALL_LINEAR)
    a, b = (
        load_file(str(tmp_path / "a" / "adapter_model.safetensors")),
        load_file(str(tmp_path / "b" / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # A and B, 7 modules, 2 layers
    assert any((a[k] != b[k]).any() for k in a)


def test_synthetic_adapter_loads_in_peft_and_changes_the_output(tiny_base: Path, tmp_path: Path) -> None:
    from gateway_tools.dev.oracle import ReferenceModel

    write_synthetic_adapter(tiny_base, tmp_path / "a", 8, seed=1)
    oracle = ReferenceModel(tiny_base)
    prompt = oracle.prompt_ids("def parse(value):")
    assert oracle.greedy_ids(tmp_path / "a", prompt, 8) != oracle.greedy_ids(None, prompt, 8)


def test_scale_compares_an_unscheduled_gateway_only_when_asked() -> None:
    assert scale.gateways(scale._parse([])) == [("scheduled", {})]
    both = scale.gateways(scale._parse(["--compare-unscheduled"]))
    assert both == [("scheduled", {}), ("unscheduled", {"engine_seats": 0, "adapter_slot_aging_s": 1e9})]
