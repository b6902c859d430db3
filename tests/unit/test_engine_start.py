"""An engine that fails to start: the gateway exits non-zero at once, and its JSON log holds the
root cause, also when that is a worker process killed without a traceback (out of memory): vLLM
then says only "See stack trace for root cause"."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

import gateway.server
from gateway.engine.interface import Engine
from gateway.engine_start import EngineProcessWatch
from gateway.server import serve
from gateway.settings import ServeSettings
from tests.fakes import FakeEngine
from tests.unit.harness import gateway_settings

VLLM_WORDS = (
    "WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause."
)


def settings(tmp_path: Path) -> ServeSettings:
    return gateway_settings(tmp_path, port=0)


@pytest.fixture
def own_tracer_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve() would install the process-wide provider: the other tests' must stay as it is."""
    monkeypatch.setattr(gateway.server, "install_global_tracer_provider", TracerProvider)


def worker_killed_while_starting(workers: list[subprocess.Popen[bytes]]) -> None:
    """As vLLM's start, when the kernel kills its worker for memory: no traceback anywhere."""
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    workers.append(worker)
    time.sleep(1.0)  # an engine process, not a passing `sh` (engine_start.MIN_LIFETIME_S)
    worker.send_signal(signal.SIGKILL)
    time.sleep(0.3)
    raise Exception(VLLM_WORDS)


async def test_the_gateway_exits_non_zero_at_once_naming_the_killed_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, own_tracer_provider: None
) -> None:
    workers: list[subprocess.Popen[bytes]] = []

    def factory(settings: ServeSettings) -> Engine:
        worker_killed_while_starting(workers)
        raise AssertionError("unreachable")

    started = time.monotonic()
    try:
        with caplog.at_level(logging.INFO):
            async with asyncio.timeout(30):
                assert await serve(settings(tmp_path), factory) == 1
    finally:
        for worker in workers:
            worker.wait()
    assert time.monotonic() - started < 30
    [failure] = [r for r in caplog.records if r.name == "gateway.app" and r.levelno == logging.ERROR]
    assert VLLM_WORDS in failure.getMessage()
    assert f"(pid {workers[0].pid}) killed by SIGKILL" in failure.getMessage()
    assert failure.exc_info is not None  # the traceback goes into the JSON record too


async def test_a_start_that_raises_exits_non_zero_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, own_tracer_provider: None
) -> None:
    def factory(settings: ServeSettings) -> Engine:
        raise RuntimeError("start (0) + length (520) exceeds dimension size (256).")

    started = time.monotonic()
    async with asyncio.timeout(30):
        assert await serve(settings(tmp_path), factory) == 1
    assert time.monotonic() - started < 10  # no drain to wait for: nothing was ever served
    assert "exceeds dimension size" in caplog.text


def test_oom_kills_of_the_container_are_named(tmp_path: Path) -> None:
    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    with EngineProcessWatch(memory_events=events) as watch:
        events.write_text("low 0\nhigh 0\nmax 5\noom 2\noom_kill 2\n")
    assert watch.summary() == "the kernel killed 1 process(es) for memory (oom_kill)"


async def test_an_engine_that_started_but_failed_its_setup_is_shut_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, own_tracer_provider: None
) -> None:
    """The base model's zero adapter does not register: the engine's processes must not outlive us."""
    engine = FakeEngine(fail_loads={"__base__": "no room for the base adapter"})
    async with asyncio.timeout(30):
        assert await serve(settings(tmp_path), engine.started_with) == 1
    assert engine.shut_down
    assert "no room for the base adapter" in caplog.text
