"""Bounds on what a slow client can hold.

- Request heads and idle keep-alive: aiohttp's keep-alive timer (`keepalive_timeout`, see
  `server.runner_options`) closes a connection that has not delivered a complete request head
  within that time, whether it is idle between requests or dribbling its headers.
- Bodies: `body_timeout_s` and `upload_timeout_s`, in the handlers that read them.
- Responses, streams above all: `StalledReaderWatch` cuts a connection whose client stopped
  reading. The transport's buffer fills, aiohttp pauses writing, and the handler waits in a write
  that never returns, holding its generation (an engine sequence) and its fair-share slot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway.telemetry.request_id import request_id_of

log = logging.getLogger(__name__)

_PAUSED = object()  # stands for the blocked write where aiohttp does not expose its drain waiter


class StalledReaderWatch:
    """Requests being handled; one whose write has been blocked on the same full buffer for
    `timeout_s` gets its connection aborted (its handler is cancelled or its write fails)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.interval_s = min(1.0, timeout_s / 4)
        # id(request) -> (request, the blocked write last seen or None, since when); requests are
        # mutable mappings, not hashable.
        self._requests: dict[int, tuple[web.BaseRequest, object | None, float]] = {}

    def track(self, request: web.BaseRequest) -> None:
        self._requests[id(request)] = (request, None, 0.0)

    def untrack(self, request: web.BaseRequest) -> None:
        self._requests.pop(id(request), None)

    def check(self, now: float) -> None:
        for key, (request, blocked, since) in list(self._requests.items()):
            protocol = request.protocol
            if protocol is None or not protocol.writing_paused:
                self._requests[key] = (request, None, now)
                continue
            # A new drain waiter means the client read enough to unblock the last write: progress.
            write = getattr(protocol, "_drain_waiter", None) or _PAUSED
            if blocked is not write:
                self._requests[key] = (request, write, now)
            elif now - since >= self.timeout_s:
                log.warning(
                    "closing the connection of %s %s (request %s): its client read nothing for %g s",
                    request.method,
                    request.path,
                    request_id_of(request),
                    self.timeout_s,
                )
                self.untrack(request)
                if request.transport is not None:
                    request.transport.abort()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval_s)
            self.check(loop.time())


STALLED_READERS = web.AppKey("stalled_readers", StalledReaderWatch)


@web.middleware
async def stalled_reader_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Watched while its handler runs, which for a stream is until the last byte is written."""
    watch = request.app[STALLED_READERS]
    watch.track(request)
    try:
        return await handler(request)
    finally:
        watch.untrack(request)


async def watch_stalled_readers(app: web.Application) -> AsyncIterator[None]:
    """A cleanup_ctx: one task checks every request in flight, a few times per timeout."""
    watching = asyncio.create_task(app[STALLED_READERS].run())
    yield
    watching.cancel()
