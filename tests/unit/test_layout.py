"""The serving core stands alone: importing every module of `gateway` (what `lora-gateway serve` runs) and of
the manifest library pulls in neither the tooling nor training, nor the packages only those need."""

from __future__ import annotations

import subprocess
import sys

TOOLING_ONLY = ("gateway_tools", "adapter_training", "peft", "matplotlib", "moto", "openai")

IMPORT_ALL = """
import importlib, pkgutil, sys
import adapters_manifest, gateway
for package in (gateway, adapters_manifest):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
print(" ".join(sorted({name.partition(".")[0] for name in sys.modules})))
"""


def test_serving_and_the_manifest_library_import_no_tooling() -> None:
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    imported = set(done.stdout.split())
    assert {"gateway", "adapters_manifest", "aiohttp"} <= imported  # it did import them
    assert not imported & set(TOOLING_ONLY)
