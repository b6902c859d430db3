"""The unit tests' harness: the real app on the fake engine (tests/fakes.py), and the helpers the
test files share. The fixtures built on it (`start_gateway`, `gw`, `store`, ambient settings) are in
tests/unit/conftest.py; a test module imports plain names from here, never from another test module.

- constants: `BASE` (the served base model), `MAX_MODEL_LEN`, `ADAPTERS` (published by default)
- the app: `gateway_settings` (ServeSettings for a test), `gateway_app` (create_app on a fake engine),
  `wait_ready` (poll /readyz), `Gateway` and `StartGateway` (what `start_gateway` gives)
- requests and answers: `completion`, `chat` (with `MESSAGES`), `response`, `chatml`, `assert_error`,
  `sse_events`, `raw_http`, `read_response`, `adapter_form`
- tenants and the store an app uses: `ADMIN`, `EXTRA_ADAPTERS`, `publish_extra`, `StoreCalls`,
  `watch_store` (`STORE_READS`, `STORE_WRITES`)
- stores without an app: `use_aws_env`, `fresh_s3_url`, `make_adapter` (`BUCKET`, `SECRET`, `ACCESS_KEY`)
- metrics: `Samples`, `parse`, `LORA_INFO`
- waiting: `until`, `ENGINE_START_TIMEOUT_S`
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, FormData, web
from aiohttp.test_utils import TestClient
from opentelemetry.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families

from adapters_manifest.local_store import LocalFolderStore
from adapters_manifest.publish import record_for
from adapters_manifest.record import ADAPTER_FILES, CONFIG_FILE, WEIGHTS_FILE, AdapterRecord
from adapters_manifest.store import AdapterStore
from gateway.app import create_app
from gateway.app_keys import STORE
from gateway.engine.interface import Engine
from gateway.pool import AdapterPool
from gateway.routing.encoder import SentenceEncoder
from gateway.settings import ServeSettings
from gateway_tools.dev.s3_server import S3Server
from tests.fakes import FakeEncoder, FakeEngine, publish_adapter, write_base_model

BASE = "fake-base"  # the served name of the base model
MAX_MODEL_LEN = 256  # the fake engine's context, unless a test sizes its own
ADAPTERS = ("alice/coding", "bob/poems")  # what `start_gateway` publishes unless told otherwise

# The first fake engine of a test process builds vLLM's config and tokenizer: many seconds on a busy host.
ENGINE_START_TIMEOUT_S = 60.0


# -- waiting -------------------------------------------------------------------------------------


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll `condition` up to a generous bound: waiting without depending on the machine's speed."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# -- the app -------------------------------------------------------------------------------------


def gateway_settings(tmp_path: Path, store: AdapterStore | None = None, **settings: Any) -> ServeSettings:
    """A gateway's settings for a test: a base model written under `tmp_path`, served as BASE, on
    `store` (default: a local folder store under `tmp_path`); no ambient .env file. Without
    authentication unless the settings choose a way (a keys file or a trusted proxy header): most
    tests are about serving; tests/unit/test_tenants.py covers authentication."""
    store = store or LocalFolderStore(tmp_path / "store")
    authenticated = {"keys_file", "trusted_user_header"} & set(settings)
    return ServeSettings(
        _env_file=None,
        model=write_base_model(tmp_path / "base"),
        store=str(store.root) if isinstance(store, LocalFolderStore) else store.url,
        served_model_name=BASE,
        **{"insecure_no_auth": not authenticated, **settings},
    )


def gateway_app(
    settings: ServeSettings,
    engine: FakeEngine,
    *,
    factory: Callable[[ServeSettings], Engine] | None = None,
    encoder: SentenceEncoder | None = None,
    tracer_provider: TracerProvider | None = None,
) -> web.Application:
    """The real app, its engine started by `factory` (default: `engine` sized by the settings) and
    routes embedded by `encoder` (default: a FakeEncoder)."""
    return create_app(
        settings,
        engine_factory=factory or engine.started_with,
        encoder_factory=lambda settings: encoder or FakeEncoder(),
        tracer_provider=tracer_provider,
    )


async def wait_ready(client: Any, timeout_s: float = ENGINE_START_TIMEOUT_S) -> None:
    """Poll /readyz until it answers 200; fail at once if the engine failed to start. `client`: a
    TestClient, or an aiohttp ClientSession with a base_url."""
    deadline = time.monotonic() + timeout_s
    while (resp := await client.get("/readyz")).status != 200:
        text = await resp.text()
        assert time.monotonic() < deadline and "engine failed" not in text, text
        await asyncio.sleep(0.005)


@dataclass
class Gateway:
    """A started app, as `start_gateway` gives it."""

    client: TestClient
    app: web.Application
    engine: FakeEngine
    store: LocalFolderStore  # any AdapterStore when the test gave one
    records: dict[str, AdapterRecord]  # what was published before the start, by ref
    scratch: Path

    def decode(self, token_ids: list[int]) -> str:
        return self.engine.client.get_tokenizer().decode(token_ids)

    def label(self, model: str) -> str:
        """The engine name the fake engine puts in the text it generates for `model`."""
        return "__base__" if model == BASE else self.records[model].versioned_ref

    async def post(self, path: str, body: Any) -> ClientResponse:
        return await self.client.post(path, json=body)

    async def wait_ready(self, timeout_s: float = ENGINE_START_TIMEOUT_S) -> None:
        await wait_ready(self.client, timeout_s)


# start_gateway(engine=None, *, factory=None, encoder=None, tracer_provider=None, store=None,
#               adapters=ADAPTERS, ready=True, **settings) -> Gateway; see tests/unit/conftest.py.
StartGateway = Callable[..., Awaitable[Gateway]]


# -- requests and answers ------------------------------------------------------------------------


def completion(model: str = BASE, prompt: Any = "Hello", **fields: Any) -> dict[str, Any]:
    """A /v1/completions body."""
    return {"model": model, "prompt": prompt, "max_tokens": 3, **fields}


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def chat(model: str = BASE, messages: list[dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    """A /v1/chat/completions body."""
    return {"model": model, "messages": MESSAGES if messages is None else messages, "max_tokens": 3, **fields}


def response(model: str, text: str = "Hello") -> dict[str, Any]:
    """A Responses API request body."""
    return {"model": model, "input": text, "max_output_tokens": 3}


def chatml(messages: list[dict[str, str]]) -> str:
    """A conversation as the tiny model's chat template renders it, with the assistant's turn."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


