"""Collects an adapter's replaced versions from the store once their grace period is over.

Each replica schedules a collection when it sees a version retired (its own uploads, and other
replicas' and the CLI's through the sync); collections are idempotent, so replicas need not agree
on who does it. A restart forgets what was scheduled: the adapter's next upload collects it."""

from __future__ import annotations

import asyncio
import logging

from adapters_manifest.store import AdapterStore
from adapters_manifest.versions import collect_versions

log = logging.getLogger(__name__)

MARGIN_S = 1.0  # past the grace period, so that its last moment has surely passed


class VersionCollector:
    def __init__(self, store: AdapterStore, grace_s: float) -> None:
        self._store = store
        self._grace_s = grace_s
        self._due: dict[tuple[str, str], float] = {}  # (owner, name) -> loop time its collection is due
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(self, owner: str, name: str) -> None:
        """Collect this adapter's unreferenced versions once the grace period from now is over."""
        loop = asyncio.get_running_loop()
        key = (owner, name)
        fresh = key not in self._due
        self._due[key] = loop.time() + self._grace_s + MARGIN_S
        if fresh:
            task = loop.create_task(self._collect_when_due(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _collect_when_due(self, key: tuple[str, str]) -> None:
        loop = asyncio.get_running_loop()
        while (wait := self._due[key] - loop.time()) > 0:  # a later retirement pushed it back
            await asyncio.sleep(wait)
        del self._due[key]
        try:
            removed = await collect_versions(self._store, *key, self._grace_s)
        except Exception as exc:  # the next retirement or upload of this adapter tries again
            log.warning("collecting old versions of %s/%s failed: %s", *key, exc)
            return
        if removed:
            log.info("collected %d old versions of %s/%s: %s", len(removed), *key, ", ".join(removed))

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
