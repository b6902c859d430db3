"""Observability: OpenTelemetry tracing set-up and span helpers, Prometheus instruments, JSON logs."""
