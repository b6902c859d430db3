"""Tenants on the real engine: alice and bob at the same time, in the same batches, each get
exactly the output of the adapter they are entitled to, and nothing of the other's."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
import requests

from gateway_tools.dev.models import DevModel
from gateway_tools.dev.oracle import ReferenceModel
from gateway_tools.dev.process import ServerProcess
from gateway_tools.dev.tiny_model import BASE_MODEL_NAME
from tests.e2e.conftest import Keys, adapter_dir, client_for, complete_ids

pytestmark = pytest.mark.e2e

PROMPTS = ["def parse(value):", "import os\n", "class Config:"]
MAX_TOKENS = 10
FORBIDDEN = None

# (user, the model the user names, the adapter that must answer; FORBIDDEN: a 404)
ASKS: list[tuple[str, str, str | None]] = [
    ("alice", "chat", "alice/chat"),  # bare: the caller's own
    ("alice", "alice/chat", "alice/chat"),
    ("alice", BASE_MODEL_NAME, BASE_MODEL_NAME),
    ("alice", "bob/chat", FORBIDDEN),  # bob's, private
    ("alice", "carol/chat", FORBIDDEN),
    ("alice", "notes", FORBIDDEN),  # alice/notes: there is none (dave/notes is someone else's)
    ("bob", "chat", "bob/chat"),
    ("bob", "bob/chat", "bob/chat"),
    ("bob", BASE_MODEL_NAME, BASE_MODEL_NAME),
    ("bob", "alice/chat", FORBIDDEN),
    ("bob", "dave/notes", FORBIDDEN),
]


def not_found_body(model: str) -> dict[str, Any]:
    """The one answer for a model the caller may not use, whether it exists or not."""
    return {
        "error": {
            "message": f"The model '{model}' does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_concurrent_tenants_get_exactly_what_they_are_entitled_to(
    gateway: ServerProcess, keys: Keys, tiny: DevModel, oracle: ReferenceModel
) -> None:
    clients = {user: client_for(gateway, keys.by_user[user]) for user in ("alice", "bob")}
    entitled = {ref for _, _, ref in ASKS if ref is not FORBIDDEN}
    expected = {
        (ref, prompt): oracle.greedy_ids(adapter_dir(tiny, ref), oracle.prompt_ids(prompt), MAX_TOKENS)
        for ref in entitled
        for prompt in PROMPTS
    }
    # The adapters differ from the base and from each other on these prompts: a mix-up would show.
    for prompt in PROMPTS:
        assert len({tuple(expected[ref, prompt]) for ref in entitled}) == len(entitled), prompt

    jobs = [(user, model, ref, prompt) for user, model, ref in ASKS for prompt in PROMPTS] * 2  # 66 requests
    random.Random(7).shuffle(jobs)

    def ask(job: tuple[str, str, str | None, str]) -> list[int] | dict[str, Any]:
        user, model, _, prompt = job
        try:
            return complete_ids(clients[user], model, prompt, MAX_TOKENS)
        except openai.NotFoundError as exc:
            return exc.response.json()

    for batch in (jobs[:22], jobs[22:], jobs):  # smaller mixed batches, then everything at once
        with ThreadPoolExecutor(max_workers=len(batch)) as pool:
            answers = list(pool.map(ask, batch))
        wrong = [
            (user, model, answer)
            for (user, model, ref, prompt), answer in zip(batch, answers)
            if answer != (not_found_body(model) if ref is FORBIDDEN else expected[ref, prompt])
        ]
        assert not wrong, f"{len(wrong)} of {len(batch)} answers are not the caller's due, e.g. {wrong[:3]}"


def test_a_tenants_lists_hold_only_their_own_and_public_adapters(gateway: ServerProcess, keys: Keys) -> None:
    # Other tests share this gateway and may add adapters: the rule is checked, not a fixed list.
    for user, own, others in (("alice", "alice/chat", "bob/chat"), ("bob", "bob/chat", "alice/chat")):
        models = {m.id for m in client_for(gateway, keys.by_user[user]).models.list()}
        assert {BASE_MODEL_NAME, own} <= models
        assert others not in models and not {"carol/chat", "dave/notes"} & models
        listed = requests.get(
            gateway.base_url + "/v1/adapters", headers={"Authorization": f"Bearer {keys.by_user[user]}"}, timeout=10
        )
        assert listed.status_code == 200, listed.text
        adapters = listed.json()["data"]
        assert {a["id"] for a in adapters} == models - {BASE_MODEL_NAME}
        assert all(a["owner"] == user or a["visibility"] == "public" for a in adapters), adapters
