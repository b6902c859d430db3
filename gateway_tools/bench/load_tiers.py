"""Tier moves for `lora-gateway bench load`: store -> disk, disk -> engine, resident hit.

Each move is measured next to the raw cost of the same bytes (a plain boto3 GET, a plain file
read) in the same loop, one right after the other and in alternating order, so the machine's
noise and drift hit both alike. The first round is a warm-up (connections, threads, page cache).
"""

from __future__ import annotations

import itertools
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters_manifest import layout
from adapters_manifest.publish import publish
from adapters_manifest.record import AdapterRecord
from adapters_manifest.s3_store import S3Store
from gateway.disk_cache import DiskCache
from gateway.engine.interface import Engine, EngineAdapter
from gateway.pool import AdapterPool

# Measured move -> the raw cost it is compared with (None: nothing below it to compare with).
MOVES: dict[str, str | None] = {"store_to_disk": "raw_get", "disk_to_engine": "file_read", "resident_hit": None}
WARMUP_ROUNDS = 1
FIRST_ENGINE_ID = 1000  # clear of the ids the pool hands out (1, 2, ...)
CACHE_BYTES = 1 << 30

Work = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class BenchAdapter:
    record: AdapterRecord
    folder: Path  # its files, as make_model wrote them


@dataclass
class TierSamples:
    """Seconds per repetition for one adapter, by move (and raw cost) name."""

    rank: int
    bytes: int
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.samples.setdefault(name, []).append(seconds)


async def _rounds(
    reps: int,
    adapters: list[BenchAdapter],
    results: list[TierSamples],
    works: Callable[[BenchAdapter], dict[str, Work]],
    cleanup: Work | None = None,
) -> None:
    """Each adapter's works back to back, `reps` times after the warm-up, the order flipped
    every round; `cleanup` (unmeasured) after each adapter's turn."""
    for round_no in range(WARMUP_ROUNDS + reps):
        for adapter, result in zip(adapters, results):
            pairs = list(works(adapter).items())
            for name, work in pairs if round_no % 2 else pairs[::-1]:
                started = time.perf_counter()
                await work()
                if round_no >= WARMUP_ROUNDS:
                    result.add(name, time.perf_counter() - started)
            if cleanup is not None:
                await cleanup()


def object_key(prefix: str, relative: str) -> str:
    """The S3 key of a store path (as S3Store builds it)."""
    return f"{prefix}/{relative}" if prefix else relative


def raw_get(client: Any, bucket: str, keys: list[str], dest: Path) -> None:
    """The raw cost of store -> disk: a plain GET of each object, written to a file."""
    dest.mkdir(parents=True)
    for key in keys:
        (dest / key.rpartition("/")[2]).write_bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def file_read(folder: Path, record: AdapterRecord) -> int:
    """The raw cost of disk -> engine: read every file of the version."""
    return sum(len((folder / f.name).read_bytes()) for f in record.files)


async def measure_tiers(
    engine: Engine, store: S3Store, client: Any, adapters: list[BenchAdapter], work_dir: Path, reps: int
) -> list[TierSamples]:
    """Publish the adapters to `store`, then time each move `reps` times per adapter."""
    for a in adapters:
        await publish(store, a.folder, a.record)
    results = [TierSamples(rank=a.record.rank, bytes=sum(f.size for f in a.record.files)) for a in adapters]
    await _store_to_disk(store, client, adapters, results, work_dir, reps)
    # One disk cache from here on, as in the gateway: every version pinned, on disk.
    cache = DiskCache(store, work_dir / "serving-cache", CACHE_BYTES)
    on_disk = {a.record.versioned_ref: await cache.pin(a.record) for a in adapters}
    await _disk_to_engine(engine, on_disk, adapters, results, reps)
    await _resident_hit(AdapterPool(engine, cache, capacity=len(adapters)), adapters, results, reps)
    return results


async def _store_to_disk(
    store: S3Store, client: Any, adapters: list[BenchAdapter], results: list[TierSamples], work_dir: Path, reps: int
) -> None:
    scratch = itertools.count()

    def works(a: BenchAdapter) -> dict[str, Work]:
        keys = [object_key(store.prefix, layout.file_key(a.record, f.name)) for f in a.record.files]
        cache = DiskCache(store, work_dir / f"cache-{next(scratch)}", CACHE_BYTES)  # fresh: not on disk
        raw_dest = work_dir / f"raw-{next(scratch)}"

        async def pin() -> None:
            await cache.pin(a.record)
            cache.unpin(a.record)

        async def get() -> None:
            raw_get(client, store.bucket, keys, raw_dest)

        return {"store_to_disk": pin, "raw_get": get}

    await _rounds(reps, adapters, results, works)
    for path in [*work_dir.glob("cache-*"), *work_dir.glob("raw-*")]:
        shutil.rmtree(path)


async def _disk_to_engine(
    engine: Engine, on_disk: dict[str, Path], adapters: list[BenchAdapter], results: list[TierSamples], reps: int
) -> None:
    engine_ids = itertools.count(FIRST_ENGINE_ID)
    loaded: list[EngineAdapter] = []

    def works(a: BenchAdapter) -> dict[str, Work]:
        path = on_disk[a.record.versioned_ref]
        engine_id = next(engine_ids)
        # A new id and name each time: the engine must read the files, not find the adapter known.
        adapter = EngineAdapter(engine_id, f"{a.record.versioned_ref}#{engine_id}", path)

        async def add() -> None:
            await engine.add_adapter(adapter)
            loaded.append(adapter)

        async def read() -> None:
            file_read(path, a.record)

        return {"disk_to_engine": add, "file_read": read}

    async def remove() -> None:
        while loaded:
            await engine.remove_adapter(loaded.pop())

    await _rounds(reps, adapters, results, works, cleanup=remove)


async def _resident_hit(pool: AdapterPool, adapters: list[BenchAdapter], results: list[TierSamples], reps: int) -> None:
    for a in adapters:
        async with pool.acquire(a.record):  # loads it: resident from now on
            pass

    def works(a: BenchAdapter) -> dict[str, Work]:
        async def hit() -> None:
            async with pool.acquire(a.record):
                pass

        return {"resident_hit": hit}

    await _rounds(reps, adapters, results, works)
