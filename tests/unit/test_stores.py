"""One contract for every adapter store: the local folder and S3 (moto's real HTTP server)."""

from __future__ import annotations

import asyncio
import http.server
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from adapters_manifest.open_store import open_store
from adapters_manifest.publish import publish
from adapters_manifest.record import ADAPTER_FILES, CONFIG_FILE, WEIGHTS_FILE, AdapterRecord
from adapters_manifest.s3_store import S3Store
from adapters_manifest.store import AdapterStore, ProgressCallback, StoreAccessError, StoreUnavailableError
from gateway_tools.dev.s3_server import S3Server
from tests.unit.harness import ACCESS_KEY, BUCKET, SECRET, fresh_s3_url, make_adapter, use_aws_env

# `store` (tests/unit/conftest.py): each store kind in turn, the local folder and S3 on moto's server.


async def publish_new(store: AdapterStore, tmp_path: Path, owner: str, name: str, payload: bytes) -> AdapterRecord:
    folder = tmp_path / "src" / owner / name / uuid.uuid4().hex
    record = make_adapter(folder, owner, name, payload)
    return await publish(store, folder, record)


async def test_publish_then_read_back_byte_exact(store: AdapterStore, tmp_path: Path) -> None:
    big = os.urandom(9 << 20)  # over the 8 MB multipart threshold of S3 uploads
    alice = make_adapter(tmp_path / "alice", "alice", "chat", big)
    bob = make_adapter(tmp_path / "bob", "bob", "notes", b"small weights")
    sent: list[int] = []
    progress: ProgressCallback = sent.append
    await publish(store, tmp_path / "alice", alice, progress)
    await publish(store, tmp_path / "bob", bob)

    assert sum(sent) == sum(f.size for f in alice.files)
    assert set(await store.list_stamps()) == {"alice/chat", "bob/notes"}
    assert await store.get_record("alice", "chat") == alice
    assert await store.list_records() == [alice, bob]
    for record, folder in ((alice, tmp_path / "alice"), (bob, tmp_path / "bob")):
        for file_name in ADAPTER_FILES:
            dest = tmp_path / "fetched" / record.owner / file_name
            dest.parent.mkdir(parents=True, exist_ok=True)
            await store.fetch_file(record, file_name, dest)
            assert dest.read_bytes() == (folder / file_name).read_bytes()


async def test_empty_and_missing(store: AdapterStore, tmp_path: Path) -> None:
    assert await store.list_stamps() == {}
    assert await store.list_records() == []
    assert await store.get_record("alice", "nothing") is None
    record = make_adapter(tmp_path / "a")
    assert not await store.has_version(record)
    with pytest.raises(FileNotFoundError):
        await store.fetch_file(record, CONFIG_FILE, tmp_path / "out")


async def test_has_version(store: AdapterStore, tmp_path: Path) -> None:
    v1 = await publish_new(store, tmp_path, "alice", "chat", b"one")
    v2 = make_adapter(tmp_path / "v2", payload=b"two")
    assert await store.has_version(v1)
    assert not await store.has_version(v2)  # same adapter, other bytes: another version
    await store.put_file(v2, CONFIG_FILE, tmp_path / "v2" / CONFIG_FILE)
    assert not await store.has_version(v2)  # one file of two is not the version


async def test_stamp_changes_when_record_is_rewritten_and_not_otherwise(store: AdapterStore, tmp_path: Path) -> None:
    alice = await publish_new(store, tmp_path, "alice", "chat", b"a")
    await publish_new(store, tmp_path, "bob", "chat", b"b")
    before = await store.list_stamps()
    assert await store.list_stamps() == before  # nothing written: nothing changed

    await store.put_record(alice.model_copy(update={"description": "now with a description"}))
    after = await store.list_stamps()
    assert after["alice/chat"] != before["alice/chat"]
    assert after["bob/chat"] == before["bob/chat"]

    await publish_new(store, tmp_path, "alice", "chat", b"a new version")
    assert (await store.list_stamps())["alice/chat"] not in (before["alice/chat"], after["alice/chat"])


