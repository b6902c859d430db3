"""At start, the gateway publishes its base model's module shapes and limits to the store, so
that `lora-gateway adapters push` checks adapters exactly as this gateway will."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from adapters_manifest.published_base import PublishedBase
from adapters_manifest.store import AdapterStore
from gateway.app_keys import BASE_SPEC, SETTINGS, STORE

log = logging.getLogger(__name__)


async def publish_base_until_done(store: AdapterStore, base: PublishedBase, retry_s: float) -> None:
    """A store that is down at start is retried at the sync pace; serving never waits for this."""
    while True:
        try:
            await store.put_base(base.base_model, base.model_dump_json(indent=2).encode())
        except Exception as exc:
            log.warning(
                "publishing base %s to %s failed (retrying in %g s): %s", base.base_model, store.url, retry_s, exc
            )
            await asyncio.sleep(retry_s)
            continue
        log.info("published base %s (%d modules) to %s", base.base_model, len(base.module_shapes), store.url)
        return


async def publish_base(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    base = PublishedBase.of(settings.base_model_name, app[BASE_SPEC], settings.validation_limits())
    publishing = asyncio.create_task(publish_base_until_done(app[STORE], base, settings.sync_interval_s))
    yield
    publishing.cancel()
