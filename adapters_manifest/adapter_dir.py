"""Reading a PEFT adapter folder into the facts a record needs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from adapters_manifest.record import ADAPTER_FILES, CONFIG_FILE, AdapterFile


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_files(folder: Path) -> list[AdapterFile]:
    """Hash and size of the two files every adapter version consists of."""
    return [
        AdapterFile(name=name, sha256=sha256_file(folder / name), size=(folder / name).stat().st_size)
        for name in ADAPTER_FILES
    ]


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / CONFIG_FILE).read_text())
