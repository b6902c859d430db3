"""Adapters in S3 (moto's real S3 API on loopback) served by two gateway replicas: publish
with the CLI, new versions and deletions picked up by polling, a store outage survived."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests

from adapters_manifest import layout
from adapters_manifest.publish import publish, record_for
from adapters_manifest.record import AdapterRecord
from adapters_manifest.s3_store import S3Store
from gateway_tools.dev.models import DevModel
from gateway_tools.dev.oracle import ReferenceModel
from gateway_tools.dev.process import ServerProcess, free_port, gateway_command
from gateway_tools.dev.s3_server import S3Server
from gateway_tools.dev.tiny_model import BASE_MODEL_NAME
from tests.e2e.conftest import ADMIN, ENGINE, Keys, adapter_dir, client_for, complete_ids

pytestmark = pytest.mark.e2e

BUCKET, PREFIX = "lora-e2e", "prod"
STORE_URL = f"s3://{BUCKET}/{PREFIX}"
SYNC_INTERVAL_S = 1.0
PROMPT = "def parse(value):"


@pytest.fixture(scope="module")
def s3(s3_server: S3Server, tiny: DevModel) -> Iterator[S3Server]:
    """The bucket, seeded with alice/chat and bob/chat; this process, too, reaches it by the AWS settings."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in s3_server.client_env().items():
            env.setenv(key, value)
        s3_server.create_bucket(BUCKET)
        for ref in ("alice/chat", "bob/chat"):
            owner, name = ref.split("/")
            put_adapter(adapter_dir(tiny, ref), owner, name)
        yield s3_server


def put_adapter(folder: Path, owner: str, name: str) -> AdapterRecord:
    """Publish straight to S3, as another tool (or another replica) would."""
    store = S3Store.from_url(STORE_URL)
    return asyncio.run(publish(store, folder, record_for(folder, owner, name, base_model=BASE_MODEL_NAME)))


@pytest.fixture(scope="module")
def replicas(
    s3: S3Server, tiny: DevModel, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ServerProcess]]:
    logs = tmp_path_factory.mktemp("s3-logs")
    servers = []
    for _ in range(2):
        port = free_port()
        command = gateway_command(
            tiny.base,
            STORE_URL,
            port,
            served_model_name=tiny.served_name,
            **ENGINE,
            keys_file=keys.file,
            sync_interval_s=SYNC_INTERVAL_S,
            max_loras=2,
            max_cpu_loras=4,
        )
        servers.append(ServerProcess(command, port, logs / f"replica-{port}.log", env=s3.client_env()))
    with ThreadPoolExecutor(2) as pool:  # start both engines at once
        list(pool.map(lambda server: server.start(), servers))
    yield servers
    for server in servers:
        assert server.stop() == 0, server.log_tail()


@pytest.fixture(scope="module")
def admin(keys: Keys) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys.by_user[ADMIN]}"}


