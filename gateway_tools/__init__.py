"""Tooling beside the gateway: benchmarks, the demo, model builders, the reference model, test servers."""
