"""Hostile adapters uploaded to the real app (fake engine): each is refused with a message naming
the problem, and no upload, however built, stalls the event loop that serves every tenant."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load_file, save_file

from adapters_manifest import cli as adapters_cli
from adapters_manifest.record import CONFIG_FILE, WEIGHTS_FILE
from gateway.app_keys import STORE, UPLOADS
from gateway.auth.keys import add_key
from tests.fakes import FakeEngine, write_adapter_dir
from tests.unit.harness import MAX_MODEL_LEN, Gateway, StartGateway, adapter_form, assert_error, read_response, until

# Generous for 2 shared cores; the stalls this guards against were 2.8 s and 7.7 s.
HEALTHZ_BOUND_S = 1.0


def long_shape_weights(folder: Path, header_bytes: int) -> Path:
    """A weights file whose one tensor has a shape of ~header_bytes / 6 dims of 99999: the
    product of the dims is a huge integer, computed under the GIL by a naive validator."""
    dims = header_bytes // 6
    header = {"base_model.model.x.lora_A.weight": {"dtype": "F32", "shape": [99999] * dims, "data_offsets": [0, 0]}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    (folder / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(raw)) + raw)
    return folder


async def worst_healthz_while(gw: Gateway, work: asyncio.Task[Any], every_s: float = 0.02) -> float:
    """The longest wait for a /healthz answer while `work` runs, probed every `every_s`: from when
    a probe was due to its answer (a blocked loop delays both the probe and its answer)."""
    worst = 0.0
    while not work.done():
        due = time.monotonic() + every_s
        await asyncio.sleep(every_s)
        resp = await gw.client.get("/healthz")
        assert resp.status == 200
        worst = max(worst, time.monotonic() - due)
    return worst


@pytest.mark.parametrize("header_kib", [600, 1200])
async def test_a_tensor_shape_built_to_stall_validation_is_refused_and_healthz_stays_responsive(
    start_gateway: StartGateway, tmp_path: Path, header_kib: int
) -> None:
    gw = await start_gateway(max_adapter_header_bytes=4 << 20)  # headers this long get to the shape check
    folder = long_shape_weights(write_adapter_dir(tmp_path / "hostile"), header_kib * 1000)
    upload = asyncio.create_task(gw.client.post("/v1/adapters", data=adapter_form(folder, "hostile")))
    worst = await worst_healthz_while(gw, upload)
    print(f"\nheader {header_kib} KB: worst /healthz {worst:.3f} s")
    error = await assert_error(await upload, 400, param="files", code="invalid_adapter")
    assert "base_model.model.x.lora_A.weight" in error["message"] and "dimensions" in error["message"]
    assert len(error["message"]) < 500  # the shape itself is not echoed back
    assert worst < HEALTHZ_BOUND_S


async def test_a_safetensors_header_over_its_limit_is_refused_before_it_is_parsed(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gw = await start_gateway(max_adapter_header_bytes=64 << 10)
    folder = write_adapter_dir(tmp_path / "big-header")
    header = {"__metadata__": {"padding": "x" * (100 << 10)}}
    raw = json.dumps(header).encode()
    (folder / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(raw)) + raw)
    error = await assert_error(
        await gw.client.post("/v1/adapters", data=adapter_form(folder, "hostile")),
        400,
        param="files",
        code="invalid_adapter",
    )
    assert f"exceeds the {64 << 10}-byte limit" in error["message"]


# -- upload parts: each part's limit applies while it streams in -------------------------------


async def test_a_config_part_over_its_limit_is_413_before_the_rest_of_the_upload_is_sent(gw: Gateway) -> None:
    """The body announces 512 MiB; 256 KiB of adapter_config.json are sent and then nothing: the
    gateway must answer from the config's 64 KiB limit, not wait for (or store) the rest."""
    boundary = "b" * 16
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="{CONFIG_FILE}"; filename="{CONFIG_FILE}"\r\n\r\n'
    ).encode()
    reader, writer = await asyncio.open_connection(gw.client.host, gw.client.port)
    try:
        writer.write(
            b"POST /v1/adapters HTTP/1.1\r\nHost: test\r\n"
            + f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {512 << 20}\r\n\r\n".encode()
            + head
            + b" " * (256 << 10)
        )
        await writer.drain()
        status, _, body = await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()
    assert status == 413, body
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large"
    assert CONFIG_FILE in error["message"] and str(64 << 10) in error["message"]
    assert await gw.store.get_record("dev", "big") is None


