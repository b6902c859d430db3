"""Run the app: listen, watch the engine, drain on SIGTERM/SIGINT, exit non-zero if the engine dies."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from gateway.app import EngineFactory, _start_vllm, create_app
from gateway.app_keys import SERVING
from gateway.settings import ServeSettings

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.5


async def serve(settings: ServeSettings, engine_factory: EngineFactory = _start_vllm) -> int:
    """Serve until a signal (exit 0) or until the engine is dead or failed to start (exit 1)."""
    app = create_app(settings, engine_factory)
    # handler_cancellation: a client that hangs up cancels its handler, which aborts its generation.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=settings.drain_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    log.info("listening on http://%s:%d", settings.host, settings.port)

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
    serving.draining = True
    log.info("draining in-flight requests (up to %.0f s)", settings.drain_timeout_s)
    await runner.cleanup()
    return exit_code