async def test_delete_adapter(store: AdapterStore, tmp_path: Path) -> None:
    chat = await publish_new(store, tmp_path, "alice", "chat", b"chat")
    old_chat = make_adapter(tmp_path / "old", payload=b"an older version")
    await publish(store, tmp_path / "old", old_chat)
    await publish_new(store, tmp_path, "alice", "chat", b"chat")  # back to `chat`'s bytes
    chat2 = await publish_new(store, tmp_path, "alice", "chat2", b"chat2")  # shares the name's start

    assert await store.delete_adapter("alice", "chat")
    assert await store.get_record("alice", "chat") is None
    assert set(await store.list_stamps()) == {"alice/chat2"}
    assert not await store.has_version(chat) and not await store.has_version(old_chat)  # every version
    with pytest.raises(FileNotFoundError):
        await store.fetch_file(chat, WEIGHTS_FILE, tmp_path / "out")
    assert await store.get_record("alice", "chat2") == chat2 and await store.has_version(chat2)

    assert not await store.delete_adapter("alice", "chat")
    assert not await store.delete_adapter("nobody", "nothing")


class OrderCheckingStore:
    """Passes calls through; at every write, checks what a concurrent reader would see."""

    def __init__(self, store: AdapterStore, visible_before: AdapterRecord | None) -> None:
        self.store = store
        self.visible_before = visible_before
        self.writes: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def put_file(self, record: AdapterRecord, file_name: str, source: Path, progress: Any = None) -> None:
        # While files go up, readers still see the previous record (or none).
        assert await self.store.get_record(record.owner, record.name) == self.visible_before
        assert (record.ref in await self.store.list_stamps()) == (self.visible_before is not None)
        self.writes.append(file_name)
        await self.store.put_file(record, file_name, source, progress)

    async def put_record(self, record: AdapterRecord, **conditions: Any) -> None:
        assert await self.store.has_version(record)  # every file is there before the commit point
        self.writes.append("record")
        await self.store.put_record(record, **conditions)


async def test_a_record_is_never_visible_before_its_files(store: AdapterStore, tmp_path: Path) -> None:
    v1 = make_adapter(tmp_path / "v1", payload=b"first")
    first = OrderCheckingStore(store, None)
    await publish(first, tmp_path / "v1", v1)  # type: ignore[arg-type]
    assert first.writes == [*ADAPTER_FILES, "record"]

    v2 = make_adapter(tmp_path / "v2", payload=b"second")
    second = OrderCheckingStore(store, v1)
    await publish(second, tmp_path / "v2", v2)  # type: ignore[arg-type]
    assert second.writes == [*ADAPTER_FILES, "record"]
    assert await store.get_record("alice", "chat") == v2


# -- S3 only -------------------------------------------------------------------------


async def timed(call: Awaitable[Any]) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        await call
    except BaseException as exc:  # noqa: BLE001 - the test looks at it
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


def assert_no_secret(message: str, store: S3Store) -> None:
    assert store.url in message
    assert SECRET not in message and ACCESS_KEY not in message and "@" not in message


