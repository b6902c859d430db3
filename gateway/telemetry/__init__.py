"""Observability: OpenTelemetry tracing set-up and span helpers, JSON logs."""
