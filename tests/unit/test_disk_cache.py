"""DiskCache against a real local folder store, and against one with faults injected: single flight,
byte-exact verified copies that appear whole or not at all, retries, LRU by bytes that never
touches a pinned version, retirement, and what an earlier process left behind."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters_manifest import layout
from adapters_manifest.local_store import LocalFolderStore
from adapters_manifest.record import AdapterRecord
from adapters_manifest.store import StoreUnavailableError
from gateway.disk_cache import ChecksumMismatchError, DiskCache
from tests.fakes import publish_adapter
from tests.unit.harness import until

PAYLOAD_BYTES = 64  # every test adapter's weights: equal sizes make byte budgets easy to state


class FaultyStore:
    """A LocalFolderStore that counts fetches and injects the faults a test turns on."""

    def __init__(self, inner: LocalFolderStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.fetches: list[tuple[str, str]] = []  # (versioned_ref, file name), every attempt
        self.corrupt = 0  # the next N fetched files arrive with one byte flipped
        self.unavailable = 0  # the next N fetches raise StoreUnavailableError
        self.cut = 0  # the next N fetches write half the file, then raise `cut_error`
        self.cut_error: Exception = StoreUnavailableError("connection reset mid-transfer")
        self.delay_s = 0.0
        self.gate: asyncio.Event | None = None  # when set, every fetch waits for it
        self.on_fault: Callable[[], None] = lambda: None  # called just before a fault is raised
        self.in_flight = 0
        self.peak_in_flight = 0

    def fetches_of(self, record: AdapterRecord) -> int:
        return sum(1 for ref, _ in self.fetches if ref == record.versioned_ref)

    async def fetch_file(self, record: AdapterRecord, file_name: str, dest: Path) -> None:
        self.fetches.append((record.versioned_ref, file_name))
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.gate is not None:
                await self.gate.wait()
            if self.unavailable:
                self.unavailable -= 1
                self.on_fault()
                raise StoreUnavailableError("503 Slow Down")
            await self.inner.fetch_file(record, file_name, dest)
            if self.cut:
                self.cut -= 1
                data = dest.read_bytes()
                dest.write_bytes(data[: len(data) // 2])
                self.on_fault()
                raise self.cut_error
            if self.corrupt:
                self.corrupt -= 1
                data = bytearray(dest.read_bytes())
                data[-1] ^= 0xFF
                dest.write_bytes(bytes(data))
        finally:
            self.in_flight -= 1

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.fixture
def local(tmp_path: Path) -> LocalFolderStore:
    return LocalFolderStore(tmp_path / "store")


@pytest.fixture
def store(local: LocalFolderStore) -> FaultyStore:
    return FaultyStore(local)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "cache"
    folder.mkdir()
    return folder


async def publish(local: LocalFolderStore, tmp_path: Path, name: str, content: str = "") -> AdapterRecord:
    payload = f"{name}:{content}".encode().ljust(PAYLOAD_BYTES, b".")
    return await publish_adapter(local, tmp_path / "scratch", "alice", name, payload=payload)


def size_of(record: AdapterRecord) -> int:
    return sum(f.size for f in record.files)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def staging_dirs(root: Path) -> list[Path]:
    return sorted(root.glob(".download-*"))


def assert_same_as_store(local: LocalFolderStore, record: AdapterRecord, folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(f.name for f in record.files)
    for f in record.files:
        assert (folder / f.name).read_bytes() == (local.root / layout.file_key(record, f.name)).read_bytes()


# -- fetching -------------------------------------------------------------------------------


async def test_concurrent_pins_of_one_version_share_one_download(local, store, root, tmp_path) -> None:
    record = await publish(local, tmp_path, "a")
    store.delay_s = 0.02
    cache = DiskCache(store, root, max_bytes=10_000)
    paths = await asyncio.gather(*(cache.pin(record) for _ in range(20)))
    assert len(set(paths)) == 1
    assert sorted(store.fetches) == sorted((record.versioned_ref, f.name) for f in record.files)
    for _ in range(20):
        cache.unpin(record)
    assert cache.is_cached(record)


async def test_the_cached_folder_is_byte_identical_and_its_path_stable(local, store, root, tmp_path) -> None:
    record = await publish(local, tmp_path, "a")
    cache = DiskCache(store, root, max_bytes=10_000)
    assert not cache.is_cached(record)
    path = await cache.pin(record)
    assert path == root / "alice" / "a" / record.version
    assert_same_as_store(local, record, path)
    cache.unpin(record)
    assert await cache.pin(record) == path  # from the cache: no second download
    cache.unpin(record)
    assert store.fetches_of(record) == len(record.files)
    assert cache.used_bytes == size_of(record)
    assert staging_dirs(root) == []


async def test_a_checksum_mismatch_is_retried(local, store, root, tmp_path) -> None:
    record = await publish(local, tmp_path, "a")
    store.corrupt = 1
    cache = DiskCache(store, root, max_bytes=10_000, attempts=2)
    path = await cache.pin(record)
    assert_same_as_store(local, record, path)
    assert store.fetches_of(record) == 1 + len(record.files)  # the corrupt file, then the whole version
    assert staging_dirs(root) == []


async def test_persistent_corruption_is_refused_and_leaves_nothing(local, store, root, tmp_path) -> None:
    record = await publish(local, tmp_path, "a")
    store.corrupt = 1_000
    cache = DiskCache(store, root, max_bytes=10_000, attempts=2)
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        await cache.pin(record)
    assert store.fetches_of(record) == 2  # one try per attempt: the first file is already wrong
    assert files_under(root) == []
    assert staging_dirs(root) == []
    assert not cache.is_cached(record)
    assert cache.used_bytes == 0

    store.corrupt = 0  # the store was repaired: a later pin tries again
    path = await cache.pin(record)
    assert_same_as_store(local, record, path)


async def test_a_download_cut_mid_file_is_retried_and_the_partial_file_never_used(local, store, root, tmp_path) -> None:
    record = await publish(local, tmp_path, "a")
    store.cut = 1
    cache = DiskCache(store, root, max_bytes=10_000, attempts=2)
    path = await cache.pin(record)
    assert_same_as_store(local, record, path)
    assert staging_dirs(root) == []


async def test_a_download_that_fails_mid_file_leaves_no_partial_file(local, store, root, tmp_path) -> None:
    """An error that is not retried (a full local disk, say) fails the pin and leaves nothing behind."""
    record = await publish(local, tmp_path, "a")
    store.cut, store.cut_error = 1, OSError(28, "No space left on device")
    cache = DiskCache(store, root, max_bytes=10_000)
    with pytest.raises(OSError, match="No space left"):
        await cache.pin(record)
    assert files_under(root) == []
    assert staging_dirs(root) == []
    assert not cache.is_cached(record)

    path = await cache.pin(record)  # the next pin starts over
    assert_same_as_store(local, record, path)
    # And a new process trusts nothing of it either: every byte matches the record.
    cache.unpin(record)
    assert await DiskCache(store, root, max_bytes=10_000).pin(record) == path


async def test_store_unavailable_propagates_after_every_attempt(local, store, root, tmp_path) -> None:
    record = await publish(local, tmp_path, "a")
    store.unavailable = 1_000
    cache = DiskCache(store, root, max_bytes=10_000, attempts=3)
    with pytest.raises(StoreUnavailableError):
        await cache.pin(record)
    assert store.fetches_of(record) == 3
    assert files_under(root) == [] and staging_dirs(root) == []

    store.unavailable = 0
    assert_same_as_store(local, record, await cache.pin(record))


async def test_all_waiters_of_a_failed_download_get_the_error(local, store, root, tmp_path) -> None:
    record = await publish(local, tmp_path, "a")
    store.unavailable, store.delay_s = 1, 0.01
    cache = DiskCache(store, root, max_bytes=10_000, attempts=1)
    results = await asyncio.gather(*(cache.pin(record) for _ in range(10)), return_exceptions=True)
    assert all(isinstance(r, StoreUnavailableError) for r in results), results
    assert store.fetches_of(record) == 1


async def test_a_failed_pin_does_not_unpin_the_retry_that_followed_it(local, store, root, tmp_path) -> None:
    """A request that sees a download fail must release that download, not the next one of the same
    version (started by another request meanwhile): that one is pinned and must stay on disk."""
    a, b = await publish(local, tmp_path, "a"), await publish(local, tmp_path, "b")
    cache = DiskCache(store, root, max_bytes=size_of(a), attempts=1)  # room for one version
    failed = asyncio.Event()
    store.unavailable, store.on_fault = 1, failed.set

    async def retry_at_once() -> Path:
        await failed.wait()  # runs before the first pin learns of the failure
        return await cache.pin(a)

    retry = asyncio.create_task(retry_at_once())
    with pytest.raises(StoreUnavailableError):
        await cache.pin(a)
    path = await retry  # pinned: the engine may read these files at any time
    await cache.pin(b)  # over budget now: only unpinned versions may go
    cache.unpin(b)
    assert_same_as_store(local, a, path)
    assert cache.is_cached(a)


async def test_downloads_in_parallel_up_to_max_parallel(local, store, root, tmp_path) -> None:
    records = [await publish(local, tmp_path, f"x{i}") for i in range(6)]
    store.gate = asyncio.Event()
    cache = DiskCache(store, root, max_bytes=100_000, max_parallel=2)
    pins = asyncio.gather(*(cache.pin(r) for r in records))
    await until(lambda: store.in_flight == 2)
    await asyncio.sleep(0.05)  # time for a third to start, were it allowed to
    assert store.in_flight == 2
    store.gate.set()
    await pins
    assert store.peak_in_flight == 2
    assert all(cache.is_cached(r) for r in records)


async def test_a_cancelled_pin_leaves_the_download_running_for_others(local, store, root, tmp_path) -> None:
    record = await publish(local, tmp_path, "a")
    store.gate = asyncio.Event()
    cache = DiskCache(store, root, max_bytes=10_000)
    first = asyncio.create_task(cache.pin(record))
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    second = asyncio.create_task(cache.pin(record))
    store.gate.set()
    path = await second
    assert_same_as_store(local, record, path)
    assert store.fetches_of(record) == len(record.files)


# -- the byte budget ------------------------------------------------------------------------


async def test_least_recently_used_unpinned_version_is_dropped_over_budget(local, store, root, tmp_path) -> None:
    a, b, c = [await publish(local, tmp_path, n) for n in ("a", "b", "c")]
    assert size_of(a) == size_of(b) == size_of(c)
    cache = DiskCache(store, root, max_bytes=2 * size_of(a) + size_of(a) // 2)  # fits two
    paths = {}
    for record in (a, b, a):  # b is now the least recently used
        paths[record.version] = await cache.pin(record)
        cache.unpin(record)
    paths[c.version] = await cache.pin(c)
    cache.unpin(c)

    assert not paths[b.version].exists()
    assert not cache.is_cached(b)
    assert paths[a.version].is_dir() and paths[c.version].is_dir()
    assert cache.used_bytes == 2 * size_of(a) <= 2 * size_of(a) + size_of(a) // 2
    await cache.pin(b)  # dropped, so fetched again
    cache.unpin(b)
    assert store.fetches_of(b) == 2 * len(b.files)


async def test_a_pinned_version_is_never_dropped(local, store, root, tmp_path) -> None:
    a, b, c, d = [await publish(local, tmp_path, n) for n in ("a", "b", "c", "d")]
    cache = DiskCache(store, root, max_bytes=2 * size_of(a))
    held = await cache.pin(a)  # the least recently used, but pinned
    for record in (b, c, d, b):
        await cache.pin(record)
        cache.unpin(record)
        assert_same_as_store(local, a, held)
    assert cache.is_cached(a)


async def test_pinned_versions_may_exceed_the_budget(local, store, root, tmp_path) -> None:
    a, b, c = [await publish(local, tmp_path, n) for n in ("a", "b", "c")]
    cache = DiskCache(store, root, max_bytes=size_of(a))
    paths = [await cache.pin(r) for r in (a, b, c)]
    assert all(p.is_dir() for p in paths)
    assert cache.used_bytes == 3 * size_of(a)
    cache.unpin(a)
    cache.unpin(b)
    assert not paths[0].exists() and not paths[1].exists()  # unpinned: back within budget at once
    assert paths[2].is_dir()
    cache.unpin(c)
    assert paths[2].is_dir()  # fits on its own


# -- retirement ----------------------------------------------------------------------------


async def test_retiring_an_unpinned_version_deletes_it_now(local, store, root, tmp_path) -> None:
    record = await publish(local, tmp_path, "a")
    cache = DiskCache(store, root, max_bytes=10_000)
    path = await cache.pin(record)
    cache.unpin(record)
    cache.retire(record)
    assert not path.exists()
    assert not cache.is_cached(record)
    assert cache.used_bytes == 0


async def test_retiring_a_pinned_version_deletes_it_on_the_last_unpin(local, store, root, tmp_path) -> None:
    record = await publish(local, tmp_path, "a")
    cache = DiskCache(store, root, max_bytes=10_000)
    path = await cache.pin(record)
    await cache.pin(record)
    cache.retire(record)
    assert_same_as_store(local, record, path)
    cache.unpin(record)
    assert path.is_dir()
    cache.unpin(record)
    assert not path.exists()
    assert files_under(root) == []


async def test_retired_while_downloading_and_unpinned_meanwhile_leaves_nothing(local, store, root, tmp_path) -> None:
    """The last pin goes while the download still runs: the folder it then renames into place
    must not stay behind, untracked."""
    record = await publish(local, tmp_path, "a")
    store.gate = asyncio.Event()
    cache = DiskCache(store, root, max_bytes=10_000)
    pin = asyncio.create_task(cache.pin(record))
    await asyncio.sleep(0.01)
    cache.retire(record)
    pin.cancel()  # the request went away
    with pytest.raises(asyncio.CancelledError):
        await pin
    store.gate.set()
    await _downloads_done(cache)
    assert files_under(root) == []
    assert not cache.is_cached(record)


async def test_retired_while_downloading_and_pinned_is_deleted_on_the_last_unpin(local, store, root, tmp_path) -> None:
    record = await publish(local, tmp_path, "a")
    store.gate = asyncio.Event()
    cache = DiskCache(store, root, max_bytes=10_000)
    pin = asyncio.create_task(cache.pin(record))
    await asyncio.sleep(0.01)
    cache.retire(record)
    store.gate.set()
    path = await pin
    assert_same_as_store(local, record, path)
    cache.unpin(record)
    assert files_under(root) == []


async def test_retiring_a_version_this_process_never_pinned_deletes_a_leftover_folder(
    local, store, root, tmp_path
) -> None:
    record = await publish(local, tmp_path, "a")
    path = await DiskCache(store, root, max_bytes=10_000).pin(record)  # an earlier process
    DiskCache(store, root, max_bytes=10_000).retire(record)
    assert not path.exists()


# -- what an earlier process left -----------------------------------------------------------


async def test_a_verified_folder_of_an_earlier_process_is_reused_without_fetching(local, store, root, tmp_path) -> None:
    record = await publish(local, tmp_path, "a")
    earlier = DiskCache(store, root, max_bytes=10_000)
    path = await earlier.pin(record)
    earlier.unpin(record)

    counting = FaultyStore(local)
    assert await DiskCache(counting, root, max_bytes=10_000).pin(record) == path
    assert counting.fetches == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
async def test_a_folder_of_an_earlier_process_that_does_not_match_is_refetched(
    local, store, root, tmp_path, damage: str
) -> None:
    record = await publish(local, tmp_path, "a")
    path = await DiskCache(store, root, max_bytes=10_000).pin(record)
    weights = path / record.files[-1].name
    data = weights.read_bytes()
    if damage == "flip":  # same size, different bytes: only the sha256 tells
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    elif damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.unlink()

    counting = FaultyStore(local)
    assert await DiskCache(counting, root, max_bytes=10_000).pin(record) == path
    assert counting.fetches_of(record) == len(record.files)
    assert_same_as_store(local, record, path)


async def test_stale_download_folders_are_removed_at_construction(local, store, root, tmp_path) -> None:
    for name in ("abc", "def"):
        stale = root / f".download-{name}"
        stale.mkdir()
        (stale / "adapter_model.safetensors").write_bytes(b"half a fi")
    DiskCache(store, root, max_bytes=10_000)
    assert staging_dirs(root) == []
    assert files_under(root) == []


async def _downloads_done(cache: DiskCache) -> None:
    """Wait for the cache's background downloads (white box: nothing public reports them)."""
    await asyncio.gather(*cache._versions.tasks, return_exceptions=True)
