"""The application factory: routes, middleware and the resources that live as long as the app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import tempfile
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

from aiohttp import web
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from adapters_manifest.open_store import open_store
from adapters_manifest.record import AdapterRecord
from adapters_manifest.validation import BaseModelSpec, validate_adapter_dir
from gateway.admission import Admission
from gateway.api import inference
from gateway.api.adapters import delete_adapter, list_adapters, show_adapter, upload_adapter
from gateway.api.admin import resident_adapters, trigger_sync
from gateway.api.health import healthz, readyz
from gateway.api.metrics_page import metrics, register_state_collector
from gateway.api.models import list_models, show_model
from gateway.api.openai_layer import build_openai_layer
from gateway.api.openapi import OPENAPI, build_openapi, openapi_document
from gateway.app_keys import (
    BASE_SPEC,
    CACHE_SALT_SECRET,
    CATALOG,
    DISK_CACHE,
    LIMITER,
    METRICS,
    METRICS_REGISTRY,
    ROUTER,
    SERVING,
    SETTINGS,
    STORE,
    TRACER,
    TRACER_PROVIDER,
    UPLOADS,
    VERSIONS,
    Serving,
)
from gateway.auth.keys import KeyRing
from gateway.auth.middleware import (
    AUTHENTICATOR,
    ApiKeyAuthenticator,
    Authenticator,
    NoAuthenticator,
    TrustedHeaderAuthenticator,
    auth_middleware,
)
from gateway.base_publishing import publish_base
from gateway.catalog import AdapterCatalog
from gateway.disk_cache import DiskCache
from gateway.draining import drain_middleware
from gateway.engine.interface import Engine
from gateway.engine.zero_adapter import write_zero_adapter
from gateway.engine_seats import EngineSeats
from gateway.engine_start import EngineProcessWatch
from gateway.errors import describe, error_middleware
from gateway.fair_share import UserLimiter
from gateway.metrics import GatewayMetrics
from gateway.pool import AdapterPool
from gateway.routing.encoder import SentenceEncoder, load_encoder
from gateway.routing.router import Router
from gateway.settings import ServeSettings
from gateway.slow_clients import (
    STALLED_READERS,
    StalledReaderWatch,
    stalled_reader_middleware,
    watch_stalled_readers,
)
from gateway.telemetry.http import server_span_middleware
from gateway.telemetry.request_id import add_request_id_header, request_id_middleware
from gateway.telemetry.spans import tracer_of
from gateway.upload_admission import UploadAdmission
from gateway.version_collector import VersionCollector

log = logging.getLogger(__name__)

KEYS_FILE_CHECK_INTERVAL_S = 2.0
WARM_CHECK_MAX_INTERVAL_S = 2.0  # warm adapters evicted by an engine restart come back this soon

# settings -> a started engine (with a LoRA slot of its own where base requests need the zero adapter). Blocking.
EngineFactory = Callable[[ServeSettings], Engine]
# settings -> the sentence encoder of model "auto". Blocking; runs in the router's thread.
EncoderFactory = Callable[[ServeSettings], SentenceEncoder]


def _start_vllm(settings: ServeSettings) -> Engine:
    from gateway.engine.vllm_engine import VllmEngine

    return VllmEngine.start(settings)


def _load_route_encoder(settings: ServeSettings) -> SentenceEncoder:
    return load_encoder(settings.route_encoder)


def _authenticator(settings: ServeSettings) -> Authenticator:
    if settings.keys_file is not None:
        return ApiKeyAuthenticator(KeyRing(settings.keys_file))
    if settings.trusted_user_header is not None:
        return TrustedHeaderAuthenticator(settings.trusted_user_header, settings.trusted_admin_header)
    log.warning(
        "AUTHENTICATION IS OFF (--insecure-no-auth): anyone who can reach this port is admin. Development only."
    )
    return NoAuthenticator()


def create_app(
    settings: ServeSettings,
    engine_factory: EngineFactory = _start_vllm,
    tracer_provider: trace.TracerProvider | None = None,
    encoder_factory: EncoderFactory = _load_route_encoder,
) -> web.Application:
    """`tracer_provider`: where this app's spans go (default: the global provider, which the server sets)."""
    tracer_provider = tracer_provider or trace.get_tracer_provider()
    app = web.Application(
        client_max_size=settings.max_request_bytes,
        # The server span is outermost: it sees the status the error middleware gives every failure.
        middlewares=[
            server_span_middleware(tracer_provider),
            request_id_middleware,
            stalled_reader_middleware,
            error_middleware,
            drain_middleware,
            auth_middleware,
        ],
    )
    app.on_response_prepare.append(add_request_id_header)
    app[TRACER_PROVIDER] = tracer_provider
    app[TRACER] = tracer_of(tracer_provider)
    app[SETTINGS] = settings
    app[CACHE_SALT_SECRET] = secrets.token_bytes(32)
    app[AUTHENTICATOR] = _authenticator(settings)
    app[LIMITER] = UserLimiter(settings.max_running_per_user, settings.max_queued_per_user, settings.queue_timeout_s)
    app[STORE] = open_store(settings.store)
    app[BASE_SPEC] = BaseModelSpec.from_model_dir(settings.model, settings.max_lora_rank, settings.dtype)
    app[SERVING] = Serving()
    app[VERSIONS] = VersionCollector(app[STORE], settings.version_grace_s)
    app[UPLOADS] = UploadAdmission(settings.max_uploads_per_user, settings.max_concurrent_uploads)

    def retire(record: AdapterRecord) -> None:
        """A version left the store: out of the engine, then off the disk, once unused."""
        if app[SERVING].pool is not None:
            app[SERVING].pool.retire(record)
        if DISK_CACHE in app:
            app[DISK_CACHE].retire(record)
        app[VERSIONS].schedule(record.owner, record.name)

    app[METRICS_REGISTRY] = CollectorRegistry(auto_describe=True)
    app[METRICS] = GatewayMetrics(app[METRICS_REGISTRY])
    app[CATALOG] = AdapterCatalog(
        app[STORE],
        settings.base_model_name,
        on_retired=retire,
        tracer=app[TRACER],
        metrics=app[METRICS],
        lookups=UserLimiter(
            settings.max_store_lookups_per_user, settings.max_queued_per_user, settings.queue_timeout_s
        ),
        miss_ttl_s=settings.adapter_miss_ttl_s,
    )
    app[ROUTER] = Router(partial(encoder_factory, settings), settings.route_threshold, app[TRACER], app[METRICS])
    register_state_collector(app)
    app[OPENAPI] = build_openapi()
    app.cleanup_ctx.append(_disk_cache)
    app.cleanup_ctx.append(_adapter_sync)
    if settings.routing:
        app.cleanup_ctx.append(_routing)
    app.cleanup_ctx.append(publish_base)
    app.on_cleanup.append(_close_versions)
    app.cleanup_ctx.append(_engine_lifetime(engine_factory))
    app.cleanup_ctx.append(_watch_keys_file)
    app[STALLED_READERS] = StalledReaderWatch(settings.stalled_read_timeout_s)
    app.cleanup_ctx.append(watch_stalled_readers)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_document)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", show_model)
    endpoints = inference.Inference(
        settings, app[SERVING], app[CATALOG], app[ROUTER], app[METRICS], app[CACHE_SALT_SECRET]
    )
    app.router.add_post("/v1/completions", endpoints.handler(inference.COMPLETIONS))
    app.router.add_post("/v1/chat/completions", endpoints.handler(inference.CHAT_COMPLETIONS))
    app.router.add_post("/v1/responses", endpoints.handler(inference.RESPONSES))
    app.router.add_post("/tokenize", endpoints.handler(inference.TOKENIZE))
    app.router.add_post("/detokenize", endpoints.handler(inference.DETOKENIZE))
    app.router.add_post("/v1/adapters", upload_adapter)
    app.router.add_get("/v1/adapters", list_adapters)
    app.router.add_get("/v1/adapters/{owner}/{name}", show_adapter)
    app.router.add_delete("/v1/adapters/{owner}/{name}", delete_adapter)
    app.router.add_post("/admin/sync", trigger_sync)
    app.router.add_get("/admin/resident", resident_adapters)
    return app


