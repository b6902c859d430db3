"""The TracerProvider: resource, sampler and exporters from the standard OTEL_* variables.

Nothing is exported unless configured: OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT turns OTLP export on, OTEL_TRACES_EXPORTER chooses
explicitly (`otlp`, `console`, `none`, comma-separated). The SDK itself reads the sampler
(OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG), OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME,
the exporters' endpoint/headers/protocol variables and the batch processor's OTEL_BSP_*.
The server sets the provider it builds as the global one, once; tests pass their own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

SERVICE = "lora-gateway"
OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
EXPORTER_NAMES = ("otlp", "console", "none")


def service_version() -> str:
    try:
        return version(SERVICE)
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def build_resource() -> Resource:
    """service.name and service.version; OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES override them."""
    defaults = Resource.create({SERVICE_NAME: SERVICE, SERVICE_VERSION: service_version()})
    return defaults.merge(OTELResourceDetector().detect())


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """Which exporters the environment asks for: none unless an OTLP endpoint or OTEL_TRACES_EXPORTER is set."""
    chosen = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not chosen:
        return ["otlp"] if any(environ.get(name) for name in OTLP_ENDPOINT_VARIABLES) else []
    names = [name.strip().lower() for name in chosen.split(",") if name.strip()]
    unknown = [name for name in names if name not in EXPORTER_NAMES]
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter {unknown[0]!r}; use one of {EXPORTER_NAMES}")
    return [name for name in names if name != "none"]


def _otlp_exporter(environ: Mapping[str, str]) -> SpanExporter:
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported protocol {protocol!r}; use grpc or http/protobuf")


def build_tracer_provider() -> TracerProvider:
    """A provider configured by the OTEL_* variables (sampler by the SDK), exporting only when asked."""
    provider = TracerProvider(resource=build_resource())
    for name in exporter_names(os.environ):
        exporter = _otlp_exporter(os.environ) if name == "otlp" else ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def install_global_tracer_provider() -> TracerProvider:
    """For the server process, once at start: libraries that use the global provider see ours."""
    provider = build_tracer_provider()
    trace.set_tracer_provider(provider)
    return provider
