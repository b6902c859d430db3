"""The pure parts of `lora-gateway bench serve`: pooling, ratios, targets, the table."""

from __future__ import annotations

import math

import pytest

from gateway.bench.serve import (
    LoadResult,
    loads_of,
    markdown_table,
    meets_targets,
    mix_targets,
    mix_targets_text,
    ratios,
    summarize,
    targets_text,
)


def test_summarize_pools_rounds() -> None:
    first = LoadResult(latencies_s=[0.1, 0.2, 0.3], completion_tokens=90, errors=1, duration_s=1.0, other_cpu_s=0.5)
    second = LoadResult(latencies_s=[0.4, 0.5], completion_tokens=60, errors=0, duration_s=1.5, other_cpu_s=2.0)
    s = summarize([first, second])
    assert s.requests == 6 and s.errors == 1
    assert s.duration_s == pytest.approx(2.5)
    assert s.requests_per_s == pytest.approx(5 / 2.5)  # errors are not throughput
    assert s.tokens_per_s == pytest.approx(150 / 2.5)
    assert s.p50_s == pytest.approx(0.3)
    assert s.p99_s == pytest.approx(0.496)  # linear interpolation between 0.4 and 0.5
    assert s.other_cores == pytest.approx(2.5 / 2.5)


def test_summarize_without_successes() -> None:
    s = summarize([LoadResult(errors=3, duration_s=1.0)])
    assert s.requests == 3 and s.requests_per_s == 0.0
    assert math.isnan(s.p50_s)


def test_ratios_and_targets() -> None:
    vllm = summarize([LoadResult(latencies_s=[1.0] * 10, completion_tokens=100, duration_s=1.0)])
    fast = summarize([LoadResult(latencies_s=[1.04] * 10, completion_tokens=100, duration_s=1.0)])
    slow = summarize([LoadResult(latencies_s=[1.2] * 9, completion_tokens=90, duration_s=1.0)])
    r = ratios(fast, vllm)
    assert r["throughput"] == pytest.approx(1.0) and r["p50"] == pytest.approx(1.04)
    assert meets_targets(r) == {"throughput": True, "p50": True}
    assert meets_targets(ratios(slow, vllm)) == {"throughput": False, "p50": False}


def test_markdown_table_names_both_servers_and_the_ratio() -> None:
    s = summarize([LoadResult(latencies_s=[0.5, 0.5], ttfts_s=[0.1, 0.1], completion_tokens=64, duration_s=1.0)])
    table = markdown_table({"gateway": s, "vLLM": s}, {"gateway / vLLM": ratios(s, s)})
    assert "| gateway | 2.00 | 64.0 | 0.100 | 0.500 | 0.500 | 0 | nan / nan | 0.00 |" in table  # no health probes
    assert "| gateway / vLLM | 1.000x | 1.000x | 1.000x | 1.000x | 1.000x |" in table
    assert "throughput >= 1.00x: met" in targets_text(ratios(s, s))


def test_health_probes_are_summarised_and_a_niceness_table_has_no_ratio() -> None:
    probed = LoadResult(latencies_s=[1.0], completion_tokens=8, duration_s=2.0, probe_latencies_s=[0.002] * 99 + [1.5])
    s = summarize([probed])
    assert s.probe_max_s == 1.5 and s.probe_p99_s == pytest.approx(0.002 + 0.01 * (1.5 - 0.002))  # interpolated
    table = markdown_table({"gateway, engine nice 0": s, "gateway, engine nice 10": s}, {})
    assert "| gateway, engine nice 10 | 0.50 | 4.0 | nan | 1.000 | 1.000 | 0 | 17 / 1500 |" in table
    assert "gateway / vLLM" not in table


def test_mixes_are_the_base_alone_then_that_many_adapters() -> None:
    adapters = [f"u{i}/a" for i in range(16)]
    loads = loads_of("base", adapters, [0, 1, 4, 16])
    assert loads == {"base only": ["base"], "1 adapter": ["u0/a"], "4 adapters": adapters[:4], "16 adapters": adapters}
    assert loads_of("base", ["a/x"], None) == {"": ["base", "a/x"]}


def test_the_real_model_targets_are_ratios_in_one_run() -> None:
    def run(requests: int, ttft: float) -> object:
        return summarize([LoadResult(latencies_s=[1.0] * requests, ttfts_s=[ttft] * requests, duration_s=1.0)])

    summaries = {"gateway, base only": run(10, 0.20), "vLLM, base only": run(9, 0.20),
                 "gateway, 4 adapters": run(8, 0.3), "vLLM, 4 adapters": run(5, 0.3)}  # fmt: skip
    values = mix_targets(summaries)
    assert list(values.values()) == pytest.approx([10 / 9, 1.0, 8 / 5, 0.8])
    text = mix_targets_text(values)
    assert "base only, gateway / vLLM throughput: 1.11x (target >= 1.00x: met)" in text
    assert "4 adapters / base only, the gateway's throughput: 0.80x (target >= 0.75x: met)" in text
    summaries["gateway, 4 adapters"] = run(5, 0.3)
    assert "4 adapters, gateway / vLLM throughput: 1.00x (target >= 1.20x: MISSED)" in mix_targets_text(
        mix_targets(summaries)
    )
