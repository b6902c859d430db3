"""`lora-gateway adapters push` without a base folder checks what the gateway on the same store
will check: the gateway publishes its base's module shapes and limits there at start."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from adapters_manifest import cli as adapters_cli
from adapters_manifest.local_store import LocalFolderStore
from adapters_manifest.published_base import PublishedBase
from tests.fakes import write_adapter_dir
from tests.unit.harness import BASE, Gateway


async def published(store: LocalFolderStore, timeout_s: float = 10.0) -> PublishedBase:
    deadline = time.monotonic() + timeout_s
    while (data := await store.get_base(BASE)) is None:
        assert time.monotonic() < deadline, "the gateway never published its base"
        await asyncio.sleep(0.01)
    return PublishedBase.model_validate_json(data)


async def push(store: LocalFolderStore, folder: Path, name: str, *extra: str) -> int:
    argv = ["push", str(folder), "--store", str(store.root), "--owner", "carol", "--name", name, *extra]
    return await asyncio.to_thread(adapters_cli.main, argv)  # the CLI runs its own event loop


async def test_the_gateway_publishes_its_base_shapes_and_limits(gw: Gateway) -> None:
    base = await published(gw.store)
    assert base.base_model == BASE
    assert base.module_shapes["model.layers.0.self_attn.q_proj"] == (8, 8)
    assert base.max_lora_rank == 16 and base.max_config_bytes == 64 << 10
    assert await gw.store.list_bases() == [BASE]


@pytest.mark.parametrize(
    ("adapter", "refusal"),
    [
        ({"hidden": 16}, "base module model.layers.0.self_attn.q_proj has out_features 8, in_features 8"),
        ({"target_modules": ("gate_proj",)}, "target module 'gate_proj' is not in the base model"),
        ({"rank": 32}, "rank 32 exceeds max_lora_rank 16"),
    ],
    ids=["wrong shapes", "unknown module", "rank over the max"],
)
async def test_push_refuses_what_the_gateway_would_saying_which_base_it_checked_against(
    gw: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str], adapter: dict, refusal: str
) -> None:
    await published(gw.store)
    folder = write_adapter_dir(tmp_path / "bad", **adapter)
    assert await push(gw.store, folder, "bad") == 2
    err = capsys.readouterr().err
    assert refusal in err
    assert f"checked against base {BASE} as its gateway published it to {gw.store.url}" in err
    assert await gw.store.get_record("carol", "bad") is None


async def test_a_pushed_adapter_that_fits_is_served(gw: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    await published(gw.store)
    assert await push(gw.store, write_adapter_dir(tmp_path / "good"), "good") == 0
    assert f"checked against base {BASE}" in capsys.readouterr().err
    record = await gw.store.get_record("carol", "good")
    assert record is not None and record.base_model == BASE
    resp = await gw.post("/v1/completions", {"model": "carol/good", "prompt": "hi", "max_tokens": 2})
    assert resp.status == 200, await resp.text()


async def test_without_a_published_base_push_says_it_checked_the_structure_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = LocalFolderStore(tmp_path / "empty-store")
    folder = write_adapter_dir(tmp_path / "any", hidden=16)
    (folder / "adapter_config.json").write_text(
        json.dumps({**json.loads((folder / "adapter_config.json").read_text()), "base_model_name_or_path": "x/y"})
    )
    assert await push(store, folder, "any") == 0
    assert "warning: no gateway published base 'y'" in capsys.readouterr().err
