"""Helpers every benchmark shares: percentiles, ratios, the figures of a set of requests, Markdown
tables, the JSON report."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from math import nan
from pathlib import Path
from typing import Any

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    return float(np.percentile(values, q)) if len(values) else float("nan")


def median(values: Sequence[float]) -> float:
    """The median of the values that are not NaN; NaN for none."""
    return percentile([v for v in values if v == v], 50)


def ratio_of(a: float, b: float) -> float:
    """a / b, NaN when b is 0: a missing baseline must not read as a result."""
    return a / b if b else float("nan")


def per_second(total: float, seconds: float) -> float:
    """A rate over a measured time: 0 when none passed, NaN when none was measured (`seconds` NaN)."""
    return 0.0 if seconds <= 0 else total / seconds


# -- the figures of a set of requests ----------------------------------------------------


@dataclass(frozen=True)
class RequestStats:
    """A set of requests (a stream, a phase, repetitions of one move) as their client saw them: how
    many, how many failed, the successes' latency and, over the time the set took, their rates."""

    requests: int  # sent: successes and errors
    errors: int
    duration_s: float  # NaN: not timed as a whole (no rates)
    requests_per_s: float  # successes per second
    tokens_per_s: float  # tokens the successes generated, per second
    p50_s: float  # NaN: no successes
    p99_s: float

    @property
    def ok(self) -> int:
        return self.requests - self.errors


def request_stats(
    latencies_s: Sequence[float], errors: int = 0, duration_s: float = nan, tokens: float = 0
) -> RequestStats:
    """The figures of the successes' `latencies_s` (`tokens` generated in all) and `errors` failures,
    rates over `duration_s`."""
    ok = len(latencies_s)
    return RequestStats(requests=ok + errors, errors=errors, duration_s=duration_s,
                        requests_per_s=per_second(ok, duration_s), tokens_per_s=per_second(tokens, duration_s),
                        p50_s=percentile(latencies_s, 50), p99_s=percentile(latencies_s, 99))  # fmt: skip


def median_of_rounds(rounds: Sequence[RequestStats]) -> RequestStats:
    """Rounds of one stream as one: counts and time summed, rates and latencies the rounds' median (a
    stall of the engine that hits one round moves one round, not the result)."""
    return RequestStats(requests=sum(r.requests for r in rounds), errors=sum(r.errors for r in rounds),
                        duration_s=sum(r.duration_s for r in rounds),
                        requests_per_s=median([r.requests_per_s for r in rounds]),
                        tokens_per_s=median([r.tokens_per_s for r in rounds]),
                        p50_s=median([r.p50_s for r in rounds]), p99_s=median([r.p99_s for r in rounds]))  # fmt: skip


def flat_json(result: Any, *figures: str) -> dict[str, Any]:
    """A result dataclass as a report's JSON object: `asdict`, with the figures of a RequestStats field
    (those named, or all) inlined where the field stands: the reports' keys are `p50_s`, `tokens_per_s`."""
    out: dict[str, Any] = {}
    for name, value in asdict(result).items():
        if isinstance(getattr(result, name), RequestStats):
            out |= {k: v for k, v in value.items() if not figures or k in figures}
        else:
            out[name] = value
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    """A Markdown table: the first `text_columns` left-aligned (names, text), the others right (numbers)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * text_columns + "---:|" * (len(header) - text_columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def config_of(opts: argparse.Namespace) -> dict[str, Any]:
    """Command-line options as JSON values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()}


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def raise_on_sigterm(signum: int, frame: Any) -> None:
    """A SIGTERM handler: unwind like Ctrl-C, so servers and engines started in `with` blocks stop."""
    raise KeyboardInterrupt


def cpu_seconds(pgids: set[int]) -> tuple[float, float]:
    """(busy CPU time of the whole host, of the process groups `pgids` plus this process), Linux only."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return 0.0, 0.0
    host = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    ours = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            rest = stat.read_text().rpartition(")")[2].split()  # the name may hold spaces
            if int(rest[2]) in pgids and int(stat.parent.name) != os.getpid():
                ours += int(rest[11]) + int(rest[12])
    own = os.times()
    return host / tick, ours / tick + own.user + own.system


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads, not its children), Linux only; 0 if gone."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
