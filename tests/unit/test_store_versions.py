"""Replaced versions on every store (local folder and S3 on moto's server): listed with the time
they were replaced, collected after their grace period, and the current one never."""

from __future__ import annotations

import time
from pathlib import Path

from adapters_manifest.publish import publish
from adapters_manifest.store import AdapterStore
from adapters_manifest.versions import collect_versions, kept_versions
from tests.unit.harness import make_adapter

# `store` (tests/unit/conftest.py): each store kind in turn, the local folder and S3 on moto's server.


async def publish_versions(store: AdapterStore, tmp_path: Path, count: int) -> list[str]:
    versions = []
    for n in range(count):
        folder = tmp_path / f"v{n}"
        record = make_adapter(folder, payload=f"version {n}".encode())
        await publish(store, folder, record)
        versions.append(record.version)
    return versions


async def test_replaced_versions_are_listed_and_collected_after_their_grace(
    store: AdapterStore, tmp_path: Path
) -> None:
    started = time.time()
    versions = await publish_versions(store, tmp_path, 3)
    listed = await store.list_versions("alice", "chat")
    assert set(listed) == set(versions)
    assert all(since >= started - 5 for since in listed.values())  # server clocks: a little slack

    assert await collect_versions(store, "alice", "chat", grace_s=3600) == []
    kept = await kept_versions(store, "alice", "chat", 3600, excluding="0" * 16)
    assert kept.count == 3 and kept.next_expiry_s is not None and kept.next_expiry_s > 3000

    assert await collect_versions(store, "alice", "chat", grace_s=0) == sorted(versions[:2])
    assert set(await store.list_versions("alice", "chat")) == {versions[-1]}
    record = await store.get_record("alice", "chat")
    assert record is not None and record.version == versions[-1] and await store.has_version(record)


async def test_the_current_version_is_never_deleted(store: AdapterStore, tmp_path: Path) -> None:
    versions = await publish_versions(store, tmp_path, 2)
    assert await store.delete_versions("alice", "chat", set(versions)) == [versions[0]]
    record = await store.get_record("alice", "chat")
    assert record is not None and await store.has_version(record)


async def test_a_version_published_again_is_current_and_its_grace_starts_anew(
    store: AdapterStore, tmp_path: Path
) -> None:
    first, second = await publish_versions(store, tmp_path, 2)
    again = make_adapter(tmp_path / "again", payload=b"version 0")  # first's bytes: current again
    await publish(store, tmp_path / "again", again)
    assert again.version == first
    assert await collect_versions(store, "alice", "chat", grace_s=0) == [second]
    assert set(await store.list_versions("alice", "chat")) == {first}
