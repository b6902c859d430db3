"""The layout holds: the serving core stands alone (importing every module of `gateway`, what `lora-gateway
serve` runs, and of the manifest library pulls in neither the tooling nor training, nor the packages only
those need), and the README's tree is the repository's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
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


def readme_tree() -> dict[str, set[str]]:
    """The README's tree ("How the pieces fit"): each top-level folder and the entries listed under it."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## How the pieces fit", 1)[1].split("```", 2)[1]
    tree: dict[str, set[str]] = {}
    top = ""
    for line in block.splitlines():
        name = line.split(maxsplit=1)[0] if line.strip() else ""
        if not name or not (name.endswith("/") or "." in name or name[0].isupper()):
            continue  # a description's second line
        if not line.startswith(" "):
            top = name
            tree[top] = set()
        elif line.startswith("  ") and not line.startswith("   "):
            tree[top].add(name)
    return tree


def test_the_readme_tree_is_the_real_tree() -> None:
    tree = readme_tree()
    for top, entries in tree.items():
        assert (REPO / top.rstrip("/")).exists(), top
        for entry in entries:
            assert (REPO / top / entry.rstrip("/")).exists(), f"{top}{entry} is in the README's tree, not in the repo"
    for package in ("gateway", "gateway_tools"):
        real = {
            path.name + ("/" if path.is_dir() else "")
            for path in (REPO / package).iterdir()
            if (path.suffix == ".py" and path.stem not in ("__init__", "__main__"))
            or (path.is_dir() and (path / "__init__.py").exists())
        }
        assert real <= tree[f"{package}/"], (
            f"{package}/ entries missing from the README's tree: {real - tree[package + '/']}"
        )
