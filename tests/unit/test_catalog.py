"""AdapterCatalog against a real local folder store, counted and with outages injected: a poll
reads only the records whose stamp changed, versions that leave are retired exactly once, an
outage changes nothing, and a request's `model` never reaches the store unless it could exist."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters_manifest.local_store import LocalFolderStore
from adapters_manifest.record import AdapterRecord
from adapters_manifest.store import StoreUnavailableError
from gateway.auth.keys import Principal
from gateway.catalog import AdapterCatalog, SyncResult
from gateway.errors import ModelNotFoundError
from tests.fakes import publish_adapter
from tests.unit.harness import BASE, until

ALICE = Principal("alice")  # the owner of every adapter here: may look up her own namespace


class CountingStore:
    """A LocalFolderStore that records every call and can be taken down."""

    def __init__(self, inner: LocalFolderStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.calls: list[str] = []  # "list_stamps", "get_record alice/a", ...
        self.down = False
        self.listed: asyncio.Event | None = None  # when set: set once a listing was taken ...
        self.release_listing: asyncio.Event | None = None  # ... which is returned only after this

    def reads(self) -> list[str]:
        return [c.removeprefix("get_record ") for c in self.calls if c.startswith("get_record ")]

    def _call(self, what: str) -> None:
        self.calls.append(what)
        if self.down:
            raise StoreUnavailableError(f"{self.url}: connection refused")

    async def list_stamps(self) -> dict[str, str]:
        self._call("list_stamps")
        stamps = await self.inner.list_stamps()
        if self.listed is not None and self.release_listing is not None:
            self.listed.set()
            await self.release_listing.wait()
        return stamps

    async def get_record(self, owner: str, name: str) -> AdapterRecord | None:
        self._call(f"get_record {owner}/{name}")
        return await self.inner.get_record(owner, name)

    def __getattr__(self, name: str) -> object:
        def refuse(*args: object, **kwargs: object) -> None:
            raise AssertionError(f"the catalog called {name}: it only lists and reads records")

        return refuse


class Retired:
    def __init__(self) -> None:
        self.records: list[AdapterRecord] = []

    def __call__(self, record: AdapterRecord) -> None:
        self.records.append(record)


@pytest.fixture
def local(tmp_path: Path) -> LocalFolderStore:
    return LocalFolderStore(tmp_path / "store")


@pytest.fixture
def store(local: LocalFolderStore) -> CountingStore:
    return CountingStore(local)


@pytest.fixture
def retired() -> Retired:
    return Retired()


@pytest.fixture
def catalog(store: CountingStore, retired: Retired) -> AdapterCatalog:
    return AdapterCatalog(store, BASE, on_retired=retired)


@pytest.fixture
def publish(local: LocalFolderStore, tmp_path: Path) -> Callable[..., object]:
    async def publish(ref: str, content: str = "v1", **options: object) -> AdapterRecord:
        owner, name = ref.split("/")
        payload = f"{ref}:{content}".encode()
        return await publish_adapter(local, tmp_path / "scratch", owner, name, payload=payload, **options)

    return publish


# -- sync ----------------------------------------------------------------------------------


async def test_first_sync_lists_everything(catalog, store, publish) -> None:
    records = [await publish(ref) for ref in ("alice/a", "alice/b", "bob/c")]
    assert not catalog.synced
    assert await catalog.sync() == SyncResult(listed=3, changed=3, removed=0)
    assert catalog.records() == records
    assert catalog.synced and catalog.last_error is None
    assert sorted(store.reads()) == ["alice/a", "alice/b", "bob/c"]


async def test_owned_by_is_exactly_one_owners_records_in_ref_order(catalog, publish) -> None:
    refs = ("al/z", "al/a", "al-b/x", "al0/y", "al.c/w", "alice/v", "bob/u")
    records = {ref: await publish(ref) for ref in refs}
    await catalog.sync()
    assert catalog.owned_by("al") == [records["al/a"], records["al/z"]]  # not al-b, al.c, al0 or alice
    assert catalog.owned_by("alice") == [records["alice/v"]]
    assert catalog.owned_by("nobody") == []
    catalog.forget("al/a")
    assert catalog.owned_by("al") == [records["al/z"]]


async def test_a_poll_without_changes_reads_no_record(catalog, store, publish) -> None:
    for ref in ("alice/a", "alice/b", "bob/c"):
        await publish(ref)
    await catalog.sync()
    store.calls.clear()
    assert await catalog.sync() == SyncResult(listed=3, changed=0, removed=0)
    assert await catalog.sync() == SyncResult(listed=3, changed=0, removed=0)
    assert store.calls == ["list_stamps", "list_stamps"]


async def test_a_new_version_is_read_and_the_old_one_retired_once(catalog, store, retired, publish) -> None:
    old, other = await publish("alice/a", "v1"), await publish("alice/b")
    await catalog.sync()
    new = await publish("alice/a", "v2")
    assert new.version != old.version
    store.calls.clear()

    assert await catalog.sync() == SyncResult(listed=2, changed=1, removed=0)
    assert store.reads() == ["alice/a"]
    assert catalog.records() == [new, other]
    assert await catalog.resolve("alice/a", ALICE) == new
    assert retired.records == [old]

    await catalog.sync()
    await catalog.sync()
    assert retired.records == [old]  # exactly once


async def test_a_rewritten_record_of_the_same_version_retires_nothing(catalog, retired, publish) -> None:
    await publish("alice/a", "v1")
    await catalog.sync()
    again = await publish("alice/a", "v1", visibility="public")  # not part of the version
    assert (await catalog.sync()).changed == 1
    assert await catalog.resolve("alice/a", ALICE) == again
    assert retired.records == []


async def test_a_deleted_adapter_is_removed_and_retired(catalog, store, local, retired, publish) -> None:
    gone, kept = await publish("alice/a"), await publish("alice/b")
    await catalog.sync()
    assert await local.delete_adapter("alice", "a")

    assert await catalog.sync() == SyncResult(listed=1, changed=0, removed=1)
    assert catalog.records() == [kept]
    assert retired.records == [gone]
    with pytest.raises(ModelNotFoundError):
        await catalog.resolve("alice/a", ALICE)
    await catalog.sync()
    assert retired.records == [gone]


async def test_a_failed_poll_keeps_serving_what_is_known(catalog, store, retired, publish) -> None:
    known = await publish("alice/a")
    await catalog.sync()
    synced_at = catalog.last_success
    await publish("alice/b")
    store.down = True

    with pytest.raises(StoreUnavailableError):
        await catalog.sync()
    assert catalog.last_error is not None and "StoreUnavailableError" in catalog.last_error
    assert catalog.last_success == synced_at and catalog.synced
    assert catalog.records() == [known]
    store.calls.clear()
    assert await catalog.resolve("alice/a", ALICE) == known  # still served, without the store
    assert store.calls == []
    assert retired.records == []

    store.down = False
    assert (await catalog.sync()).changed == 1
    assert catalog.last_error is None
    assert catalog.last_success is not None and synced_at is not None and catalog.last_success > synced_at
    assert [r.ref for r in catalog.records()] == ["alice/a", "alice/b"]


async def test_a_failed_record_read_changes_nothing(catalog, store, retired, publish) -> None:
    """The listing works but a read fails: the poll as a whole fails; the change is seen next time."""
    old = await publish("alice/a", "v1")
    await catalog.sync()
    new = await publish("alice/a", "v2")
    real_get = store.get_record

    async def failing_get(owner: str, name: str) -> AdapterRecord | None:
        raise StoreUnavailableError("read timed out")

    store.get_record = failing_get
    with pytest.raises(StoreUnavailableError):
        await catalog.sync()
    assert await catalog.resolve("alice/a", ALICE) == old
    assert retired.records == []

    store.get_record = real_get
    assert (await catalog.sync()).changed == 1
    assert await catalog.resolve("alice/a", ALICE) == new
    assert retired.records == [old]


async def test_an_adapter_looked_up_during_a_poll_is_not_removed_by_its_older_listing(
    catalog, store, retired, publish
) -> None:
    """A poll's listing predates an adapter that a request then found by a direct look-up: that
    listing says nothing about it, so it must not retire it."""
    await publish("alice/a")
    await catalog.sync()
    store.listed, store.release_listing = asyncio.Event(), asyncio.Event()
    poll = asyncio.create_task(catalog.sync())
    await store.listed.wait()  # the listing is taken: without alice/new
    new = await publish("alice/new")
    assert await catalog.resolve("alice/new", ALICE) == new
    store.release_listing.set()
    await poll

    assert await catalog.resolve("alice/new", ALICE) == new
    assert retired.records == []
    store.listed = store.release_listing = None
    await catalog.sync()
    assert [r.ref for r in catalog.records()] == ["alice/a", "alice/new"]
    assert retired.records == []


# -- resolve -------------------------------------------------------------------------------


async def test_the_base_model_resolves_to_none(catalog, store) -> None:
    assert await catalog.resolve(BASE, ALICE) is None
    assert store.calls == []


async def test_a_known_adapter_resolves_without_store_traffic(catalog, store, publish) -> None:
    record = await publish("alice/a")
    await catalog.sync()
    store.calls.clear()
    for _ in range(3):
        assert await catalog.resolve("alice/a", ALICE) == record
    assert store.calls == []


async def test_an_adapter_published_since_the_last_poll_is_looked_up_then_cached(catalog, store, publish) -> None:
    await catalog.sync()
    record = await publish("alice/a")
    store.calls.clear()
    assert await catalog.resolve("alice/a", ALICE) == record
    assert store.calls == ["get_record alice/a"]
    assert await catalog.resolve("alice/a", ALICE) == record
    assert store.calls == ["get_record alice/a"]
    assert catalog.records() == [record]


async def test_an_adapter_nowhere_is_not_found_after_one_look_up(catalog, store) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        await catalog.resolve("alice/nothing", ALICE)
    assert caught.value.status == 404 and caught.value.param == "model"
    assert store.calls == ["get_record alice/nothing"]


@pytest.mark.parametrize(
    "model",
    [
        "",
        "Alice",  # a bare name means the caller's own namespace; it is checked all the same
        "alice/",
        "/coding",
        "alice/a/b",
        "alice/../bob",
        "../alice/coding",
        "alice/..",
        "alice/a..b",
        "alice/.hidden",
        "alice/-dash",
        "Alice/coding",
        "alice/Coding",
        "alice/co ding",
        " alice/coding",
        "alice/coding\n",
        "alice/cödïng",
        "alice/ｃｏｄｉｎｇ",  # fullwidth letters
        "alice/coding\x00",
        "alice\\coding",
        "alice/coding%2f..",
        "alice/" + "x" * 65,
    ],
)
async def test_a_name_that_could_not_exist_never_reaches_the_store(catalog, store, model: str) -> None:
    with pytest.raises(ModelNotFoundError):
        await catalog.resolve(model, ALICE)
    assert store.calls == []


async def test_store_down_during_a_look_up_raises_the_outage_and_remembers_nothing(catalog, store) -> None:
    """The outage reaches the HTTP layer, which answers 503 with Retry-After (test_api)."""
    store.down = True
    with pytest.raises(StoreUnavailableError):
        await catalog.resolve("alice/a", ALICE)
    assert store.calls == ["get_record alice/a"]
    store.down = False
    with pytest.raises(ModelNotFoundError):  # the store is asked again: the outage was not cached
        await catalog.resolve("alice/a", ALICE)
    assert store.calls == ["get_record alice/a", "get_record alice/a"]


# -- polling -------------------------------------------------------------------------------


async def test_polling_survives_failures_and_picks_up_a_new_adapter_within_an_interval(catalog, store, publish) -> None:
    interval = 0.1
    store.down = True
    polling = asyncio.create_task(catalog.poll_forever(interval))
    try:
        await until(lambda: store.calls.count("list_stamps") >= 2, timeout_s=2.0)  # failed, and tried again
        assert not polling.done()
        assert catalog.last_error is not None and not catalog.synced

        store.down = False
        await until(lambda: catalog.synced, timeout_s=2.0)
        record = await publish("alice/a")
        published_at = time.monotonic()
        await until(lambda: catalog.records() == [record], timeout_s=5 * interval)
        assert time.monotonic() - published_at <= 2 * interval  # one interval, plus scheduling slack
        assert catalog.last_error is None
    finally:
        polling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await polling
