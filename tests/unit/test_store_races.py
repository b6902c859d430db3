"""Publish and delete racing each other, on every store (local folder and S3 on moto's server):
whatever the interleaving, a record that readers see names files that are there."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from adapters_manifest import layout
from adapters_manifest.publish import publish
from adapters_manifest.record import WEIGHTS_FILE, AdapterRecord
from adapters_manifest.s3_store import S3Store
from adapters_manifest.store import AdapterStore
from gateway_tools.dev.s3_server import S3Server
from tests.unit.harness import fresh_s3_url, make_adapter, use_aws_env

# `store` (tests/unit/conftest.py): each store kind in turn, the local folder and S3 on moto's server.


class CommitGate:
    """Passes calls through, but holds the first record commit until `release` is set: the
    moment between an upload's files and its record."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store
        self.reached, self.release = asyncio.Event(), asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def put_record(self, record: AdapterRecord, **conditions: Any) -> None:
        if not self.release.is_set():
            self.reached.set()
            await self.release.wait()
        await self.store.put_record(record, **conditions)


async def assert_consistent(store: AdapterStore, owner: str, name: str, tmp_path: Path) -> AdapterRecord | None:
    """No record, or a record whose every file can be fetched byte-exact."""
    record = await store.get_record(owner, name)
    if record is not None:
        assert await store.has_version(record), f"{record.versioned_ref}: the record names files that are gone"
        dest = tmp_path / f"fetched-{uuid.uuid4().hex}"
        await store.fetch_file(record, WEIGHTS_FILE, dest)
        assert next(f for f in record.files if f.name == WEIGHTS_FILE).size == dest.stat().st_size
    return record


async def publish_paused_for_a_delete(store: AdapterStore, folder: Path, record: AdapterRecord) -> bool:
    """Publish `record`, and delete the adapter while the publish waits to commit its record."""
    gate = CommitGate(store)
    publishing = asyncio.create_task(publish(gate, folder, record))  # type: ignore[arg-type]
    await asyncio.wait_for(gate.reached.wait(), 30)
    deleted = await store.delete_adapter(record.owner, record.name)
    gate.release.set()
    await asyncio.wait_for(publishing, 30)
    return deleted


async def test_a_delete_while_a_new_version_uploads_leaves_no_record_without_files(
    store: AdapterStore, tmp_path: Path
) -> None:
    v1 = make_adapter(tmp_path / "v1", payload=b"first")
    await publish(store, tmp_path / "v1", v1)
    v2 = make_adapter(tmp_path / "v2", payload=b"second")
    assert await publish_paused_for_a_delete(store, tmp_path / "v2", v2)
    assert await assert_consistent(store, "alice", "chat", tmp_path) in (None, v2)


async def test_a_delete_while_the_same_version_is_published_again_leaves_no_record_without_files(
    store: AdapterStore, tmp_path: Path
) -> None:
    """Its files are in the store already, so the upload skips them: the delete takes them."""
    v1 = make_adapter(tmp_path / "v1", payload=b"first")
    await publish(store, tmp_path / "v1", v1)
    again = make_adapter(tmp_path / "again", payload=b"first")
    assert await publish_paused_for_a_delete(store, tmp_path / "again", again)
    assert await assert_consistent(store, "alice", "chat", tmp_path) in (None, again)


async def test_a_delete_leaves_the_files_a_newer_record_names(store: AdapterStore, tmp_path: Path) -> None:
    """Versions are removed only when no record names them: publish, delete and publish again
    concurrently, many times; every end state is consistent."""
    for round_ in range(5):
        folder = tmp_path / f"round{round_}"
        record = make_adapter(folder, payload=f"round {round_}".encode())
        await asyncio.gather(publish(store, folder, record), store.delete_adapter("alice", "chat"))
        await assert_consistent(store, "alice", "chat", tmp_path)


async def test_s3_a_lock_left_by_a_writer_that_died_is_taken_over_after_its_lease(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_aws_env(monkeypatch, s3_server)
    s3 = S3Store.from_url(fresh_s3_url(), endpoint_url=s3_server.endpoint_url)
    lock = s3._key(layout.lock_key("alice", "chat"))
    expired = json.dumps({"expires_at": time.time() - 1}).encode()
    s3._client.put_object(Bucket=s3.bucket, Key=lock, Body=expired)
    record = make_adapter(tmp_path / "v1")
    await publish(s3, tmp_path / "v1", record)
    assert await assert_consistent(s3, "alice", "chat", tmp_path) == record
    assert await s3.delete_adapter("alice", "chat")


async def test_s3_a_live_lock_holds_a_commit_back_until_released(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_aws_env(monkeypatch, s3_server)
    s3 = S3Store.from_url(fresh_s3_url(), endpoint_url=s3_server.endpoint_url)
    lock = s3._key(layout.lock_key("alice", "chat"))
    held = json.dumps({"expires_at": time.time() + 600}).encode()
    s3._client.put_object(Bucket=s3.bucket, Key=lock, Body=held)
    record = make_adapter(tmp_path / "v1")
    publishing = asyncio.create_task(publish(s3, tmp_path / "v1", record))
    await asyncio.sleep(0.5)
    assert not publishing.done() and await s3.get_record("alice", "chat") is None
    s3._client.delete_object(Bucket=s3.bucket, Key=lock)
    assert await asyncio.wait_for(publishing, 30) == record