async def test_s3_outage_is_reported_fast_and_passes(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_aws_env(monkeypatch, s3_server)
    store = S3Store.from_url(fresh_s3_url(), endpoint_url=s3_server.endpoint_url)
    record = await publish_new(store, tmp_path, "alice", "chat", b"weights")
    dest = tmp_path / "fetched"

    s3_server.stop()
    try:
        results = await asyncio.gather(
            timed(store.list_stamps()),
            timed(store.get_record("alice", "chat")),
            timed(store.fetch_file(record, WEIGHTS_FILE, dest)),
            timed(store.has_version(record)),
            timed(store.put_record(record)),
            timed(store.delete_adapter("alice", "chat")),
        )
    finally:
        s3_server.start()  # same port, same buckets: the session's other tests go on
    for exc, seconds in results:
        assert isinstance(exc, StoreUnavailableError), exc
        assert seconds < 5, f"took {seconds:.1f} s to notice the outage"
        assert_no_secret(str(exc), store)

    assert set(await store.list_stamps()) == {"alice/chat"}
    assert await store.get_record("alice", "chat") == record
    await store.fetch_file(record, WEIGHTS_FILE, dest)
    assert dest.read_bytes() == b"weights"


async def test_s3_missing_bucket_says_so(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    use_aws_env(monkeypatch, s3_server)
    store = S3Store.from_url("s3://no-such-bucket/prefix")
    for call in (store.list_stamps(), store.get_record("alice", "chat"), store.delete_adapter("alice", "chat")):
        with pytest.raises(StoreAccessError, match="bucket 'no-such-bucket' does not exist") as caught:
            await call
        assert_no_secret(str(caught.value), store)


def test_s3_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    use_aws_env(monkeypatch)
    assert S3Store.from_url("s3://bucket/a/b/").url == "s3://bucket/a/b"
    assert S3Store.from_url("s3://bucket").url == "s3://bucket"
    assert isinstance(open_store("s3://bucket/x"), S3Store)
    with pytest.raises(ValueError) as caught:
        S3Store.from_url(f"s3://{ACCESS_KEY}:{SECRET}@bucket/x")
    assert SECRET not in str(caught.value) and "credentials" in str(caught.value)
    with pytest.raises(ValueError, match="invalid bucket name"):
        S3Store.from_url("s3://ab/x")


async def test_s3_endpoint_user_info_stays_out_of_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    use_aws_env(monkeypatch)
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    store = S3Store("bucket", endpoint_url=f"http://user:{SECRET}@127.0.0.1:{port}", max_attempts=1)
    with pytest.raises(StoreUnavailableError) as caught:
        await store.list_stamps()
    assert "Could not connect" in str(caught.value) and f"127.0.0.1:{port}/bucket" in str(caught.value)
    assert SECRET not in str(caught.value)


class ErrorEndpoint(http.server.ThreadingHTTPServer):
    """An S3 endpoint on loopback that answers every request with one S3 error."""

    def __init__(self, status: int, code: str) -> None:
        body = f"<Error><Code>{code}</Code><Message>stub</Message></Error>".encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = answer

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.mark.parametrize("status, code", [(503, "SlowDown"), (500, "InternalError"), (503, "ServiceUnavailable")])
async def test_s3_server_errors_are_unavailable(
    status: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_aws_env(monkeypatch)
    endpoint = ErrorEndpoint(status, code)
    try:
        store = S3Store(BUCKET, "p", endpoint_url=endpoint.url, max_attempts=2)
        record = make_adapter(tmp_path / "a")
        results = await asyncio.gather(
            timed(store.list_stamps()),
            timed(store.get_record("alice", "chat")),
            timed(store.fetch_file(record, CONFIG_FILE, tmp_path / "x")),  # a small file: one GET
        )
        for exc, seconds in results:
            assert isinstance(exc, StoreUnavailableError) and not isinstance(exc, StoreAccessError), exc
            assert f"answered {status}" in str(exc) and seconds < 5
            assert_no_secret(str(exc), store)
    finally:
        endpoint.shutdown()
        endpoint.server_close()


async def test_s3_access_denied_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    use_aws_env(monkeypatch)
    endpoint = ErrorEndpoint(403, "AccessDenied")
    try:
        store = S3Store(BUCKET, "p", endpoint_url=endpoint.url)
        with pytest.raises(StoreAccessError, match="access denied") as caught:
            await store.list_stamps()
        assert_no_secret(str(caught.value), store)
    finally:
        endpoint.shutdown()
        endpoint.server_close()


async def test_s3_hung_endpoint_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    use_aws_env(monkeypatch)
    with socket.socket() as silent:  # the kernel accepts connections; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        store = S3Store(BUCKET, "p", endpoint_url=endpoint, read_timeout_s=0.3, max_attempts=2)
        exc, seconds = await timed(store.list_stamps())
    assert isinstance(exc, StoreUnavailableError) and "timeout" in str(exc).lower(), exc
    assert seconds < 3
