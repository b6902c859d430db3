"""Helpers every benchmark shares: percentiles, ratios, Markdown tables, the JSON report."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    return float(np.percentile(values, q)) if len(values) else float("nan")


def ratio_of(a: float, b: float) -> float:
    """a / b, NaN when b is 0: a missing baseline must not read as a result."""
    return a / b if b else float("nan")


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
