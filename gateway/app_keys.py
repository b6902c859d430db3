"""Typed keys for what the application holds, and the serving state they point to."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from opentelemetry.trace import Tracer, TracerProvider
from prometheus_client import CollectorRegistry

from adapters_manifest.store import AdapterStore
from adapters_manifest.validation import BaseModelSpec
from gateway.admission import Admission
from gateway.api.openai_layer import OpenAILayer
from gateway.catalog import AdapterCatalog
from gateway.disk_cache import DiskCache
from gateway.engine.interface import Engine
from gateway.errors import ServiceUnavailableError
from gateway.fair_share import UserLimiter
from gateway.metrics import GatewayMetrics
from gateway.pool import AdapterPool
from gateway.routing.router import Router
from gateway.settings import ServeSettings
from gateway.upload_admission import UploadAdmission
from gateway.version_collector import VersionCollector


@dataclass(frozen=True)
class Running:
    """The engine and what works on it, as one request sees them (fetched once: the engine may restart)."""

    engine: Engine
    admission: Admission
    openai: OpenAILayer


@dataclass
class Serving:
    """The engine, its adapter pool and vLLM's OpenAI layer on it, once the engine has started;
    readiness derives from it."""

    engine: Engine | None = None
    pool: AdapterPool | None = None
    admission: Admission | None = None  # the pool with the callers' limits and the engine's seats
    openai: OpenAILayer | None = None
    startup_error: str | None = None
    draining: bool = False  # set on SIGTERM: new work is refused (draining.py)
    in_flight: int = 0  # requests being handled, streams included

    def not_ready_reason(self, catalog: AdapterCatalog) -> str | None:
        if self.draining:
            return "shutting down"
        if self.startup_error is not None:
            return "engine failed to start"  # why: in the log (anonymous callers read this)
        if self.engine is None or self.pool is None or self.openai is None:
            return "engine starting"
        if not self.engine.is_alive():
            return "engine dead"
        if not catalog.synced:
            return "first adapter sync pending"
        return None

    def engine_or_raise(self) -> Engine:
        if self.engine is None:
            raise ServiceUnavailableError("The engine is starting.", retry_after_s=5)
        return self.engine

    def pool_or_raise(self) -> AdapterPool:
        self.engine_or_raise()
        assert self.pool is not None  # set together with the engine
        return self.pool

    def running_or_raise(self) -> Running:
        engine = self.engine_or_raise()
        assert self.admission is not None and self.openai is not None  # set together with the engine
        return Running(engine, self.admission, self.openai)


SETTINGS = web.AppKey("settings", ServeSettings)
# This process's secret for tenants' prefix-cache salts (each replica has its own engine cache).
CACHE_SALT_SECRET = web.AppKey("cache_salt_secret", bytes)
STORE = web.AppKey("store", AdapterStore)
BASE_SPEC = web.AppKey("base_spec", BaseModelSpec)  # what an adapter must fit
DISK_CACHE = web.AppKey("disk_cache", DiskCache)
VERSIONS = web.AppKey("versions", VersionCollector)  # collects replaced versions after their grace
CATALOG = web.AppKey("catalog", AdapterCatalog)
SERVING = web.AppKey("serving", Serving)
LIMITER = web.AppKey("limiter", UserLimiter)
ROUTER = web.AppKey("router", Router)  # model "auto": which of the caller's adapters answers
UPLOADS = web.AppKey("uploads", UploadAdmission)  # uploads in progress, per user and in all
METRICS_REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
METRICS = web.AppKey("metrics", GatewayMetrics)  # the instruments, registered in METRICS_REGISTRY
TRACER_PROVIDER = web.AppKey("tracer_provider", TracerProvider)  # the global one unless create_app got one
TRACER = web.AppKey("tracer", Tracer)  # the gateway's tracer from TRACER_PROVIDER (got once: it is not free)
