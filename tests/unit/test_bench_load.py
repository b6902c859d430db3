"""The pure parts of `lora-gateway bench load`: records it seeds, summaries, ratios, targets, tables."""

from __future__ import annotations

import math

import pytest

from adapters_manifest.record import AdapterFile, AdapterRecord
from gateway_tools.bench.load import render, sync_summary, targets_met, tier_summary
from gateway_tools.bench.load_sync import SyncSamples, record_objects
from gateway_tools.bench.load_tiers import TierSamples, object_key
from gateway_tools.bench.report import markdown_table, percentile, ratio_of, request_stats

TEMPLATE = AdapterRecord(
    owner="bench",
    name="rank8",
    version="0123456789abcdef",
    base_model="tiny-llama",
    rank=8,
    alpha=16.0,
    target_modules=["q_proj"],
    files=[AdapterFile(name="adapter_config.json", sha256="a" * 64, size=10)],
)


def test_report_helpers() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert math.isnan(percentile([], 50))
    assert ratio_of(3.0, 2.0) == 1.5 and math.isnan(ratio_of(1.0, 0.0))
    table = markdown_table(["name", "n"], [["a", "1"]])
    assert table.splitlines() == ["| name | n |", "|---|---:|", "| a | 1 |"]


def test_record_objects_are_valid_distinct_records_under_the_manifest_prefix() -> None:
    objects = list(record_objects(TEMPLATE, 25, "sync"))
    assert len(objects) == 25
    refs = set()
    for key, body in objects:
        record = AdapterRecord.model_validate_json(body)  # what a sync reads back
        assert key == f"sync/manifest/{record.owner}/{record.name}.json"
        assert record.files == TEMPLATE.files and record.version == TEMPLATE.version
        refs.add(record.ref)
    assert len(refs) == 25
    assert object_key("", "manifest/a/b.json") == "manifest/a/b.json"


def test_tier_summary_ratios_and_targets() -> None:
    t = TierSamples(rank=8, bytes=2048)
    for seconds in (0.010, 0.011, 0.012):
        t.add("store_to_disk", seconds * 1.1)
        t.add("raw_get", seconds)
    t.add("resident_hit", 0.00001)
    rows = tier_summary([t])
    store = next(r for r in rows if r["move"] == "store_to_disk")
    assert store["p50_s"] == pytest.approx(0.0121) and store["ratio_p50"] == pytest.approx(1.1)
    assert store["baseline"] == "raw_get" and store["n"] == 3
    hit = next(r for r in rows if r["move"] == "resident_hit")
    assert "baseline" not in hit and hit["n"] == 1
    engine = next(r for r in rows if r["move"] == "disk_to_engine")
    assert engine["n"] == 0 and math.isnan(engine["ratio_p50"])  # not measured: never a result
    assert targets_met(rows, None) == {"store_to_disk_rank8": True}


def test_sync_summary_medians_and_best_ratios() -> None:
    sync = SyncSamples(records=100, seed_s=1.0, listing_s=[1.0, 1.2], gets_s=[4.0, 8.0],
                       initial_sync_s=[5.5, 6.0], poll_s=[1.0, 1.3, 1.1], poll_listing_s=[1.0, 1.0, 0.9])  # fmt: skip
    s = sync_summary(sync)
    assert s["initial_vs_bare"] == pytest.approx(5.75 / 7.1)
    assert s["initial_vs_bare_best"] == pytest.approx(5.5 / 5.0)
    assert s["poll_vs_listing"] == pytest.approx(1.1) and s["poll_vs_listing_best"] == pytest.approx(1.0 / 0.9)
    assert targets_met([], s) == {"no_change_poll": True}
    assert targets_met([], {**s, "poll_vs_listing": 1.2}) == {"no_change_poll": False}


def test_render_names_moves_raw_costs_and_targets() -> None:
    t = TierSamples(rank=64, bytes=4096, samples={"store_to_disk": [0.013], "raw_get": [0.010],
                                                   "disk_to_engine": [0.002], "file_read": [0.0001]})  # fmt: skip
    sync = SyncSamples(
        records=10, listing_s=[1.0], gets_s=[2.0], initial_sync_s=[3.0], poll_s=[1.0], poll_listing_s=[1.0]
    )
    text = render(tier_summary([t]), sync_summary(sync), "Plot: skipped")
    assert "| store -> disk | 64 | 4 | 13.00 | 13.00 | plain GET | 10.00 | 10.00 | 1.30x / 1.30x | <= 1.2x |" in text
    assert "| disk -> engine | 64 |" in text and "file read" in text
    assert "| no-change poll | 1.00 | paginated listing | 1.00 | 1.00x / 1.00x | <= 1.1x |" in text
    assert "store_to_disk_rank64: MISSED" in text and "no_change_poll: met" in text
    assert text.endswith("Plot: skipped")


def test_request_stats_of_nothing_is_nan() -> None:
    s = request_stats([])
    assert s.requests == 0 and math.isnan(s.p50_s)