async def _close_versions(app: web.Application) -> None:
    app[VERSIONS].close()  # scheduled collections are idempotent: the next upload redoes one


async def _watch_keys_file(app: web.Application) -> AsyncIterator[None]:
    """Keys added or revoked in the file (a re-mounted Secret) apply within seconds."""
    authenticator = app[AUTHENTICATOR]
    if not isinstance(authenticator, ApiKeyAuthenticator):
        yield
        return

    async def watch() -> None:
        while True:
            await asyncio.sleep(KEYS_FILE_CHECK_INTERVAL_S)
            try:
                authenticator.keys.reload_if_changed()
            except Exception:  # never stop watching: revocations must keep applying
                log.exception("checking the keys file failed; checking again in %g s", KEYS_FILE_CHECK_INTERVAL_S)

    watching = asyncio.create_task(watch())
    yield
    watching.cancel()


async def _disk_cache(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    with contextlib.ExitStack() as stack:
        root = settings.cache_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="lora-gateway-cache-"))
        )
        root.mkdir(parents=True, exist_ok=True)
        app[DISK_CACHE] = DiskCache(
            app[STORE],
            root,
            settings.cache_max_bytes,
            max_parallel=settings.download_parallelism,
            tracer=app[TRACER],
            metrics=app[METRICS],
        )
        yield


async def _adapter_sync(app: web.Application) -> AsyncIterator[None]:
    # Readiness waits for the first good sync; a store that is down at start is retried.
    polling = asyncio.create_task(app[CATALOG].poll_forever(app[SETTINGS].sync_interval_s))
    prefetching = asyncio.create_task(_keep_warm_adapters(app))
    yield
    polling.cancel()
    prefetching.cancel()


