"""The real thing: a tiny model made offline, the gateway as a child process on real vLLM (CPU)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from adapters_manifest import layout
from adapters_manifest.record import AdapterRecord
from gateway.auth.keys import add_key
from gateway_tools.dev.models import DevModel, make_model
from gateway_tools.dev.oracle import ReferenceModel
from gateway_tools.dev.process import ServerProcess, free_port, gateway_command

ADAPTERS = ["alice/chat", "bob/chat", "carol/chat", "dave/notes", "erin/notes", "frank/notes"]
ENGINE = {"dtype": "float32", "max_lora_rank": 8}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> DevModel:
    return make_model(tmp_path_factory.mktemp("tiny"), ADAPTERS)


@pytest.fixture(scope="session")
def oracle(tiny: DevModel) -> ReferenceModel:
    return ReferenceModel(tiny.base)


def adapter_dir(tiny: DevModel, ref: str) -> Path | None:
    """The files of an adapter as the store holds them; None for the base model."""
    if ref == tiny.served_name:
        return None
    record = next(r for r in tiny.adapters if r.ref == ref)
    return tiny.store / layout.version_prefix(record)


USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "mallory", "sam", "uma"]
ADMIN = "root"


@dataclass(frozen=True)
class Keys:
    file: Path
    by_user: dict[str, str]  # user -> API key; ADMIN's key is an admin's


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    by_user = {user: add_key(path, user)[0] for user in USERS}
    by_user[ADMIN] = add_key(path, ADMIN, admin=True)[0]
    return Keys(path, by_user)


def start_gateway(model: DevModel, keys: Keys, logs: Path, **flags: object) -> ServerProcess:
    port = free_port()
    command = gateway_command(
        model.base, model.store, port, served_model_name=model.served_name, **ENGINE, keys_file=keys.file, **flags
    )
    return ServerProcess(command, port, logs / f"gateway-{port}.log").start()


@pytest.fixture(scope="session")
def gateway(tiny: DevModel, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One shared gateway: room for every test adapter in the engine at once."""
    server = start_gateway(tiny, keys, tmp_path_factory.mktemp("logs"), max_loras=4, max_cpu_loras=8)
    yield server
    assert server.stop() == 0, server.log_tail()


def client_for(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture
def client(gateway: ServerProcess, keys: Keys) -> openai.OpenAI:
    """An admin's client: may use every adapter (the tenant tests use users' own keys)."""
    return client_for(gateway, keys.by_user[ADMIN])


def record_of(tiny: DevModel, ref: str) -> AdapterRecord:
    return next(r for r in tiny.adapters if r.ref == ref)


def token_ids(labels: list[str]) -> list[int]:
    """Token ids from logprobs labels `token_id:N` (return_tokens_as_token_ids)."""
    return [int(label.removeprefix("token_id:")) for label in labels]


def complete_ids(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> list[int]:
    """Greedy completion as exact token ids (text alone hides a partial UTF-8 character at the end)."""
    result = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=0,
        extra_body={"return_tokens_as_token_ids": True},
    )
    ids = token_ids(result.choices[0].logprobs.tokens)
    assert result.usage.completion_tokens == len(ids)
    return ids
