"""The pure parts of `lora-gateway bench serve`: vLLM's client's arguments, its results pooled,
ratios, targets, the table."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import pytest

from gateway_tools.bench.report import process_cpu_seconds
from gateway_tools.bench.serve import (
    client_argv,
    loads_of,
    markdown_table,
    parse_client_args,
    ratio_rows_of,
    ratios,
    run_of,
    summarize,
    target_results,
    targets_text,
)

SHAPE = {"requests": 64, "concurrency": 16, "input_len": 128, "output_len": 32, "seed": 7}


def vllm_result(
    completed: int = 10, failed: int = 0, duration: float = 1.0, ttft: float = 100.0, tpot: float = 10.0,
    e2el: float = 400.0, output_tokens: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Shaped like `vllm.benchmarks.serve.main`'s result with --save-detailed (lists included)."""
    result: dict[str, Any] = {
        "duration": duration, "completed": completed, "failed": failed,
        "total_output_tokens": 32 * completed if output_tokens is None else output_tokens,
        "request_throughput": completed / duration, "ttfts": [ttft / 1000] * completed,
        "errors": [""] * completed + [f"error {i}" for i in range(failed)],
    }  # fmt: skip
    for name, value in {"ttft": ttft, "tpot": tpot, "e2el": e2el}.items():
        result |= {f"median_{name}_ms": value, f"p99_{name}_ms": 2 * value, f"mean_{name}_ms": value}
    return result


def test_client_argv_is_what_vllms_own_parser_takes() -> None:
    argv = client_argv("http://127.0.0.1:9", Path("/m/base"), "tiny", ["u0/chat", "u1/chat"], "key", **SHAPE)
    args = parse_client_args(argv)
    assert (args.backend, args.base_url, args.endpoint) == ("openai", "http://127.0.0.1:9", "/v1/completions")
    assert (args.model, args.tokenizer, args.dataset_name) == ("tiny", "/m/base", "random")
    assert (args.random_input_len, args.random_output_len, args.num_prompts) == (128, 32, 64)
    assert (args.max_concurrency, args.seed, args.temperature, args.ignore_eos) == (16, 7, 0.0, True)
    assert args.lora_modules == ["u0/chat", "u1/chat"] and args.lora_assignment == "round-robin"
    assert args.header == ["Authorization=Bearer key"]  # the gateway's API key; vLLM's server ignores it
    assert (args.percentile_metrics, args.metric_percentiles) == ("ttft,tpot,e2el", "99")
    assert args.save_detailed and not args.save_result and args.disable_tqdm


def test_the_base_alone_sends_no_lora_modules() -> None:
    argv = client_argv("http://h", Path("/b"), "tiny", ["tiny"], "key", **SHAPE)
    assert "--lora-modules" not in argv and argv[argv.index("--model") + 1] == "tiny"


def test_run_of_keeps_scalars_and_the_first_errors() -> None:
    run = run_of(vllm_result(completed=2, failed=7), other_cpu_s=0.5, probes=[0.01])
    assert "ttfts" not in run.figures and run.figures["median_ttft_ms"] == 100.0
    assert run.errors == [f"error {i}" for i in range(5)]
    assert run.other_cpu_s == 0.5 and run.probe_latencies_s == (0.01,)


def test_summarize_pools_rates_and_takes_the_median_of_the_rounds_latencies() -> None:
    rounds = [vllm_result(10, 1, 1.0, ttft=100), vllm_result(20, 0, 3.0, ttft=300), vllm_result(6, 0, 2.0, ttft=120)]
    s = summarize([run_of(r, other_cpu_s=1.5) for r in rounds])
    assert (s.requests, s.failed, s.duration_s) == (37, 1, 6.0)
    assert s.requests_per_s == pytest.approx(36 / 6.0)  # failed requests are not throughput
    assert s.output_tokens_per_s == pytest.approx(32 * 36 / 6.0)
    assert (s.ttft_median_ms, s.ttft_p99_ms) == (120.0, 240.0)
    assert (s.tpot_median_ms, s.e2el_p99_ms) == (10.0, 800.0)
    assert s.other_cores == pytest.approx(4.5 / 6.0)
    assert math.isnan(s.probe_p99_s)


def test_the_http_process_cpu_is_per_completed_request() -> None:
    rounds = [vllm_result(10, 2, 1.0), vllm_result(20, 0, 3.0)]
    s = summarize([run_of(r, front_cpu_s=cpu) for r, cpu in zip(rounds, (0.3, 0.6), strict=True)])
    assert s.front_cpu_ms_per_request == pytest.approx(1000 * 0.9 / 30)
    assert math.isnan(summarize([run_of(vllm_result(0, 3, 1.0), front_cpu_s=0.1)]).front_cpu_ms_per_request)


def test_a_process_cpu_time_counts_its_own_work_only() -> None:
    before = process_cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    assert process_cpu_seconds(os.getpid()) - before >= 0.1
    assert process_cpu_seconds(2**22 + 1) == 0.0  # no such process


