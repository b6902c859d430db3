"""A broken adapter in the store fails its own requests with a clear JSON error; the engine serves on."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import openai
import pytest
from safetensors.numpy import load_file, save_file

from adapters_manifest import layout
from adapters_manifest.local_store import LocalFolderStore
from adapters_manifest.publish import publish, record_for
from gateway_tools.dev.models import DevModel
from gateway_tools.dev.oracle import ReferenceModel
from gateway_tools.dev.tiny_model import BASE_MODEL_NAME
from tests.e2e.conftest import adapter_dir, complete_ids, record_of

pytestmark = pytest.mark.e2e

WEIGHTS = "adapter_model.safetensors"


def truncate_weights(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def header_not_json(folder: Path) -> None:
    (folder / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")


def wrong_output_shape(folder: Path) -> None:
    tensors = load_file(folder / WEIGHTS)
    save_file(
        {k: np.zeros((77, v.shape[1]), np.float32) if "lora_B" in k else v for k, v in tensors.items()},
        folder / WEIGHTS,
    )


def wrong_input_shape(folder: Path) -> None:
    """vLLM itself loads this one without complaint and serves something: validation must catch it."""
    tensors = load_file(folder / WEIGHTS)
    save_file(
        {k: np.zeros((v.shape[0], 64), np.float32) if "lora_A" in k else v for k, v in tensors.items()},
        folder / WEIGHTS,
    )


def rank_above_the_engines_limit(folder: Path) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = 64
    (folder / "adapter_config.json").write_text(json.dumps(config))


# Placed straight into the store, as if written to S3 by hand: the gateway checks before loading.
BREAKAGES = {
    "truncated": (truncate_weights, "the file is truncated"),
    "not-json": (header_not_json, "header is not valid JSON"),
    "bad-out-shape": (wrong_output_shape, "has shape [77, 8], expected [128, 8]"),
    "bad-in-shape": (wrong_input_shape, "has shape [8, 64], expected [8, 128]"),
    "rank-64": (rank_above_the_engines_limit, "rank 64 exceeds max_lora_rank 8"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_broken_adapter_gets_an_error_and_others_keep_serving(
    breakage: str, client: openai.OpenAI, tiny: DevModel, oracle: ReferenceModel, tmp_path: Path
) -> None:
    break_it, reason = BREAKAGES[breakage]
    folder = tmp_path / breakage
    shutil.copytree(tiny.store / layout.version_prefix(record_of(tiny, "alice/chat")), folder)
    break_it(folder)
    record = record_for(folder, "mallory", breakage, base_model=BASE_MODEL_NAME)
    asyncio.run(publish(LocalFolderStore(tiny.store), folder, record))

    for _ in range(2):  # the second answer comes from the remembered failure, without a reload
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            client.completions.create(model=f"mallory/{breakage}", prompt="x = ", max_tokens=4)
        assert caught.value.body["code"] == "adapter_load_failed"
        assert reason in caught.value.body["message"]

    prompt = "def parse(value):"
    for model in (BASE_MODEL_NAME, "bob/chat"):
        expected = oracle.greedy_ids(adapter_dir(tiny, model), oracle.prompt_ids(prompt), 8)
        assert complete_ids(client, model, prompt, 8) == expected