def cli(s3: S3Server, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gateway", "adapters", *args, "--store", STORE_URL]
    return subprocess.run(command, env={**os.environ, **s3.client_env()}, capture_output=True, text=True, timeout=120)


def eventually(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(0.2)


def test_seeded_adapters_serve_exactly_on_both_replicas(
    replicas: list[ServerProcess], tiny: DevModel, oracle: ReferenceModel, keys: Keys
) -> None:
    for server in replicas:
        for ref in ("alice/chat", "bob/chat", BASE_MODEL_NAME):
            expected = oracle.greedy_ids(adapter_dir(tiny, ref), oracle.prompt_ids(PROMPT), 8)
            assert complete_ids(client_for(server, keys.by_user[ADMIN]), ref, PROMPT, 8) == expected, (
                server.base_url,
                ref,
            )


def test_cli_push_new_version_and_rm_reach_a_running_replica_by_polling(
    s3: S3Server, replicas: list[ServerProcess], tiny: DevModel, oracle: ReferenceModel, keys: Keys
) -> None:
    first, second = adapter_dir(tiny, "carol/chat"), adapter_dir(tiny, "dave/notes")
    expect_first = oracle.greedy_ids(first, oracle.prompt_ids(PROMPT), 8)
    expect_second = oracle.greedy_ids(second, oracle.prompt_ids(PROMPT), 8)
    pushed = cli(
        s3, "push", str(first), "--owner", "sam", "--name", "style", "--model", str(tiny.base), "--max-lora-rank", "8"
    )
    assert pushed.returncode == 0, pushed.stderr
    replica = client_for(replicas[1], keys.by_user[ADMIN])
    assert complete_ids(replica, "sam/style", PROMPT, 8) == expect_first  # found by a direct look-up

    pushed = cli(s3, "push", str(second), "--owner", "sam", "--name", "style")
    assert pushed.returncode == 0, pushed.stderr
    seen: list[list[int]] = []

    def serves_new_version() -> bool:
        seen.append(complete_ids(replica, "sam/style", PROMPT, 8))
        return seen[-1] == expect_second

    eventually(serves_new_version, 5 * SYNC_INTERVAL_S + 5, "the new version served")
    assert all(out in (expect_first, expect_second) for out in seen), "an output from neither version"

    removed = cli(s3, "rm", "sam/style")
    assert removed.returncode == 0, removed.stderr

    def gone() -> bool:
        try:
            complete_ids(replica, "sam/style", PROMPT, 4)
        except openai.NotFoundError:
            return True
        return False

    eventually(gone, 5 * SYNC_INTERVAL_S + 5, "the deleted adapter refused")
    listed = cli(s3, "list")
    assert "sam/style" not in listed.stdout and "alice/chat" in listed.stdout


def test_store_outage_serves_cached_adapters_and_recovers(
    s3: S3Server,
    replicas: list[ServerProcess],
    tiny: DevModel,
    oracle: ReferenceModel,
    keys: Keys,
    admin: dict[str, str],
) -> None:
    server = replicas[0]
    client = client_for(server, keys.by_user[ADMIN])
    expect_alice = oracle.greedy_ids(adapter_dir(tiny, "alice/chat"), oracle.prompt_ids(PROMPT), 8)
    assert complete_ids(client, "alice/chat", PROMPT, 8) == expect_alice  # cached on this replica now
    # An adapter the replica knows from its listing but has never fetched.
    folder = adapter_dir(tiny, "erin/notes")
    put_adapter(folder, "erin", "notes")
    eventually(lambda: "erin/notes" in {m.id for m in client.models.list()}, 5 * SYNC_INTERVAL_S + 5, "listed")

    s3.stop()
    try:
        eventually(
            lambda: (
                requests.get(server.base_url + "/readyz", timeout=5).json()["adapter_sync"]["last_error"] is not None
            ),
            5 * SYNC_INTERVAL_S + 15,
            "a failed poll reported",
        )
        ready = requests.get(server.base_url + "/readyz", timeout=5)
        assert ready.status_code == 200, "a store outage must not take a replica out of service"
        assert "lora_gateway_adapter_sync_failing 1.0" in requests.get(server.base_url + "/metrics", timeout=5).text
        assert complete_ids(client, "alice/chat", PROMPT, 8) == expect_alice
        assert complete_ids(client, BASE_MODEL_NAME, PROMPT, 8) == oracle.greedy_ids(None, oracle.prompt_ids(PROMPT), 8)
        uncached = requests.post(
            server.base_url + "/v1/completions",
            json={"model": "erin/notes", "prompt": PROMPT, "max_tokens": 4},
            headers=admin,
            timeout=120,
        )
        assert uncached.status_code == 503
        assert int(uncached.headers["Retry-After"]) >= 1
        assert uncached.json()["error"]["code"] == "service_unavailable"
    finally:
        s3.start()
    eventually(
        lambda: requests.get(server.base_url + "/readyz", timeout=5).json()["adapter_sync"]["last_error"] is None,
        5 * SYNC_INTERVAL_S + 15,
        "sync recovered",
    )
    expected = oracle.greedy_ids(folder, oracle.prompt_ids(PROMPT), 8)
    assert complete_ids(client, "erin/notes", PROMPT, 8) == expected


def test_corrupted_object_is_refused_never_served(
    s3: S3Server, replicas: list[ServerProcess], tiny: DevModel, keys: Keys, admin: dict[str, str]
) -> None:
    folder = adapter_dir(tiny, "frank/notes")
    record = put_adapter(folder, "frank", "tampered")
    key = f"{PREFIX}/{layout.file_key(record, 'adapter_model.safetensors')}"
    data = bytearray((folder / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight: still a valid safetensors file
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=bytes(data))

    refused = requests.post(
        replicas[1].base_url + "/v1/completions",
        json={"model": "frank/tampered", "prompt": PROMPT, "max_tokens": 4},
        headers=admin,
        timeout=120,
    )
    assert refused.status_code == 422
    assert "sha256" in refused.json()["error"]["message"]
    assert complete_ids(client_for(replicas[1], keys.by_user[ADMIN]), "alice/chat", PROMPT, 4)  # the engine serves on
