"""A schema-driven fuzz of the live gateway on the real engine: schemathesis builds requests,
valid and invalid, from the gateway's own /openapi.json, and every answer must be as documented:
never a 5xx, a documented status and content type, a body matching its schema, and every error
in OpenAI's shape. Bounded: a fixed number of cases per operation, each generating a few tokens."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import settings

from gateway_tools.dev.process import ServerProcess
from gateway_tools.dev.tiny_model import BASE_MODEL_NAME
from tests.e2e.conftest import ADMIN, Keys

pytestmark = pytest.mark.e2e

MAX_TOKENS = 4  # per choice: generation stays cheap on a CPU engine
EXAMPLES = 25  # fuzzed cases per operation and generation mode (boundary cases come on top)
FUZZ_USER = "sam"  # deletes run as this user, whose namespace no other test of this gateway uses
MODELS = [BASE_MODEL_NAME, "alice/chat", "dave/notes"]
KNOWN_PARTS = {"owner": ["alice", "dave"], "name": ["chat", "notes"]}  # of the adapters above


def fuzz_document(document: dict[str, Any]) -> dict[str, Any]:
    """The document with generation bounded to MAX_TOKENS per choice (a chat request without
    max_tokens may fill the whole context), and valid requests naming models and adapters that
    exist: a random name is a 404 long before the engine (invalid requests still bring others)."""
    document = copy.deepcopy(document)
    schemas = document["components"]["schemas"]
    for name, budget in (
        ("CompletionRequest", "max_tokens"),
        ("ChatCompletionRequest", "max_tokens"),
        ("ResponsesRequest", "max_output_tokens"),
    ):
        fields = schemas[name]["properties"]
        fields["model"] = {"enum": MODELS}
        for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            if field in fields:
                fields[field] = {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}
        schemas[name].setdefault("required", []).append(budget)
    for operation in document["paths"]["/v1/adapters/{owner}/{name}"].values():
        for parameter in operation["parameters"]:
            parameter["schema"] = {"enum": KNOWN_PARTS[parameter["name"]]}
    return document


def cheap(body: Any) -> bool:
    """Whether the engine has little to do for this body: invalid values are refused before it
    runs; an accepted max_tokens above MAX_TOKENS or a missing one is not."""
    if not isinstance(body, dict) or not ({"prompt", "messages", "input"} & body.keys()):
        return True
    budgets = [body[f] for f in ("max_tokens", "max_completion_tokens", "max_output_tokens") if f in body]
    return bool(budgets) and not any(type(b) is int and b > MAX_TOKENS for b in budgets)


def filter_case(context: schemathesis.HookContext, case: schemathesis.Case) -> bool:
    return cheap(case.body)


def openai_error_shape(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """Every error, documented or not (a 404 route, a 405 method), is JSON in OpenAI's shape."""
    if response.status_code < 400:
        return
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"], body
    assert isinstance(error["type"], str) and error["type"], body
    assert all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")), body


def fresh_openapi() -> dict[str, Any]:
    """The document as a fresh gateway process builds it: its schemas are vLLM's request models,
    whose JSON schema this test process (having imported and run much of vLLM) may render otherwise."""
    code = "import json; from gateway.api.openapi import build_openapi; print(json.dumps(build_openapi()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.splitlines()[-1])


DOCUMENT = fresh_openapi()


def test_the_fuzzed_document_is_the_served_one(gateway: ServerProcess) -> None:
    assert requests.get(gateway.base_url + "/openapi.json", timeout=10).json() == DOCUMENT


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": [-1]},  # vLLM's own checks: not ValueErrors since vLLM 0.32
        {"prompt": [1 << 70]},
        {"prompt": "Hi", "seed": 1 << 64},  # more than the engine can carry
        {"prompt": "Hi", "stop": ""},  # the engine refuses it
        {"prompt": "Hi", "temperature": 0, "n": 2},  # so does its sampler: greedy is one choice
    ],
)
def test_what_the_fuzz_found_is_a_400(gateway: ServerProcess, keys: Keys, fields: dict[str, Any]) -> None:
    body = {"model": BASE_MODEL_NAME, "max_tokens": 1, **fields}
    resp = requests.post(gateway.base_url + "/v1/completions", json=body, headers=admin(keys), timeout=30)
    assert resp.status_code == 400, resp.text


def test_an_upload_without_a_multipart_boundary_is_a_400(gateway: ServerProcess, keys: Keys) -> None:
    headers = {**admin(keys), "Content-Type": "multipart/form-data"}
    resp = requests.post(gateway.base_url + "/v1/adapters", headers=headers, timeout=30)
    assert resp.status_code == 400, resp.text


def admin(keys: Keys) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys.by_user[ADMIN]}"}


# Built here, not fetched: schemathesis 4.32's fixture-loaded schemas fail on pytest 9 (`_nodeid`).
schema = schemathesis.openapi.from_dict(
    fuzz_document(DOCUMENT),
    config=schemathesis.Config.from_dict(
        {
            "request-timeout": 30,
            "generation": {"mode": "all", "max-examples": EXAMPLES, "deterministic": True, "database": "none"},
            "phases": {"stateful": {"enabled": False}},
            "checks": {
                "enabled": False,
                "not_a_server_error": {"enabled": True},
                "status_code_conformance": {"enabled": True},
                "content_type_conformance": {"enabled": True},
                "response_schema_conformance": {"enabled": True},
                "ignored_auth": {"enabled": True},  # a 2xx is retried without a key, and with a wrong one
                "missing_required_header": {"enabled": True},
                "unsupported_method": {"enabled": True},  # a 405, with Allow
                "allow_header_conformance": {"enabled": True},
            },
        }
    ),
)
schema.hook(filter_case)


@schema.parametrize()
@settings(deadline=30_000)
def test_every_answer_is_documented(case: schemathesis.Case, gateway: ServerProcess, keys: Keys) -> None:
    assert cheap(case.body), case.body  # the filter held
    user = FUZZ_USER if case.method == "DELETE" else ADMIN
    case.call_and_validate(
        base_url=gateway.base_url,
        headers={"Authorization": f"Bearer {keys.by_user[user]}"},
        additional_checks=[openai_error_shape],
    )