def test_a_round_without_successes_counts_as_failures_not_latencies() -> None:
    s = summarize([run_of(vllm_result(0, 5, ttft=0.0)), run_of(vllm_result(4, 0, ttft=50.0))])
    assert s.failed == 5 and s.ttft_median_ms == 50.0  # vLLM reports 0 ms for a run with none
    assert math.isnan(summarize([run_of(vllm_result(0, 3))]).ttft_median_ms)


def test_health_probes_are_summarised() -> None:
    s = summarize([run_of(vllm_result(), probes=[0.002] * 99 + [1.5])])
    assert s.probe_max_s == 1.5 and s.probe_p99_s == pytest.approx(0.002 + 0.01 * (1.5 - 0.002))  # interpolated


def summary(completed: int, ttft: float) -> Any:
    return summarize([run_of(vllm_result(completed, ttft=ttft))])


def test_ratios_are_gateway_over_vllm_per_figure() -> None:
    r = ratios(summary(11, 90.0), summary(10, 100.0))
    assert r["requests_per_s"] == pytest.approx(1.1) and r["output_tokens_per_s"] == pytest.approx(1.1)
    assert r["ttft_median_ms"] == pytest.approx(0.9) and r["ttft_p99_ms"] == pytest.approx(0.9)
    assert r["tpot_median_ms"] == r["e2el_median_ms"] == r["e2el_p99_ms"] == pytest.approx(1.0)


def test_targets_are_ratios_in_one_run_marked_met_or_missed() -> None:
    summaries = {"gateway, base only": summary(10, 104.0), "vLLM, base only": summary(9, 100.0),
                 "gateway, 4 adapters": summary(8, 120.0), "vLLM, 4 adapters": summary(9, 100.0)}  # fmt: skip
    results = target_results(summaries)
    assert {k: (round(v["value"], 3), v["met"]) for k, v in results.items()} == {
        "base only, gateway / vLLM throughput": (1.111, True),
        "base only, gateway / vLLM TTFT median": (1.04, True),
        "4 adapters, gateway / vLLM throughput": (0.889, False),
        "4 adapters, gateway / vLLM TTFT median": (1.2, False),
        "4 adapters, gateway / vLLM throughput (issue 13)": (0.889, False),
        "4 adapters / base only, the gateway's throughput (issue 13)": (0.8, True),
    }
    text = targets_text(results)
    assert "base only, gateway / vLLM TTFT median: 1.04x (target <= 1.05x: met)" in text
    assert "4 adapters, gateway / vLLM throughput: 0.89x (target >= 1.00x: MISSED)" in text


def test_targets_skip_loads_not_measured_and_a_nan_is_missed() -> None:
    results = target_results({"gateway, base only": summary(0, 0.0), "vLLM, base only": summary(9, 100.0)})
    assert list(results) == ["base only, gateway / vLLM throughput", "base only, gateway / vLLM TTFT median"]
    assert results["base only, gateway / vLLM TTFT median"]["met"] is False  # no successes: NaN


def test_markdown_table_names_each_server_and_load_and_the_ratios() -> None:
    s = summarize([run_of(vllm_result(2, 0, 1.0, ttft=100.0, tpot=10.0, e2el=400.0), probes=[0.01, 0.02])])
    rows = ratio_rows_of({"gateway, base only": s, "vLLM, base only": s}, ["base only"], ["gateway"])
    table = markdown_table({"gateway, base only": s, "vLLM, base only": s}, rows)
    assert (
        "| gateway, base only | 2.00 | 64.0 | 100.0 / 200.0 | 10.0 / 20.0 | 400.0 / 800.0 | 0 | 20 / 20 | 0.00 |"
        in table
    )
    assert (
        "| gateway / vLLM, base only | 1.000x | 1.000x | 1.000x / 1.000x | 1.000x / 1.000x | 1.000x / 1.000x |" in table
    )


def test_each_gateway_variant_gets_a_ratio_row_per_load() -> None:
    s = summary(4, 100.0)
    summaries = {f"{server}, {load}": s for server in ("gateway", "vLLM", "gateway with vLLM's ops")
                 for load in ("base only", "4 adapters")}  # fmt: skip
    rows = ratio_rows_of(summaries, ["base only", "4 adapters"], ["gateway", "gateway with vLLM's ops"])
    assert list(rows) == ["gateway / vLLM, base only", "gateway with vLLM's ops / vLLM, base only",
                          "gateway / vLLM, 4 adapters", "gateway with vLLM's ops / vLLM, 4 adapters"]  # fmt: skip
    assert ratio_rows_of(summaries, ["base only"], []) == {}  # engine niceness: no vLLM server


def test_mixes_are_the_base_alone_then_that_many_adapters() -> None:
    adapters = [f"u{i}/a" for i in range(16)]
    loads = loads_of("base", adapters, [0, 1, 4, 16])
    assert loads == {"base only": ["base"], "1 adapter": ["u0/a"], "4 adapters": adapters[:4], "16 adapters": adapters}
