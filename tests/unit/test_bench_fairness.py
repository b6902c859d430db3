"""The pure parts of `lora-gateway bench fairness`: pooling, alice's window, ratios, targets, SSE, the table."""

from __future__ import annotations

import math

import pytest

from gateway_tools.bench.fairness import (
    SLOT_HOG_TARGETS,
    TARGETS,
    BobRun,
    FloodWindow,
    cold_wait_ratio,
    fairness_ratios,
    flood_window,
    markdown_table,
    meets_targets,
    result_of,
    sse_data,
    summarize_alice,
    summarize_bob,
)


def test_summarize_bob_pools_phases() -> None:
    first = BobRun(requested=4, latencies_s=[0.1, 0.2, 0.3], ttft_s=[0.01, 0.02, 0.03], errors=1)
    second = BobRun(requested=2, latencies_s=[0.4, 0.5], ttft_s=[0.04, 0.05])
    s = summarize_bob([first, second])
    assert (s.requested, s.latency.ok, s.latency.errors) == (6, 5, 1)
    assert s.latency.p50_s == pytest.approx(0.3)
    assert s.latency.p99_s == pytest.approx(0.496)  # linear interpolation between 0.4 and 0.5
    assert s.ttft.p50_s == pytest.approx(0.03)
    # The report's keys, as in docs/bench/fairness-*.json
    assert s.as_json() == pytest.approx({"requested": 6, "ok": 5, "errors": 1, "p50_s": 0.3, "p99_s": 0.496,
                                         "ttft_p50_s": 0.03, "ttft_p99_s": 0.0496})  # fmt: skip


def test_flood_window_and_alice_rates() -> None:
    # counters: completed, tokens, rejected, errors, in flight (not a total: ignored)
    w = flood_window([10, 640, 1, 0, 200], [30, 1920, 4, 1, 199], duration_s=2.0)
    assert w == FloodWindow(completed=20, tokens=1280, rejected_429=3, errors=1, duration_s=2.0)
    a = summarize_alice([w, FloodWindow(10, 640, 0, 0, 1.0)])
    assert a.completed == 30 and a.rejected_429 == 3 and a.errors == 1
    assert a.requests_per_s == pytest.approx(10.0) and a.tokens_per_s == pytest.approx(640.0)
    assert summarize_alice([]).requests_per_s == 0.0


def test_ratios_and_targets() -> None:
    idle = summarize_bob([BobRun(requested=2, latencies_s=[1.0, 1.0], ttft_s=[0.1, 0.1])])
    ok = summarize_bob([BobRun(requested=2, latencies_s=[2.0, 2.0], ttft_s=[0.2, 0.2])])
    r = fairness_ratios(idle, ok)
    assert r == pytest.approx({"p50": 2.0, "p99": 2.0, "ttft_p50": 2.0, "ttft_p99": 2.0})
    assert meets_targets(ok, r) == {"bob_all_ok": True, "p50": True, "p99": True}

    starved = summarize_bob([BobRun(requested=2, latencies_s=[9.0], ttft_s=[8.0], errors=1)])
    assert meets_targets(starved, fairness_ratios(idle, starved)) == {"bob_all_ok": False, "p50": False, "p99": False}
    nothing = summarize_bob([BobRun(requested=2, errors=2)])
    r = fairness_ratios(idle, nothing)
    assert math.isnan(r["p50"])
    assert meets_targets(nothing, r) == {"bob_all_ok": False, "p50": False, "p99": False}  # NaN is no pass


def test_sse_data() -> None:
    assert sse_data(b'data: {"choices": [{"text": "x"}]}\n') == {"choices": [{"text": "x"}]}
    assert sse_data(b"data: [DONE]\n") is None
    assert sse_data(b"\n") is None
    assert sse_data(b": keep-alive\n") is None


def test_markdown_table_names_phases_ratios_and_alice() -> None:
    idle = summarize_bob([BobRun(requested=2, latencies_s=[0.5, 0.5], ttft_s=[0.1, 0.1])])
    flood = summarize_bob([BobRun(requested=2, latencies_s=[1.0, 1.0], ttft_s=[0.2, 0.2])])
    alice = summarize_alice([FloodWindow(20, 1280, 3, 0, 2.0)])
    text = markdown_table({"limited": result_of("max_running_per_user 64", idle, flood, alice, TARGETS)})
    assert "| limited: bob idle | 2/2 | 0.500 | 0.500 | 0.100 | 0.100 |  |  |" in text
    assert "| limited: flood / idle |  | 2.00x | 2.00x | 2.00x | 2.00x | 10.0 req/s, 640 tok/s | 3 |" in text
    assert "limited (max_running_per_user 64): bob all ok: met; p50 <= 3.5x: met; p99 <= 6.0x: met" in text


def test_a_cold_adapters_wait_is_judged_against_one_requests_service_time() -> None:
    idle = summarize_bob([BobRun(requested=2, latencies_s=[0.5, 0.5], ttft_s=[0.1, 0.1])])
    flood = summarize_bob([BobRun(requested=2, latencies_s=[0.6, 0.6], ttft_s=[0.1, 0.1])])
    quick = summarize_bob([BobRun(requested=2, latencies_s=[1.0, 1.2], ttft_s=[0.4, 1.4])])
    slow = summarize_bob([BobRun(requested=3, latencies_s=[2.0, 2.0], ttft_s=[1.6, 1.6], errors=1)])
    ratio = fairness_ratios(idle, flood)
    ratio["cold_p99_wait"] = cold_wait_ratio(idle, quick)
    assert ratio["cold_p99_wait"] == pytest.approx(1.4 / 0.5, rel=0.05)
    assert meets_targets(flood, ratio, SLOT_HOG_TARGETS, quick) == {
        "bob_all_ok": True, "p50": True, "p99": True, "cold_all_ok": True, "cold_wait": True
    }  # fmt: skip
    ratio["cold_p99_wait"] = cold_wait_ratio(idle, slow)
    met = meets_targets(flood, ratio, SLOT_HOG_TARGETS, slow)
    assert not met["cold_all_ok"] and not met["cold_wait"]
    alice = summarize_alice([FloodWindow(20, 1280, 0, 0, 2.0)])
    result = result_of("max_cpu_loras 4", idle, flood, alice, SLOT_HOG_TARGETS, slow)
    assert result["targets_met"] == met
    text = markdown_table({"limited": result})
    assert (
        "| limited: carol, cold adapters | 2/3 | 2.000 | 2.000 | 1.600 | 1.600 | wait p99 3.20x bob's idle p50 |"
        in text
    )
    assert "carol all ok: MISSED; cold p99 wait <= 3.0x: MISSED" in text
    assert "p50 <= 1.5x: met; p99 <= 6.0x" in text
