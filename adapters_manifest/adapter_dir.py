"""Reading a PEFT adapter folder into the facts a record needs."""

from __future__ import annotations

import hashlib
from pathlib import Path

from adapters_manifest.record import ADAPTER_FILES, AdapterFile


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