async def test_a_weights_part_over_its_limit_is_413_naming_the_file(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gw = await start_gateway(max_adapter_bytes=4096)
    folder = write_adapter_dir(tmp_path / "big", rank=16, hidden=64)
    error = await assert_error(await gw.client.post("/v1/adapters", data=adapter_form(folder, "hostile")), 413)
    assert WEIGHTS_FILE in error["message"] and "4096" in error["message"]


# -- tensor values: read, not only the header --------------------------------------------------


def poison(folder: Path, value: float) -> str:
    """Put `value` into one tensor of the adapter; returns that tensor's name."""
    tensors = load_file(str(folder / WEIGHTS_FILE))
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = value
    save_file(tensors, str(folder / WEIGHTS_FILE))
    return name


@pytest.mark.parametrize(("value", "said"), [(float("nan"), "NaN"), (float("inf"), "infinity")])
async def test_an_upload_whose_weights_hold_nan_or_inf_is_refused_naming_the_tensor(
    gw: Gateway, tmp_path: Path, value: float, said: str
) -> None:
    folder = write_adapter_dir(tmp_path / "poisoned")
    name = poison(folder, value)
    error = await assert_error(
        await gw.client.post("/v1/adapters", data=adapter_form(folder, "hostile")),
        400,
        param="files",
        code="invalid_adapter",
    )
    assert f"tensor {name} holds {said}" in error["message"]
    assert await gw.store.get_record("dev", "hostile") is None


def test_the_cli_refuses_weights_holding_nan_naming_the_tensor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_adapter_dir(tmp_path / "poisoned")
    name = poison(folder, float("nan"))
    store = tmp_path / "store"
    argv = ["push", str(folder), "--store", str(store), "--owner", "alice", "--name", "nan"]
    assert adapters_cli.main(argv) == 2
    assert f"tensor {name} holds NaN" in capsys.readouterr().err
    assert not (store / "manifest").exists()


# -- uploads in progress -------------------------------------------------------------------------


async def start_a_slow_upload(gw: Gateway, key: str) -> asyncio.StreamWriter:
    """An upload whose body is still arriving (its headers sent, a little of its body)."""
    _, writer = await asyncio.open_connection(gw.client.host, gw.client.port)
    writer.write(
        f"POST /v1/adapters HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: multipart/form-data; boundary=bbbb\r\nContent-Length: {1 << 20}\r\n\r\n--bbbb\r\n".encode()
    )
    await writer.drain()
    return writer


async def test_uploads_in_progress_are_bounded_per_user_and_in_all(start_gateway: StartGateway, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    keys = {user: add_key(keys_file, user)[0] for user in ("alice", "bob", "carol")}
    gw = await start_gateway(keys_file=keys_file, max_uploads_per_user=1, max_concurrent_uploads=2)

    def post(user: str) -> Any:
        form = adapter_form(write_adapter_dir(tmp_path / f"{user}-{time.monotonic_ns()}"), name="x")
        return gw.client.post("/v1/adapters", data=form, headers={"Authorization": f"Bearer {keys[user]}"})

    alice = await start_a_slow_upload(gw, keys["alice"])
    try:
        await until(lambda: gw.app[UPLOADS]._receiving == 1)
        resp = await post("alice")
        error = await assert_error(resp, 429, code="rate_limit_exceeded")
        assert "alice" in error["message"] and "Retry-After" in resp.headers
        bob = await start_a_slow_upload(gw, keys["bob"])
        try:
            await until(lambda: gw.app[UPLOADS]._receiving == 2)
            await assert_error(await post("carol"), 429, code="rate_limit_exceeded")  # two in all
        finally:
            bob.close()
    finally:
        alice.close()
    await until(lambda: gw.app[UPLOADS]._receiving == 0)
    assert (await post("alice")).status == 201


# -- republishing ------------------------------------------------------------------------------


async def test_a_version_published_again_while_the_engine_still_removes_it_is_served(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """v1 served, replaced by v2 (v1's removal from the engine takes a while), then v1's bytes
    published again: the request is served by v1, and the engine never saw it added twice (the
    fake engine's check, at the end of every test)."""
    gw = await start_gateway(FakeEngine(max_model_len=MAX_MODEL_LEN, remove_delay_s=0.5))
    v1 = write_adapter_dir(tmp_path / "v1", payload=b"one")
    v2 = write_adapter_dir(tmp_path / "v2", payload=b"two")

    async def publish_and_ask(folder: Path) -> str:
        resp = await gw.client.post("/v1/adapters", data=adapter_form(folder, name="flip"))
        assert resp.status == 201, await resp.text()
        version = (await resp.json())["version"]
        resp = await gw.post("/v1/completions", {"model": "dev/flip", "prompt": "x", "max_tokens": 1})
        assert resp.status == 200, await resp.text()
        assert f"dev/flip@{version}" in (await resp.json())["choices"][0]["text"]
        return version

    first = await publish_and_ask(v1)
    await publish_and_ask(v2)  # v1 retired: its removal is under way
    assert await publish_and_ask(v1) == first
    gw.engine.check()


async def test_a_delete_racing_an_upload_never_leaves_a_record_that_fails_every_request(
    gw: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload's files are stored, its record not yet; a delete runs to the end meanwhile."""
    assert (
        await gw.client.post("/v1/adapters", data=adapter_form(write_adapter_dir(tmp_path / "v1"), "race"))
    ).status == 201
    store, reached, release = gw.app[STORE], asyncio.Event(), asyncio.Event()
    commit = store.put_record

    async def held_commit(record: Any, **conditions: Any) -> None:
        reached.set()
        await release.wait()
        await commit(record, **conditions)

    monkeypatch.setattr(store, "put_record", held_commit)
    v2 = write_adapter_dir(tmp_path / "v2", payload=b"v2")
    uploading = asyncio.create_task(gw.client.post("/v1/adapters", data=adapter_form(v2, "race")))
    await asyncio.wait_for(reached.wait(), 10)
    assert (await gw.client.delete("/v1/adapters/dev/race")).status == 200
    release.set()
    assert (await uploading).status == 201
    resp = await gw.post("/v1/completions", {"model": "dev/race", "prompt": "x", "max_tokens": 1})
    assert resp.status == 200, await resp.text()  # was 422, with a file path, for 60 s


async def test_a_header_at_its_limit_of_many_tensors_keeps_healthz_responsive(gw: Gateway, tmp_path: Path) -> None:
    """The largest header accepted (1 MiB), every byte of it tensors to parse and tile."""
    folder = write_adapter_dir(tmp_path / "many")
    header, offset, n, size = {}, 0, 0, 2
    while size < (1 << 20) - 200:
        name = f"base_model.model.model.layers.{n}.self_attn.q_proj.lora_A.weight"
        header[name] = {"dtype": "F32", "shape": [1, 1], "data_offsets": [offset, offset + 4]}
        size += len(json.dumps({name: header[name]}))
        offset, n = offset + 4, n + 1
    raw = json.dumps(header).encode()
    assert len(raw) <= 1 << 20
    (folder / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    upload = asyncio.create_task(gw.client.post("/v1/adapters", data=adapter_form(folder, "hostile")))
    worst = await worst_healthz_while(gw, upload)
    print(f"\n{n} tensors in a {len(raw)}-byte header: worst /healthz {worst:.3f} s")
    await assert_error(await upload, 400, param="files", code="invalid_adapter")
    assert worst < HEALTHZ_BOUND_S
