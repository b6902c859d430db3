"""Upload over HTTP: validated, stored, served at once by the same gateway; a new version
replaces the old without a restart; delete stops serving."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import requests

from adapters_manifest.record import ADAPTER_FILES
from gateway_tools.dev.models import DevModel
from gateway_tools.dev.oracle import ReferenceModel
from gateway_tools.dev.process import ServerProcess
from tests.e2e.conftest import Keys, adapter_dir, client_for, complete_ids

pytestmark = pytest.mark.e2e

PROMPT = "def parse(value):"


def upload(gateway: ServerProcess, key: str, folder: Path, name: str, **fields: str) -> requests.Response:
    """As the key's user: the adapter goes into their own namespace."""
    files = {f: (f, (folder / f).read_bytes()) for f in ADAPTER_FILES}
    return requests.post(
        gateway.base_url + "/v1/adapters", data={"name": name, **fields}, files=files, headers=bearer(key), timeout=60
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_upload_serve_replace_delete(
    gateway: ServerProcess, keys: Keys, tiny: DevModel, oracle: ReferenceModel
) -> None:
    uma = keys.by_user["uma"]
    client = client_for(gateway, uma)
    alice_files, bob_files = adapter_dir(tiny, "alice/chat"), adapter_dir(tiny, "bob/chat")
    created = upload(gateway, uma, alice_files, "style", description="first")
    assert created.status_code == 201, created.text
    first = created.json()
    assert (first["id"], first["description"], first["visibility"]) == ("uma/style", "first", "private")
    assert complete_ids(client, "uma/style", PROMPT, 8) == oracle.greedy_ids(alice_files, oracle.prompt_ids(PROMPT), 8)
    assert "uma/style" in {m.id for m in client.models.list()}

    replaced = upload(gateway, uma, bob_files, "style")
    assert replaced.status_code == 201, replaced.text
    assert replaced.json()["version"] != first["version"]
    # The next request already gets the new version: no restart, no sync wait.
    assert complete_ids(client, "uma/style", PROMPT, 8) == oracle.greedy_ids(bob_files, oracle.prompt_ids(PROMPT), 8)
    shown = requests.get(gateway.base_url + "/v1/adapters/uma/style", headers=bearer(uma), timeout=10).json()
    assert shown["version"] == replaced.json()["version"]

    deleted = requests.delete(gateway.base_url + "/v1/adapters/uma/style", headers=bearer(uma), timeout=10)
    assert deleted.json() == {"id": "uma/style", "object": "adapter", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="uma/style", prompt=PROMPT, max_tokens=4)
    assert requests.get(gateway.base_url + "/v1/adapters/uma/style", headers=bearer(uma), timeout=10).status_code == 404


def test_bad_upload_is_refused_and_nothing_is_stored(
    gateway: ServerProcess, keys: Keys, tiny: DevModel, tmp_path: Path
) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    source = adapter_dir(tiny, "alice/chat")
    (folder / "adapter_config.json").write_text(
        (source / "adapter_config.json").read_text().replace('"r": 8', '"r": 64')
    )
    (folder / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    refused = upload(gateway, keys.by_user["uma"], folder, "too-big")
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "invalid_adapter"
    assert "rank 64 exceeds max_lora_rank 8" in refused.json()["error"]["message"]
    assert not (tiny.store / "manifest" / "uma" / "too-big.json").exists()

    pickle = requests.post(
        gateway.base_url + "/v1/adapters",
        data={"name": "pickled"},
        files={"adapter_model.bin": ("adapter_model.bin", b"\x80\x04not really")},
        headers=bearer(keys.by_user["uma"]),
        timeout=10,
    )
    assert pickle.status_code == 400
    assert "pickle" in pickle.json()["error"]["message"]
