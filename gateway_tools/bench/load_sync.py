"""Sync at scale for `lora-gateway bench load`: many records, the catalog next to bare S3 calls.

The records are small valid AdapterRecord JSON documents (copies of one real record under
other names) written straight into the manifest prefix: a sync reads records, never files.
The bare costs use a plain boto3 client with the catalog's parallelism, in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from adapters_manifest import layout
from adapters_manifest.record import AdapterRecord
from adapters_manifest.s3_store import S3Store
from gateway.catalog import MAX_PARALLEL_READS, AdapterCatalog
from gateway_tools.bench.load_tiers import object_key

NAMES_PER_OWNER = 10


@dataclass
class SyncSamples:
    """Seconds of each measurement; lists hold one value per repetition."""

    records: int
    seed_s: float = 0.0
    listing_s: list[float] = field(default_factory=list)  # bare paginated ListObjectsV2
    gets_s: list[float] = field(default_factory=list)  # bare GETs of every record
    initial_sync_s: list[float] = field(default_factory=list)  # AdapterCatalog.sync from empty
    poll_s: list[float] = field(default_factory=list)  # AdapterCatalog.sync, nothing changed
    poll_listing_s: list[float] = field(default_factory=list)  # bare listings between the polls


def record_objects(template: AdapterRecord, count: int, prefix: str) -> Iterator[tuple[str, bytes]]:
    """`count` records with distinct `owner/name`s, as (S3 key, JSON body) like S3Store.put_record writes."""
    for i in range(count):
        owner, name = f"user{i // NAMES_PER_OWNER:05d}", f"adapter-{i % NAMES_PER_OWNER}"
        record = template.model_copy(update={"owner": owner, "name": name})
        yield object_key(prefix, layout.record_key(owner, name)), record.model_dump_json(indent=2).encode()


def seed(client: Any, bucket: str, objects: Iterator[tuple[str, bytes]], threads: int) -> int:
    """Put every object, `threads` at a time; the number written."""

    def put(item: tuple[str, bytes]) -> None:
        client.put_object(Bucket=bucket, Key=item[0], Body=item[1], ContentType="application/json")

    with ThreadPoolExecutor(threads) as pool:
        return sum(1 for _ in pool.map(put, objects))


def bare_listing(client: Any, bucket: str, prefix: str) -> dict[str, str]:
    """What list_stamps asks S3 for: every key and ETag under the manifest prefix."""
    base = object_key(prefix, layout.MANIFEST_DIR) + "/"
    return {
        obj["Key"]: obj["ETag"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base)
        for obj in page.get("Contents", [])
    }


def bare_gets(client: Any, bucket: str, keys: list[str], threads: int) -> int:
    """Read every object, `threads` at a time; the bytes read."""

    def get(key: str) -> int:
        return len(client.get_object(Bucket=bucket, Key=key)["Body"].read())

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(get, keys))


def _timed(fn: Any, *args: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


async def measure_sync(
    store: S3Store, client: Any, template: AdapterRecord, records: int, rounds: int, polls: int
) -> SyncSamples:
    """Seed `records` records, then alternate catalog syncs with the bare calls they consist of."""
    out = SyncSamples(records=records)
    objects = record_objects(template, records, store.prefix)
    out.seed_s, written = _timed(seed, client, store.bucket, objects, MAX_PARALLEL_READS)
    assert written == records
    for round_no in range(rounds):
        catalog = AdapterCatalog(store, "bench")
        steps = ["bare", "sync"] if round_no % 2 == 0 else ["sync", "bare"]
        for step in steps:
            if step == "bare":
                seconds, stamps = _timed(bare_listing, client, store.bucket, store.prefix)
                out.listing_s.append(seconds)
                out.gets_s.append(_timed(bare_gets, client, store.bucket, sorted(stamps), MAX_PARALLEL_READS)[0])
            else:
                started = time.perf_counter()
                result = await catalog.sync()
                out.initial_sync_s.append(time.perf_counter() - started)
                assert result.changed == records, result
    for poll_no in range(polls):
        for step in ["bare", "poll"] if poll_no % 2 == 0 else ["poll", "bare"]:
            if step == "bare":
                out.poll_listing_s.append(_timed(bare_listing, client, store.bucket, store.prefix)[0])
            else:
                started = time.perf_counter()
                result = await catalog.sync()
                out.poll_s.append(time.perf_counter() - started)
                assert result.changed == 0 and result.listed == records, result
    return out
