"""Structured JSON logs for the server: one JSON object a line, with the trace and span ids of the
span current when the record was made (null outside any span), so a log line leads to its trace.

vLLM configures its own loggers (and those of its engine-core child process) from the file named
by VLLM_LOGGING_CONFIG_PATH: the server points it at the same JSON format unless one is set.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

FIELDS = "{levelname}{name}{message}{trace_id}{span_id}"
RENAMED = {"timestamp": "time", "levelname": "level", "name": "logger"}  # time: ISO 8601, UTC


class TraceContextFilter(logging.Filter):
    """Adds `trace_id` and `span_id` (W3C hex) of the current span to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else None
        record.span_id = format(context.span_id, "016x") if context.is_valid else None
        return True


def json_formatter() -> logging.Formatter:
    return JsonFormatter(FIELDS, style="{", rename_fields=RENAMED, timestamp=True)


def json_handler(stream: TextIO | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(json_formatter())
    return handler


def configure_json_logging(level: int) -> None:
    """The root logger writes JSON lines to stderr; vLLM's loggers too (see the module docstring)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(json_handler())
    root.setLevel(level)
    logging.captureWarnings(True)  # Python warnings (e.g. a library's FutureWarning) as JSON records too
    if "VLLM_LOGGING_CONFIG_PATH" not in os.environ:
        os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(_write_vllm_logging_config(level))


def vllm_logging_config(level: int) -> dict[str, Any]:
    """A logging.config.dictConfig for vLLM's `vllm` logger, in every process vLLM starts."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"trace_context": {"()": f"{__name__}.TraceContextFilter"}},
        "formatters": {"json": {"()": f"{__name__}.json_formatter"}},
        "handlers": {
            "json": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "filters": ["trace_context"],
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {"vllm": {"handlers": ["json"], "level": logging.getLevelName(level), "propagate": False}},
    }


def _write_vllm_logging_config(level: int) -> Path:
    descriptor, name = tempfile.mkstemp(prefix="lora-gateway-vllm-logging-", suffix=".json")
    with os.fdopen(descriptor, "w") as file:
        json.dump(vllm_logging_config(level), file)
    atexit.register(Path(name).unlink, missing_ok=True)
    return Path(name)
