"""Run the app: listen, watch the engine, drain on SIGTERM/SIGINT, exit non-zero if the engine dies."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from aiohttp import web

from gateway.api.metrics_page import metrics_only_app
from gateway.app import EngineFactory, _start_vllm, create_app
from gateway.app_keys import SERVING
from gateway.settings import ServeSettings
from gateway.telemetry.tracing import install_global_tracer_provider

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.5
RUNNER_SHUTDOWN_TIMEOUT_S = 1.0  # after our own drain: only stragglers such as idle keep-alives
# The engine died: requests in flight are failing with it; this long for their 503s and stream error
# events to reach their clients before the process exits (they take milliseconds).
ENGINE_DEAD_GRACE_S = 5.0


def runner_options(settings: ServeSettings) -> dict[str, Any]:
    """How the HTTP server treats connections (aiohttp's AppRunner and RequestHandler options)."""
    return {
        # A client that hangs up cancels its handler, which aborts its generation.
        "handler_cancellation": True,
        "shutdown_timeout": RUNNER_SHUTDOWN_TIMEOUT_S,
        # aiohttp's default is an hour. Its timer runs from the connection's start and from the end of
        # each response, and closes a connection still without a complete request head: it bounds
        # header time as well as idle keep-alive (slow_clients.py).
        "keepalive_timeout": settings.keepalive_timeout_s,
    }


async def serve(settings: ServeSettings, engine_factory: EngineFactory = _start_vllm) -> int:
    """Serve until a signal (exit 0) or until the engine is dead or failed to start (exit 1)."""
    tracer_provider = install_global_tracer_provider()  # OTEL_* variables; exports only when configured
    app = create_app(settings, engine_factory, tracer_provider)
    runner = web.AppRunner(app, **runner_options(settings))
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    log.info("listening on http://%s:%d", settings.host, settings.port)
    metrics_runner = None
    if settings.metrics_port is not None:  # the whole /metrics page, adapter names included
        metrics_runner = web.AppRunner(metrics_only_app(app), shutdown_timeout=RUNNER_SHUTDOWN_TIMEOUT_S)
        await metrics_runner.setup()
        await web.TCPSite(metrics_runner, settings.host, settings.metrics_port).start()
        log.info("metrics (adapter names included) on http://%s:%d/metrics", settings.host, settings.metrics_port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    exit_code = 0
    serving = app[SERVING]
    while not stop.is_set():
        if serving.startup_error or (serving.engine is not None and not serving.engine.is_alive()):
            log.error("engine unavailable (%s): exiting so the process is restarted", serving.startup_error or "dead")
            exit_code = 1
            break
        try:
            await asyncio.wait_for(stop.wait(), WATCH_INTERVAL_S)
        except TimeoutError:
            pass
    # Keep listening while draining: /readyz answers 503 (the load balancer stops sending) and
    # new requests get a 503 to retry elsewhere, while requests in flight, streams too, finish.
    # With a dead engine /readyz keeps saying so, and in-flight requests only get their errors out.
    grace_s = settings.drain_timeout_s if exit_code == 0 else min(settings.drain_timeout_s, ENGINE_DEAD_GRACE_S)
    serving.draining = exit_code == 0
    log.info("draining %d in-flight requests (up to %.0f s)", serving.in_flight, grace_s)
    deadline = loop.time() + grace_s
    while serving.in_flight and loop.time() < deadline:
        await asyncio.sleep(WATCH_INTERVAL_S / 5)
    if serving.in_flight:
        log.warning("drain ended with %d requests cut off", serving.in_flight)
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    await asyncio.to_thread(tracer_provider.shutdown)  # export the spans still batched
    return exit_code
