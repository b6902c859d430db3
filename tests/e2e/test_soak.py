"""The soak's short version: `lora-gateway bench soak` as a user runs it, a few hundred requests
over 16 adapters through 4 engine slots while S3 goes down and comes back and two adapters get
new versions: 0 wrong outputs against the reference, 0 lost requests, memory flat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ARGS = ["--requests", "400", "--adapters", "16", "--concurrency", "32", "--outages", "1", "--outage-s", "4",
        "--new-versions", "2", "--check-every", "1", "--sync-interval-s", "1", "--warmup-fraction", "0.3"]  # fmt: skip


def test_short_soak_meets_every_target(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    run = subprocess.run([sys.executable, "-m", "gateway", "bench", "soak", "--out", str(out), *ARGS],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = json.loads((out / "soak.json").read_text())["figures"]
    assert figures["requests"] == 400
    assert figures["lost"] == 0 and figures["unexpected_errors"] == 0
    assert figures["wrong"] == 0
    assert figures["checked_on_new_versions"] > 0  # the new versions were served, and right
    assert figures["checked"] >= 0.8 * 400  # every success is checked here
    assert figures["rss_growth"] <= 0.10
    assert all(figures["targets_met"].values()), figures
    events = json.loads((out / "soak.json").read_text())["events"]
    assert any("S3 stopped" in e for e in events) and any("S3 started again" in e for e in events)
    assert any("gateway serving 2 of 2 new versions" in e for e in events), events
    assert (out / "soak.md").read_text().startswith("| soak |")
    assert (out / "soak.png").stat().st_size > 0