async def assert_error(resp: ClientResponse, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape, as JSON, with the given status; returns the `error` object."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


async def sse_events(resp: ClientResponse) -> list[dict[str, Any]]:
    """The JSON events of an SSE body; asserts the framing and the closing `data: [DONE]`."""
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "text/event-stream"
    text = await resp.text()
    assert text.endswith("\n\n")
    blocks = text.split("\n\n")[:-1]
    assert blocks[-1] == "data: [DONE]"
    events = []
    for block in blocks[:-1]:
        assert block.startswith("data: "), block
        assert "\n" not in block, block
        events.append(json.loads(block.removeprefix("data: ")))
    return events


async def raw_http(
    gw: Gateway, request_line: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Send a request exactly as written (clients normalise paths): (status, headers, body)."""
    reader, writer = await asyncio.open_connection(gw.client.host, gw.client.port)
    head = request_line + b"\r\nHost: test\r\nConnection: close\r\n"
    head += b"".join(f"{k}: {v}\r\n".encode() for k, v in (headers or {}).items())
    writer.write(head + b"\r\n")
    data = await reader.read()
    writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    header_block, _, body = rest.partition(b"\r\n\r\n")
    response_headers = dict(line.decode().split(": ", 1) for line in header_block.split(b"\r\n") if line)
    return int(status_line.split()[1]), response_headers, body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response with a Content-Length off a raw connection: (status, lower-cased headers, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines if line)}
    body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


def adapter_form(folder: Path, name: str, **fields: str) -> FormData:
    """A POST /v1/adapters form: `name`, then `fields` in order, then the adapter's files from `folder`."""
    form = FormData()
    for key, value in {"name": name, **fields}.items():
        form.add_field(key, value)
    for file_name in ADAPTER_FILES:
        form.add_field(file_name, (folder / file_name).read_bytes(), filename=file_name)
    return form


# -- tenants, and the store an app uses ----------------------------------------------------------

ADMIN = "root"  # the admin's user name where tests make keys
# Published before a tenants' gateway starts, besides ADAPTERS (alice/coding and bob/poems, private).
EXTRA_ADAPTERS = {"alice/x": "private", "bob/chat": "private", "bob/pub": "public"}
STORE_READS = ("list_stamps", "get_record", "list_records", "fetch_file", "has_version")
STORE_WRITES = ("put_file", "put_record", "delete_adapter")


async def publish_extra(tmp_path: Path) -> dict[str, AdapterRecord]:
    """EXTRA_ADAPTERS, published into the store `start_gateway` will use."""
    store = LocalFolderStore(tmp_path / "store")
    records = {}
    for ref, visibility in EXTRA_ADAPTERS.items():
        owner, name = ref.split("/")
        records[ref] = await publish_adapter(store, tmp_path, owner, name, base_model=BASE, visibility=visibility)
    return records


@dataclass
class StoreCalls:
    """Every call the app makes to its adapter store, with its arguments."""

    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    def since(self, mark: int) -> list[tuple[str, tuple[Any, ...]]]:
        return self.calls[mark:]


def watch_store(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> StoreCalls:
    """Record every read and write the app makes to its store from now on."""
    store, log = gw.app[STORE], StoreCalls()
    for method in STORE_READS + STORE_WRITES:
        original = getattr(store, method)

        def wrapper(*args: Any, _method: str = method, _original: Any = original, **kwargs: Any) -> Any:
            log.calls.append((_method, args))
            return _original(*args, **kwargs)

        monkeypatch.setattr(store, method, wrapper)
    return log


# -- stores without an app (the contract every store keeps) --------------------------------------

BUCKET = "lora-tests"
SECRET = "s3cr3t-do-not-log-0x5eed"  # moto checks no signatures: any value works
ACCESS_KEY = "AKIATESTSTORECONTRACT"


def use_aws_env(monkeypatch: pytest.MonkeyPatch, server: S3Server | None = None) -> None:
    """The standard AWS settings a gateway would get (pointing at `server`, if any), with a
    secret we can look for in messages."""
    env = {"AWS_DEFAULT_REGION": "us-east-1", **(server.client_env() if server else {})}
    for key, value in {**env, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET}.items():
        monkeypatch.setenv(key, value)
    if server is not None:
        server.create_bucket(BUCKET)


def fresh_s3_url() -> str:
    return f"s3://{BUCKET}/runs/{uuid.uuid4().hex[:12]}"  # every test its own prefix


def make_adapter(folder: Path, owner: str = "alice", name: str = "chat", payload: bytes = b"weights") -> AdapterRecord:
    """A PEFT-shaped folder whose weights file is exactly `payload` (stores never parse it)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    (folder / WEIGHTS_FILE).write_bytes(payload)
    return record_for(folder, owner, name, base_model="tiny-base")


# -- metrics -------------------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
LORA_INFO = "lora_gateway:lora_requests_info"


def parse(text: str) -> Samples:
    """A /metrics page: (name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# -- the tiers' parts -------------------------------------------------------------------------


class FakeFiles:
    """The disk tier: a folder per version, with pins counted."""

    def __init__(self) -> None:
        self.pins: dict[str, int] = {}

    async def pin(self, record: AdapterRecord) -> Path:
        self.pins[record.versioned_ref] = self.pins.get(record.versioned_ref, 0) + 1
        return Path("/adapters") / record.versioned_ref

    def unpin(self, record: AdapterRecord) -> None:
        assert self.pins.get(record.versioned_ref, 0) > 0, f"unpin without pin: {record.versioned_ref}"
        self.pins[record.versioned_ref] -= 1

    def is_cached(self, record: AdapterRecord) -> bool:
        return record.versioned_ref in self.pins  # pinned before: on disk since


def hold_until(pool: AdapterPool, record: AdapterRecord, done: asyncio.Event) -> asyncio.Task[None]:
    """A request holding `record`'s adapter until `done` is set (a long generation, say)."""

    async def request() -> None:
        async with pool.acquire(record):
            await done.wait()

    return asyncio.create_task(request())


def holders(pool: AdapterPool) -> dict[str, int]:
    return {r.name: r.holders for r in pool.resident()}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now
