"""The pure parts of `lora-gateway bench route`: the labelled set and its checks, decisions,
accuracy, the confusion table, latency pairs, targets; the packaged set itself is well-formed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway_tools.bench.route import (
    BASE,
    MAX_DESCRIPTION_CHARS,
    MAX_ROUTE_CHARS,
    MAX_ROUTES,
    RouteSet,
    Topic,
    accuracy,
    accuracy_by_label,
    best_of,
    confusion,
    confusion_table,
    label_of,
    latency_plan,
    latency_summary,
    load_route_set,
    measure,
    model_for,
    offline_labels,
    parse_route_set,
    problems,
    sweep,
    targets_met,
)


def small_set(**changes: object) -> RouteSet:
    topics = (
        Topic("coding", "Programming help.", ("fix my python error", "write a sql query"), ("Why does it crash?",)),
        Topic("cooking", "Recipes.", ("give me a recipe",), ("How long do I boil an egg?", "Pasta ideas")),
    )
    return RouteSet(**{"topics": topics, "base": ("Hello there",), **changes})  # type: ignore[arg-type]


# -- the packaged set --------------------------------------------------------------------


def test_the_packaged_set_is_well_formed() -> None:
    route_set = load_route_set()
    assert problems(route_set) == []
    assert 4 <= len(route_set.topics) <= 6
    for topic in route_set.topics:
        assert len(topic.prompts) >= 50, topic.name
        assert 8 <= len(topic.routes) <= MAX_ROUTES, topic.name
        assert all(0 < len(r) <= MAX_ROUTE_CHARS for r in topic.routes)
        assert 0 < len(topic.description) <= MAX_DESCRIPTION_CHARS
    assert len(route_set.base) >= 30
    assert len(route_set.labelled()) >= 300


def test_the_packaged_set_is_package_data() -> None:
    """pyproject.toml ships it: importlib.resources is how the bench reads it when installed."""
    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"gateway_tools.bench" = ["route_set.json"]' in text


# -- loading and checking a set ----------------------------------------------------------


def test_parse_and_labels() -> None:
    data = {
        "topics": {"coding": {"description": "Code.", "routes": ["fix it"], "prompts": ["a", "b"]}},
        "base": ["hi"],
    }
    route_set = parse_route_set(data)
    assert route_set.labels == ["coding", BASE]
    assert route_set.labelled() == [("a", "coding"), ("b", "coding"), ("hi", BASE)]


def test_a_small_set_has_no_problems() -> None:
    assert problems(small_set()) == []


def test_a_route_in_two_topics_is_a_problem() -> None:
    topics = (
        Topic("coding", "Code.", ("Write a SQL query",), ("x",)),
        Topic("cooking", "Food.", ("write a  sql query ",), ("y",)),
    )
    found = problems(RouteSet(topics, ()))
    assert len(found) == 1 and "also in coding" in found[0]


def test_a_held_out_prompt_equal_to_a_route_example_is_a_problem() -> None:
    topics = (Topic("coding", "Code.", ("fix my python error",), ("Fix my Python error",)),)
    assert any("is a route example of coding" in p for p in problems(RouteSet(topics, ())))
    # in another topic, or labelled base, just the same
    assert any("route example" in p for p in problems(small_set(base=("give me a RECIPE",))))


def test_repeated_prompts_and_empty_ones_are_problems() -> None:
    assert any("repeated" in p for p in problems(small_set(base=("Pasta ideas",))))
    assert any("empty prompt" in p for p in problems(small_set(base=("  ",))))


@pytest.mark.parametrize(
    "topic, why",
    [
        (Topic("coding", "", ("a",), ("p",)), "description"),
        (Topic("coding", "x" * (MAX_DESCRIPTION_CHARS + 1), ("a",), ("p",)), "description"),
        (Topic("coding", "Code.", (), ("p",)), "routes"),
        (Topic("coding", "Code.", tuple(f"r{i}" for i in range(MAX_ROUTES + 1)), ("p",)), "routes"),
        (Topic("coding", "Code.", ("x" * (MAX_ROUTE_CHARS + 1),), ("p",)), "route"),
        (Topic("coding", "Code.", ("a",), ()), "no held-out prompts"),
        (Topic(BASE, "Code.", ("a",), ("p",)), "adapter name"),
        (Topic("Has Space", "Code.", ("a",), ("p",)), "adapter name"),
    ],
)
def test_limits(topic: Topic, why: str) -> None:
    assert any(why in p for p in problems(RouteSet((topic,), ())))


def test_load_refuses_a_bad_set(tmp_path: Path) -> None:
    path = tmp_path / "set.json"
    path.write_text(json.dumps({"topics": {"coding": {"description": "", "routes": ["a"], "prompts": ["a"]}}}))
    with pytest.raises(ValueError, match="not well-formed"):
        load_route_set(path)


# -- decisions, accuracy, the confusion table --------------------------------------------


def test_label_of_a_response() -> None:
    adapters = {"router/coding": "coding"}
    assert label_of("router/coding", "tiny-llama", adapters) == "coding"
    assert label_of("tiny-llama", "tiny-llama", adapters) == BASE
    assert label_of("mallory/coding", "tiny-llama", adapters) == "mallory/coding"  # shows up as its own column
    assert label_of("", "tiny-llama", adapters) == "error"
    assert model_for("coding", "tiny-llama") == "router/coding"
    assert model_for(BASE, "tiny-llama") == "tiny-llama"


def test_accuracy() -> None:
    pairs = [("coding", "coding"), ("coding", BASE), ("cooking", "cooking"), (BASE, BASE)]
    assert accuracy(pairs) == 0.75
    assert math.isnan(accuracy([]))
    by_label = accuracy_by_label(pairs, ["coding", "cooking", BASE, "legal"])
    assert by_label["coding"] == 0.5 and by_label["cooking"] == 1.0 and by_label[BASE] == 1.0
    assert math.isnan(by_label["legal"])


def test_confusion_rows_are_expected_columns_are_chosen() -> None:
    pairs = [("coding", "coding"), ("coding", "cooking"), ("cooking", BASE), (BASE, "error"), (BASE, BASE)]
    columns, rows = confusion(pairs, ["coding", "cooking", BASE])
    assert columns == ["coding", "cooking", BASE, "error"]
    assert rows["coding"] == {"coding": 1, "cooking": 1, BASE: 0, "error": 0}
    assert rows["cooking"][BASE] == 1 and rows[BASE]["error"] == 1 and rows[BASE][BASE] == 1
    assert sum(sum(r.values()) for r in rows.values()) == len(pairs)
    table = confusion_table(pairs, ["coding", "cooking", BASE])
    assert table.splitlines()[0] == "| expected \\ chosen | coding | cooking | base | error | accuracy |"
    assert "| **coding** | 1 | 1 | 0 | 0 | 0.500 |" in table


# -- latency -----------------------------------------------------------------------------


def test_latency_plan_draws_without_repeats_and_alternates_the_order() -> None:
    labelled = [(f"p{i}", "coding") for i in range(10)]
    plan = latency_plan(labelled, 6, seed=1)
    assert len(plan) == 6 and len({p for p, _, _ in plan}) == 6
    assert [first for _, _, first in plan] == [True, False] * 3
    assert latency_plan(labelled, 6, seed=1) == plan  # seeded
    longer = latency_plan(labelled, 25)
    assert len(longer) == 25 and {p for p, _, _ in longer} == {p for p, _ in labelled}
    assert [first for _, _, first in longer] == [i % 2 == 0 for i in range(25)]
    assert latency_plan([], 5) == []


def test_latency_summary_pairs_before_percentiles() -> None:
    auto = [0.012, 0.020, 0.030, float("nan")]
    named = [0.010, 0.017, 0.026, 0.010]
    summary = latency_summary(auto, named)
    assert summary["pairs"] == 3  # the failed request's pair is left out
    assert summary["added_p50_ms"] == pytest.approx(3.0)
    assert summary["added_p99_ms"] == pytest.approx(3.98)
    assert summary["auto_p50_ms"] == pytest.approx(20.0)
    assert summary["named_p50_ms"] == pytest.approx(17.0)
    with pytest.raises(ValueError):
        latency_summary([0.1], [])
    assert math.isnan(latency_summary([], [])["added_p50_ms"])


# -- targets -----------------------------------------------------------------------------


def test_targets() -> None:
    assert targets_met(0.90, 10.0) == {"accuracy": True, "added_p50": True}
    assert targets_met(0.899, 10.01) == {"accuracy": False, "added_p50": False}
    assert targets_met(float("nan"), float("nan")) == {"accuracy": False, "added_p50": False}
    assert targets_met(0.95, None) == {"accuracy": True}  # offline: no latency measured


# -- offline sweep -----------------------------------------------------------------------


def test_offline_labels_and_sweep() -> None:
    scores = [{"coding": 0.7, "cooking": 0.2}, {"coding": 0.3, "cooking": 0.35}, {"coding": 0.1, "cooking": 0.15}]
    assert offline_labels(scores, 0.3) == ["coding", "cooking", BASE]
    assert offline_labels(scores, 0.5) == ["coding", BASE, BASE]
    assert offline_labels([{}], 0.0) == [BASE]
    rows = sweep(scores, ["coding", "cooking", BASE], [0.1, 0.3, 0.5])
    assert [r["accuracy"] for r in rows] == pytest.approx([2 / 3, 1.0, 2 / 3])
    assert rows[2]["topic_accuracy"] == 0.5 and rows[2]["base_accuracy"] == 1.0
    assert best_of(rows)["threshold"] == 0.3


def test_best_of_ties_takes_the_middle() -> None:
    rows = [{"threshold": t, "accuracy": a} for t, a in [(0.2, 0.8), (0.3, 0.9), (0.4, 0.9), (0.5, 0.9), (0.6, 0.7)]]
    assert best_of(rows)["threshold"] == 0.4


# -- the client loop, against a fake gateway ---------------------------------------------


async def test_measure_reads_decisions_from_the_model_field(aiohttp_server: Any) -> None:
    """A stand-in for the gateway: `auto` routes by a keyword, a named model answers as itself."""
    seen: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        assert request.headers["Authorization"] == "Bearer k"
        if body["model"] != "auto":
            return web.json_response({"model": body["model"]})
        prompt = body["messages"][-1]["content"].lower()
        model = "router/coding" if "crash" in prompt else "router/cooking" if "egg" in prompt else "tiny-llama"
        headers = {"X-Routed-Model": "router/oops" if "pasta" in prompt else model}
        return web.json_response({"model": model}, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = await aiohttp_server(app)
    measured = await measure(str(server.make_url("")).rstrip("/"), "k", small_set(), "tiny-llama", 4, seed=0)
    assert measured.decisions == [("coding", "coding"), ("cooking", "cooking"), ("cooking", BASE), (BASE, BASE)]
    assert measured.routed_headers == 4 and measured.header_disagreements == 1
    assert len(measured.auto_s) == len(measured.named_s) == 4 and not measured.first_errors
    assert all(b["max_tokens"] == 1 and b["temperature"] == 0 for b in seen)
    named = {b["model"] for b in seen if b["model"] != "auto"}
    assert named == {"router/coding", "router/cooking", "tiny-llama"}


async def test_a_failed_request_counts_as_error(aiohttp_server: Any) -> None:
    async def chat(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": "boom"}}, status=503)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = await aiohttp_server(app)
    measured = await measure(str(server.make_url("")).rstrip("/"), "k", small_set(), "tiny-llama", 2, seed=0)
    assert {chosen for _, chosen in measured.decisions} == {"error"}
    assert measured.first_errors[0].startswith("503") and len(measured.first_errors) == 3
    assert all(math.isnan(x) for x in measured.auto_s + measured.named_s)
    assert latency_summary(measured.auto_s, measured.named_s)["pairs"] == 0


def test_the_command_and_its_options() -> None:
    from gateway_tools.bench.route import _parse
    from gateway_tools.cli import BENCHMARKS

    assert "route" in BENCHMARKS
    opts = _parse([])
    assert (opts.base, opts.threshold, opts.latency_requests, opts.offline) == ("tiny", None, 100, False)
    assert opts.out == Path("artifacts/bench-route")
    opts = _parse(["--threshold", "0.4", "--latency-requests", "20", "--base", "smollm2", "--offline"])
    assert (opts.base, opts.threshold, opts.latency_requests, opts.offline) == ("smollm2", 0.4, 20, True)
    with pytest.raises(SystemExit):
        _parse(["--latency-requests", "0"])


def test_the_confusion_plot_is_written(tmp_path: Path) -> None:
    import matplotlib

    from gateway_tools.bench.route import plot_confusion

    matplotlib.use("Agg")
    plot_confusion([("coding", "coding"), (BASE, "error")], ["coding", BASE], "t", tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