async def _routing(app: web.Application) -> AsyncIterator[None]:
    """Every synced record's routes are embedded before anyone routes to them (a request then pays for
    its own prompt only, and no timing tells who asked first). The encoder loads with the first routes
    or the first routed request: a gateway whose adapters have no routes never loads it."""
    router, catalog = app[ROUTER], app[CATALOG]

    async def embed_routes() -> None:
        while True:
            try:
                await router.warm(catalog.records())
            except Exception:  # the encoder failed to load (logged) or failed once: requests see it
                log.warning("routing: embedding the adapters' routes failed", exc_info=True)
            await asyncio.sleep(app[SETTINGS].sync_interval_s)

    embedding = asyncio.create_task(embed_routes())
    yield
    embedding.cancel()
    router.close()


async def _keep_warm_adapters(app: web.Application) -> None:
    """Records marked `warm` are fetched to disk after the first sync, before anyone asks, then kept
    pinned in the engine once it runs (re-checked each sync interval: flags and versions change)."""
    catalog, disk, serving = app[CATALOG], app[DISK_CACHE], app[SERVING]
    while not catalog.synced:
        await asyncio.sleep(0.2)
    for record in catalog.records():
        if record.warm:
            try:
                await disk.pin(record)
                disk.unpin(record)
            except Exception as exc:  # a request will try again (and report) later
                log.warning("prefetching warm adapter %s failed: %s", record.ref, exc)
    while True:
        try:
            if serving.pool is not None:
                serving.pool.keep_warm(catalog.records())
        except Exception:  # never stop: the next round tries again
            log.exception("keeping the warm adapters pinned failed")
        await asyncio.sleep(min(app[SETTINGS].sync_interval_s, WARM_CHECK_MAX_INTERVAL_S))


def _engine_seats(settings: ServeSettings, engine: Engine, metrics: GatewayMetrics) -> EngineSeats | None:
    """The gateway's seats: as many as the engine runs sequences a step, unless set (0: none)."""
    seats = settings.engine_seats
    if seats is None:
        seats = engine.client.vllm_config.scheduler_config.max_num_seqs
    if not seats:
        return None
    return EngineSeats(
        seats,
        settings.adapter_wait_timeout_s,
        settings.max_seqs_per_user,
        metrics,
        adapters_per_step=min(settings.max_loras, settings.max_cpu_loras),  # what vLLM batches a step
        max_passes=settings.adapter_grouping_passes,
    )


def _engine_lifetime(engine_factory: EngineFactory) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        # The engine takes from seconds to minutes to start: the server answers /healthz meanwhile.
        with tempfile.TemporaryDirectory(prefix="lora-gateway-") as work_dir:
            starting = asyncio.create_task(_start_engine(app, engine_factory, Path(work_dir)))
            yield
            starting.cancel()
            engine = app[SERVING].engine
            if engine is not None:
                engine.shutdown()

    return lifetime


async def _start_engine(app: web.Application, engine_factory: EngineFactory, work_dir: Path) -> None:
    settings, serving = app[SETTINGS], app[SERVING]
    watch = EngineProcessWatch()
    engine: Engine | None = None
    try:
        with watch:
            engine = await asyncio.to_thread(engine_factory, settings)
        pool = AdapterPool(
            engine,
            app[DISK_CACHE],
            capacity=settings.max_cpu_loras,
            wait_timeout_s=settings.adapter_wait_timeout_s,
            failure_ttl_s=settings.adapter_failure_ttl_s,
            slot_aging_s=settings.adapter_slot_aging_s,
            max_slots_per_user=settings.max_slots_per_user,
            max_queued=settings.adapter_queue_max,
            warm_slots=int(settings.warm_slots_share * settings.max_cpu_loras),
            validate=partial(
                validate_adapter_dir,
                base=app[BASE_SPEC],
                limits=settings.validation_limits(),
            ),
            tracer=app[TRACER],
            metrics=app[METRICS],
        )
        if engine.base_via_zero_adapter:
            await pool.register_base_adapter(write_zero_adapter(settings.model, work_dir / "base-zero-adapter"))
        openai = await build_openai_layer(engine.client, engine.frontend_args, app[TRACER])
    except Exception as exc:
        # The root cause: the exception, and how the engine's processes ended (a worker killed for
        # memory leaves no traceback; vLLM then says only "see stack trace for root cause").
        log.error(
            "engine failed to start: %s; engine processes that ended: %s", describe(exc), watch.summary(), exc_info=exc
        )
        serving.startup_error = f"{type(exc).__name__}: {exc}"
        if engine is not None:  # started, then its setup failed: its processes must not outlive the gateway
            try:
                await asyncio.to_thread(engine.shutdown)
            except Exception:
                log.exception("shutting down the engine that failed its setup failed too")
        return
    serving.engine, serving.pool, serving.openai = engine, pool, openai
    serving.admission = Admission(app[LIMITER], _engine_seats(settings, engine, app[METRICS]), pool)
    log.info("engine ready: serving %s; base-model requests run %s", settings.base_model_name, engine.base_requests)
