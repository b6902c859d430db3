"""`lora-gateway`: serve, adapters, keys; train, dev make-model, bench (serve, load, fairness, ...), demo."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable


def _serve(args: list[str]) -> int:
    import uvloop  # vLLM's own dependency, and its server's event loop: a faster loop for the hot path
    from pydantic_settings import CliApp

    from gateway.server import serve
    from gateway.settings import ServeSettings

    settings = CliApp.run(ServeSettings, cli_args=args)
    return uvloop.run(serve(settings))


_OUR_PACKAGES = ("gateway", "gateway_tools", "adapters_manifest", "adapter_training")


def _tool(module: str, command: str, extra: str = "") -> Callable[[list[str]], int]:
    """A command of another package, imported only when run: serving needs neither training nor tooling,
    so their dependencies come with the project's extras."""

    def run(args: list[str]) -> int:
        try:
            return int(getattr(importlib.import_module(module), command)(args))
        except ModuleNotFoundError as exc:  # a dependency the extra brings, not one of ours
            if not extra or (exc.name or "").partition(".")[0] in _OUR_PACKAGES:
                raise
            print(f"error: {exc.name} is not installed; install lora-gateway[{extra}]", file=sys.stderr)
            return 2

    return run


COMMANDS = {
    "serve": _serve,
    "adapters": _tool("adapters_manifest.cli", "main"),
    "keys": _tool("gateway.auth.cli", "main"),
    "train": _tool("adapter_training.cli", "main", extra="train"),
    "dev": _tool("gateway_tools.cli", "dev", extra="tools"),
    "bench": _tool("gateway_tools.cli", "bench", extra="tools"),
    "demo": _tool("gateway_tools.cli", "demo", extra="tools"),
}


def _usage() -> int:
    print("usage: lora-gateway {serve,adapters,keys,train,dev make-model,bench NAME,demo} ...", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        return _usage()
    # The server logs its work; the other commands print their results and log only trouble.
    if argv[0] == "serve":  # JSON lines with the trace and span ids of each record
        from gateway.telemetry.logs import configure_json_logging

        configure_json_logging(logging.INFO)
    else:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return COMMANDS[argv[0]](argv[1:])
