"""The interface every adapter store offers (local folder now, S3 next)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from adapters_manifest.record import AdapterRecord


class AdapterStore(Protocol):
    url: str

    async def list_records(self) -> list[AdapterRecord]:
        """Every adapter record in the store."""

    async def get_record(self, owner: str, name: str) -> AdapterRecord | None:
        """One record, or None when there is none."""

    async def local_dir(self, record: AdapterRecord) -> Path:
        """A local folder holding exactly this version's files, ready for the engine."""
