"""Old versions of an adapter: kept for a grace period after a newer one replaced them (replicas
that have not synced yet may still fetch them), then collected; while in their grace they count
against how many versions one adapter may keep."""

from __future__ import annotations

import time
from dataclasses import dataclass

from adapters_manifest.store import AdapterStore


@dataclass(frozen=True)
class KeptVersions:
    count: int  # stored versions besides `excluding`, after collecting the expired ones
    next_expiry_s: float | None  # seconds until the oldest of them may be collected


async def collect_versions(store: AdapterStore, owner: str, name: str, grace_s: float) -> list[str]:
    """Remove the versions no record names whose grace period is over; returns them."""
    record = await store.get_record(owner, name)
    current = record.version if record is not None else None
    now = time.time()
    expired = {
        v for v, since in (await store.list_versions(owner, name)).items() if v != current and now - since >= grace_s
    }
    return await store.delete_versions(owner, name, expired) if expired else []


async def kept_versions(store: AdapterStore, owner: str, name: str, grace_s: float, excluding: str) -> KeptVersions:
    """How many versions the adapter keeps now, besides `excluding` (the one being uploaded)."""
    await collect_versions(store, owner, name, grace_s)
    record = await store.get_record(owner, name)
    now = time.time()
    kept = {v: since for v, since in (await store.list_versions(owner, name)).items() if v != excluding}
    in_grace = [since + grace_s - now for v, since in kept.items() if record is None or v != record.version]
    return KeptVersions(count=len(kept), next_expiry_s=max(0.0, min(in_grace)) if in_grace else None)
