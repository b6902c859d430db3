"""More adapters than the engine holds: LRU eviction and reloading never change an output."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway_tools.dev.models import DevModel
from gateway_tools.dev.oracle import ReferenceModel
from gateway_tools.dev.process import ServerProcess
from tests.e2e.conftest import ADAPTERS, ADMIN, Keys, adapter_dir, client_for, complete_ids, start_gateway

pytestmark = pytest.mark.e2e

PROMPTS = ["def parse(value):", "class Config:"]
MAX_TOKENS = 8


def two_slot_gateway(tiny: DevModel, keys: Keys, logs: Path, **flags: object) -> Iterator[ServerProcess]:
    server = start_gateway(tiny, keys, logs, max_loras=2, max_cpu_loras=2, **flags)
    yield server
    assert server.stop() == 0, server.log_tail()


@pytest.fixture(scope="module")
def small_gateway(tiny: DevModel, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The default wait for a slot: four clients over six adapters keep both slots busy; a request
    waiting for one gets the next slot that frees, ahead of newer requests, and past the aging
    bound a busy adapter drains for it (gateway/pool.py), so it is served however slow the host."""
    yield from two_slot_gateway(tiny, keys, tmp_path_factory.mktemp("churn-logs"))


@pytest.fixture(scope="module")
def impatient_gateway(tiny: DevModel, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A 3 s wait for a slot: shorter than the streams the hang-up test leaves behind."""
    yield from two_slot_gateway(tiny, keys, tmp_path_factory.mktemp("hang-up-logs"), adapter_wait_timeout_s=3)


def test_six_adapters_through_two_engine_slots_stay_correct(
    small_gateway: ServerProcess, tiny: DevModel, oracle: ReferenceModel, keys: Keys
) -> None:
    assert len(ADAPTERS) == 6
    client = client_for(small_gateway, keys.by_user[ADMIN])
    jobs = [(model, prompt) for model in ADAPTERS for prompt in PROMPTS] * 3
    random.Random(1).shuffle(jobs)

    def ask(job: tuple[str, str]) -> list[int]:
        return complete_ids(client, *job, MAX_TOKENS)

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(ask, jobs))
    for (model, prompt), answer in zip(jobs, answers):
        expected = oracle.greedy_ids(adapter_dir(tiny, model), oracle.prompt_ids(prompt), MAX_TOKENS)
        assert answer == expected, (model, prompt)
    assert "evicted" in small_gateway.log_tail(2000), "six adapters through two slots must evict"


def test_clients_that_hang_up_mid_stream_release_their_adapters(impatient_gateway: ServerProcess, keys: Keys) -> None:
    """Both slots held by streams whose clients leave: a third adapter must still get in."""
    client = client_for(impatient_gateway, keys.by_user[ADMIN])
    for model in ("alice/chat", "bob/chat"):
        stream = client.completions.create(model=model, prompt="x", max_tokens=2000, temperature=0, stream=True)
        next(iter(stream))  # generation has started: the adapter is held
        stream.close()  # the client hangs up
    # Had the streams run on (2000 tokens: about 10 s here) or their holds leaked, this request
    # would wait adapter_wait_timeout_s (3 s) for a slot and get a 503.
    result = client.completions.create(model="carol/chat", prompt="x", max_tokens=4, temperature=0)
    assert result.usage.completion_tokens == 4


@pytest.fixture(scope="module")
def hogged_gateway(tiny: DevModel, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Aging at 0: a waiter drains a busy adapter at once, so the bound below is a number of requests,
    whatever the host's speed; a wait of 10 minutes: starvation shows as a miss of that bound, not a 503."""
    yield from two_slot_gateway(
        tiny, keys, tmp_path_factory.mktemp("hog-logs"), adapter_slot_aging_s=0, adapter_wait_timeout_s=600
    )


def test_a_cold_adapter_is_served_while_another_tenant_keeps_every_slot_busy(
    hogged_gateway: ServerProcess, tiny: DevModel, oracle: ReferenceModel, keys: Keys
) -> None:
    """The admin keeps both slots busy with two overlapping streams per adapter; carol's own adapter,
    not resident, must be served (and right) before those streams have run many more requests."""
    hog = client_for(hogged_gateway, keys.by_user[ADMIN])
    carol = client_for(hogged_gateway, keys.by_user["carol"])
    hot, cold, budget = ("alice/chat", "bob/chat"), "carol/chat", 40  # requests per hog worker, at most
    carol_done, hog_answers = threading.Event(), []

    def stream(model: str) -> int:
        sent = 0
        while not carol_done.is_set() and sent < budget:
            hog_answers.append((model, complete_ids(hog, model, PROMPTS[0], MAX_TOKENS)))
            sent += 1
        return sent

    with ThreadPoolExecutor(max_workers=4) as workers:
        streams = [workers.submit(stream, model) for model in hot for _ in range(2)]
        while len(hog_answers) < 4:  # both hot adapters resident and busy
            time.sleep(0.05)
        try:
            answer = complete_ids(carol, cold, PROMPTS[1], MAX_TOKENS)
        finally:
            carol_done.set()
        sent = [s.result() for s in streams]
    assert max(sent) < budget, f"carol's adapter waited while the hog ran {sent} requests per worker"
    assert answer == oracle.greedy_ids(adapter_dir(tiny, cold), oracle.prompt_ids(PROMPTS[1]), MAX_TOKENS)
    expected = {m: oracle.greedy_ids(adapter_dir(tiny, m), oracle.prompt_ids(PROMPTS[0]), MAX_TOKENS) for m in hot}
    assert all(ids == expected[model] for model, ids in hog_answers)
