"""The shared base model's prefix cache, per tenant: a prompt one tenant sent is cached for that
tenant only, so nobody can time whether someone else sent it (vLLM's own prefix-cache counters,
read from the gateway's /metrics, tell what the engine reused)."""

from __future__ import annotations

import secrets
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gateway_tools.dev.process import ServerProcess
from tests.e2e.conftest import Keys

pytestmark = pytest.mark.e2e


def prefix_cache_tokens(gateway: ServerProcess) -> tuple[float, float]:
    """(tokens looked up, tokens found) in the engine's prefix cache so far."""
    text = requests.get(gateway.base_url + "/metrics", timeout=10).text
    totals = {"vllm:prefix_cache_queries": 0.0, "vllm:prefix_cache_hits": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name in totals:
            totals[family.name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return totals["vllm:prefix_cache_queries"], totals["vllm:prefix_cache_hits"]


def cached_tokens_of(gateway: ServerProcess, key: str, prompt: str) -> float:
    """Send `prompt` to the base model as the key's user; the prompt tokens the engine found cached."""
    queries, hits = prefix_cache_tokens(gateway)
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 1, "temperature": 0}
    resp = requests.post(
        gateway.base_url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )
    assert resp.status_code == 200, resp.text
    prompt_tokens = resp.json()["usage"]["prompt_tokens"]
    deadline = time.monotonic() + 30
    while True:  # the engine's counters arrive with its step's outputs, not before
        now_queries, now_hits = prefix_cache_tokens(gateway)
        if now_queries - queries >= prompt_tokens:
            return now_hits - hits
        assert time.monotonic() < deadline, "the engine's prefix-cache counters did not move"
        time.sleep(0.1)


def test_one_tenants_prompt_does_not_warm_anothers_cache(gateway: ServerProcess, keys: Keys) -> None:
    # Long enough for several KV blocks, and new to this engine.
    prompt = " ".join(secrets.token_hex(4) for _ in range(100))
    alice, bob = keys.by_user["alice"], keys.by_user["bob"]
    assert cached_tokens_of(gateway, alice, prompt) == 0  # new
    assert cached_tokens_of(gateway, alice, prompt) > 0  # alice's own prefix: reused
    assert cached_tokens_of(gateway, bob, prompt) == 0  # bob cannot tell alice sent it
    assert cached_tokens_of(gateway, bob, prompt) > 0  # bob's own, once he sent it
