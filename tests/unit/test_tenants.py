"""Tenants on the real app (fake engine): who is calling (API keys, a trusted proxy header, or the
development switch), and what each caller may see and touch. Another user's private adapter is
indistinguishable from a missing one: the same answer and the same traffic to the store."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from multidict import CIMultiDict
from pydantic import ValidationError

import gateway.app
from adapters_manifest.local_store import LocalFolderStore
from adapters_manifest.record import AdapterRecord
from gateway.auth.keys import add_key, remove_keys
from gateway.auth.middleware import OPEN_PATHS
from gateway.settings import ServeSettings
from tests.fakes import expected_text, publish_adapter, write_adapter_dir, write_base_model
from tests.unit.harness import (
    ADMIN,
    BASE,
    STORE_WRITES,
    Gateway,
    StartGateway,
    StoreCalls,
    adapter_form,
    assert_error,
    chat,
    completion,
    publish_extra,
    raw_http,
    response,
    watch_store,
)

USERS = ("alice", "bob", "carol")


@dataclass
class Tenants:
    gw: Gateway
    keys_file: Path
    keys: dict[str, str]  # user -> API key; ADMIN's is an admin's
    records: dict[str, AdapterRecord]
    store: StoreCalls
    scratch: Path

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}"}

    async def request(self, user: str, method: str, path: str, **kwargs: Any) -> ClientResponse:
        return await self.gw.client.request(method, path, headers=self.auth(user), **kwargs)

    async def complete(self, user: str, model: str, prompt: str = "Hello") -> ClientResponse:
        return await self.request(user, "POST", "/v1/completions", json=completion(model, prompt))

    async def served_by(self, user: str, model: str) -> str:
        """The adapter that generated `user`'s completion with `model` (asserting a 200)."""
        resp = await self.complete(user, model, "Hello")
        assert resp.status == 200, await resp.text()
        text = (await resp.json())["choices"][0]["text"]
        prompt = self.gw.engine.prompt_ids("Hello")
        for ref, record in self.records.items():
            if text == expected_text(record.versioned_ref, prompt, 0, 3):
                return ref
        if text == expected_text("__base__", prompt, 0, 3):
            return BASE
        raise AssertionError(f"unexpected output {text!r}")

    async def upload(self, user: str, name: str, **fields: str) -> ClientResponse:
        folder = write_adapter_dir(
            self.scratch / f"upload-{user}-{name}-{len(fields)}", payload=f"{user}{name}".encode()
        )
        return await self.request(user, "POST", "/v1/adapters", data=adapter_form(folder, name, **fields))


@pytest.fixture
async def tenants(start_gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tenants:
    keys_file = tmp_path / "keys.yaml"
    keys = {user: add_key(keys_file, user)[0] for user in USERS}
    keys[ADMIN] = add_key(keys_file, ADMIN, admin=True)[0]
    extra = await publish_extra(tmp_path)
    # No polls during a test: every store call below is one a request made.
    gw = await start_gateway(keys_file=keys_file, sync_interval_s=3600)
    return Tenants(gw, keys_file, keys, {**gw.records, **extra}, watch_store(gw, monkeypatch), tmp_path)


def concrete(path: str, owner: str = "alice", name: str = "x") -> str:
    return path.replace("{owner}", owner).replace("{name}", name)


REQUEST_BODIES: dict[str, Callable[[], dict[str, Any]]] = {
    "/v1/completions": lambda: {"json": completion("alice/x")},
    "/v1/chat/completions": lambda: {"json": chat("alice/x")},
    "/v1/responses": lambda: {"json": response("alice/x")},
    "/tokenize": lambda: {"json": {"model": "alice/x", "prompt": "Hello"}},
    "/detokenize": lambda: {"json": {"model": "alice/x", "tokens": [44, 73]}},
}


def protected_routes(gw: Gateway) -> list[tuple[str, str]]:
    routes = sorted({(r.method, r.resource.canonical) for r in gw.app.router.routes() if r.resource is not None})
    protected = [(method, path) for method, path in routes if path not in OPEN_PATHS]
    assert {
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/responses"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
        ("GET", "/v1/models"),
        ("GET", "/v1/adapters"),
        ("POST", "/v1/adapters"),
        ("GET", "/v1/adapters/{owner}/{name}"),
        ("DELETE", "/v1/adapters/{owner}/{name}"),
        ("POST", "/admin/sync"),
        ("GET", "/admin/resident"),
    } <= set(protected)
    return protected


async def assert_not_found(resp: ClientResponse) -> None:
    """The one answer for a name the caller may not use, whether it exists or not."""
    await assert_error(resp, 404, param="model", code="model_not_found")


async def assert_refused(resp: ClientResponse, status: int, code: str | None = None) -> None:
    if resp.method == "HEAD":  # no body to check
        assert resp.status == status
    else:
        await assert_error(resp, status, code=code)


# -- API keys ------------------------------------------------------------------------------------


def bad_credentials(key: str) -> dict[str, dict[str, str]]:
    digest = hashlib.sha256(key.encode()).hexdigest()
    return {
        "missing": {},
        "empty": {"Authorization": ""},
        "bearer without a key": {"Authorization": "Bearer "},
        "key without a scheme": {"Authorization": key},
        "basic scheme": {"Authorization": "Basic " + base64.b64encode(f"alice:{key}".encode()).decode()},
        "token scheme": {"Authorization": f"Token {key}"},
        "wrong key": {"Authorization": "Bearer lgw_" + "A" * 43},
        "the stored hash": {"Authorization": f"Bearer {digest}"},
        "the key id": {"Authorization": f"Bearer {digest[:8]}"},
        "a truncated key": {"Authorization": f"Bearer {key[:-1]}"},
        "another header": {"X-Api-Key": key},
        "the user's name": {"Authorization": "Bearer alice"},
    }


WRONG_KEYS = {"wrong key", "the stored hash", "the key id", "a truncated key", "the user's name"}


async def test_every_endpoint_but_the_open_ones_refuses_a_caller_without_a_valid_key(tenants: Tenants) -> None:
    gw = tenants.gw
    generated = len(gw.engine.generate_calls)
    for method, path in protected_routes(gw):
        body = REQUEST_BODIES.get(path, dict)()
        for what, headers in bad_credentials(tenants.keys["alice"]).items():
            resp = await gw.client.request(method, concrete(path), headers=headers, **body)
            await assert_refused(resp, 401, code="invalid_api_key")
            if method != "HEAD":
                message = (await resp.json())["error"]["message"]
                expected = "Incorrect API key" if what in WRONG_KEYS else "didn't provide an API key"
                assert expected in message, (what, message)
        # A key in the query string is not a credential (it would end up in access logs).
        resp = await gw.client.request(method, concrete(path) + f"?api_key={tenants.keys['alice']}", **body)
        await assert_refused(resp, 401, code="invalid_api_key")
    assert tenants.store.calls == []  # refused before anything was looked up ...
    assert len(gw.engine.generate_calls) == generated  # ... or generated


async def test_a_valid_key_is_accepted_whatever_the_case_of_the_scheme(tenants: Tenants) -> None:
    for scheme in ("Bearer", "bearer", "BEARER"):
        headers = {"Authorization": f"{scheme} {tenants.keys['alice']}"}
        resp = await tenants.gw.client.get("/v1/models", headers=headers)
        assert resp.status == 200, await resp.text()


async def test_open_endpoints_need_no_key(tenants: Tenants) -> None:
    for path in sorted(OPEN_PATHS):
        for headers in ({}, {"Authorization": "Bearer wrong"}):  # a bad key does not break probes either
            resp = await tenants.gw.client.get(path, headers=headers)
            assert resp.status == 200, (path, await resp.text())


@pytest.mark.parametrize(
    "path",
    [
        "/healthz/../v1/models",
        "/healthz/%2e%2e/v1/models",
        "/metrics/..%2fv1/models",
        "//v1/models",
        "/HEALTHZ",
        "/healthz/",
        "/v1/models?/healthz",
        "/v1/models#/healthz",
        "/healthz%00/../v1/models",
    ],
)
async def test_paths_that_look_open_are_not_a_way_around_the_key(tenants: Tenants, path: str) -> None:
    status, headers, body = await raw_http(tenants.gw, f"GET {path} HTTP/1.1".encode())
    assert status == 401, (status, body)
    assert headers["Content-Type"].startswith("application/json")


async def test_keys_revoked_or_added_while_running_apply_within_the_check_interval(
    start_gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.app, "KEYS_FILE_CHECK_INTERVAL_S", 0.05)
    keys_file = tmp_path / "keys.yaml"
    alice, bob = add_key(keys_file, "alice")[0], add_key(keys_file, "bob")[0]
    gw = await start_gateway(keys_file=keys_file)

    async def status(key: str) -> int:
        return (await gw.client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status

    statuses: dict[str, int] = {}

    async def until_status(key: str, expected: int, timeout_s: float = 5.0) -> None:
        async def check() -> None:
            statuses[key] = await status(key)

        await check()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while statuses[key] != expected:
            assert asyncio.get_running_loop().time() < deadline, f"still {statuses[key]}, not {expected}"
            await asyncio.sleep(0.02)
            await check()

    assert await status(alice) == 200 and await status(bob) == 200
    remove_keys(keys_file, user="alice")
    await until_status(alice, 401)
    new_alice = add_key(keys_file, "alice")[0]
    await until_status(new_alice, 200)
    assert await status(alice) == 401 and await status(bob) == 200

    # A broken file keeps the keys in force, and does not stop the watching: a later fix applies.
    good = keys_file.read_bytes()
    keys_file.write_bytes(b"keys:\n  - {id: '\xff\xfe'\n")
    await asyncio.sleep(0.3)  # several checks
    assert await status(bob) == 200 and await status(new_alice) == 200 and await status(alice) == 401
    keys_file.write_bytes(good)
    remove_keys(keys_file, user="bob")
    await until_status(bob, 401)
    assert await status(new_alice) == 200


# -- a trusted proxy's header ---------------------------------------------------------------------

USER_HEADER, ADMIN_HEADER = "X-Forwarded-User", "X-Forwarded-Admin"


@pytest.fixture
async def behind_proxy(start_gateway: StartGateway, tmp_path: Path) -> Gateway:
    await publish_extra(tmp_path)
    return await start_gateway(trusted_user_header=USER_HEADER, trusted_admin_header=ADMIN_HEADER)


async def model_ids(resp: ClientResponse) -> set[str]:
    assert resp.status == 200, await resp.text()
    return {m["id"] for m in (await resp.json())["data"]}


ALL_ADAPTERS = {"alice/coding", "alice/x", "bob/poems", "bob/chat", "bob/pub"}
VISIBLE = {
    "alice": {"alice/coding", "alice/x", "bob/pub"},
    "bob": {"bob/poems", "bob/chat", "bob/pub"},
    "carol": {"bob/pub"},
    ADMIN: ALL_ADAPTERS,
}


async def test_behind_a_proxy_the_user_comes_from_its_header(behind_proxy: Gateway) -> None:
    client = behind_proxy.client
    for user in ("alice", "bob", "carol"):
        headers = {USER_HEADER: user}
        assert await model_ids(await client.get("/v1/models", headers=headers)) == {BASE} | VISIBLE[user]
        assert (await client.post("/admin/sync", headers=headers)).status == 403
    resp = await client.post("/v1/completions", json=completion("x"), headers={USER_HEADER: "alice"})
    assert resp.status == 200, await resp.text()
    await assert_not_found(await client.post("/v1/completions", json=completion("x"), headers={USER_HEADER: "bob"}))


@pytest.mark.parametrize(
    ("value", "admin"), [("true", True), ("TRUE", True), ("false", False), ("1", False), ("yes", False), ("", False)]
)
async def test_behind_a_proxy_admins_are_marked_by_the_admin_header(
    behind_proxy: Gateway, value: str, admin: bool
) -> None:
    headers = {USER_HEADER: "carol", ADMIN_HEADER: value}
    ids = await model_ids(await behind_proxy.client.get("/v1/models", headers=headers))
    assert ids == {BASE} | (ALL_ADAPTERS if admin else VISIBLE["carol"])
    assert (await behind_proxy.client.post("/admin/sync", headers=headers)).status == (200 if admin else 403)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {USER_HEADER: ""},
        {USER_HEADER: "Alice"},
        {USER_HEADER: "../bob"},
        {USER_HEADER: "alice bob"},
        {USER_HEADER: "alice/x"},
        {USER_HEADER: "a" * 65},
        {ADMIN_HEADER: "true"},  # an admin flag is not a user
        {"Authorization": "Bearer whatever"},  # keys mean nothing here
    ],
    ids=["missing", "empty", "upper-case", "traversal", "space", "slash", "too long", "admin only", "bearer"],
)
async def test_behind_a_proxy_a_missing_or_invalid_user_header_is_401(
    behind_proxy: Gateway, headers: dict[str, str]
) -> None:
    for method, path in protected_routes(behind_proxy):
        resp = await behind_proxy.client.request(
            method, concrete(path), headers=headers, **REQUEST_BODIES.get(path, dict)()
        )
        await assert_refused(resp, 401, code="invalid_api_key")
    for path in OPEN_PATHS:
        assert (await behind_proxy.client.get(path, headers=headers)).status == 200


@pytest.mark.parametrize(
    "headers",
    [
        [(USER_HEADER, "mallory"), (USER_HEADER, "alice")],
        [(USER_HEADER, "alice"), (USER_HEADER, "alice")],
        [(USER_HEADER, "carol"), (ADMIN_HEADER, "true"), (ADMIN_HEADER, "false")],
        [(USER_HEADER, "carol"), (ADMIN_HEADER, "false"), (ADMIN_HEADER, "true")],
    ],
    ids=["two users", "the same user twice", "admin then not", "not then admin"],
)
async def test_behind_a_proxy_a_repeated_header_is_401(behind_proxy: Gateway, headers: list[tuple[str, str]]) -> None:
    """A proxy that adds its header instead of replacing the client's passes both on: which one
    is the proxy's cannot be known, so neither is trusted."""
    resp = await behind_proxy.client.get("/v1/models", headers=CIMultiDict(headers))
    await assert_error(resp, 401, code="invalid_api_key")


# -- the development switch ------------------------------------------------------------------------


async def test_without_authentication_everyone_is_the_admin_dev_and_it_is_logged_loudly(
    start_gateway: StartGateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await publish_extra(tmp_path)
    with caplog.at_level(logging.WARNING, logger="gateway.app"):
        gw = await start_gateway()  # insecure_no_auth
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "AUTHENTICATION IS OFF" in r.getMessage()]
    assert warnings and "admin" in warnings[0].getMessage()
    for headers in ({}, {"Authorization": "Bearer nonsense"}):
        assert await model_ids(await gw.client.get("/v1/models", headers=headers)) == {BASE} | ALL_ADAPTERS
        for model in ("bob/chat", "alice/x"):  # every private adapter
            resp = await gw.client.post("/v1/completions", json=completion(model), headers=headers)
            assert resp.status == 200, await resp.text()
        assert (await gw.client.post("/admin/sync", headers=headers)).status == 200
        assert (await gw.client.get("/admin/resident", headers=headers)).status == 200
    assert (await gw.client.delete("/v1/adapters/bob/chat")).status == 200
    folder = write_adapter_dir(tmp_path / "dev-upload")
    resp = await gw.client.post("/v1/adapters", data=adapter_form(folder, "gift", owner="carol"))
    assert resp.status == 201 and (await resp.json())["id"] == "carol/gift", await resp.text()
    # The bare name is dev's own namespace.
    await assert_not_found(await gw.client.post("/v1/completions", json=completion("x")))


def test_settings_require_exactly_one_way_to_authenticate(tmp_path: Path) -> None:
    base = {"_env_file": None, "model": write_base_model(tmp_path / "base")}
    keys = {"keys_file": tmp_path / "keys.yaml"}
    proxy = {"trusted_user_header": USER_HEADER}
    dev = {"insecure_no_auth": True}
    for chosen in ({}, {**keys, **proxy}, {**keys, **dev}, {**proxy, **dev}, {**keys, **proxy, **dev}):
        with pytest.raises(ValidationError, match="choose exactly one way to authenticate"):
            ServeSettings(**base, **chosen)
    with pytest.raises(ValidationError, match="needs --trusted-user-header"):
        ServeSettings(**base, **keys, trusted_admin_header=ADMIN_HEADER)
    for chosen in (keys, proxy, dev):
        ServeSettings(**base, **chosen)


# -- namespaces ----------------------------------------------------------------------------------


async def test_a_bare_name_is_the_callers_own_adapter(tenants: Tenants) -> None:
    assert await tenants.served_by("alice", "x") == "alice/x"
    assert await tenants.served_by("alice", "alice/x") == "alice/x"
    assert await tenants.served_by("bob", "chat") == "bob/chat"
    assert await tenants.served_by("carol", BASE) == BASE
    for user, model in (("carol", "x"), ("carol", "chat"), ("alice", "chat"), ("alice", "poems"), ("bob", "x")):
        await assert_not_found(await tenants.complete(user, model))


async def test_the_responses_api_resolves_names_in_the_callers_namespace_too(tenants: Tenants) -> None:
    for user, model, ref in (("alice", "x", "alice/x"), ("bob", "chat", "bob/chat"), ("carol", "bob/pub", "bob/pub")):
        resp = await tenants.request(user, "POST", "/v1/responses", json=response(model))
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert body["model"] == model
        prompt = tenants.gw.engine.generate_calls[-1].prompt_token_ids  # as vLLM rendered the input
        assert body["output"][0]["content"][0]["text"] == expected_text(
            tenants.records[ref].versioned_ref, prompt, 0, 3
        )
    for user, model in (("carol", "x"), ("alice", "chat"), ("alice", "bob/chat"), ("bob", "alice/x")):
        await assert_not_found(await tenants.request(user, "POST", "/v1/responses", json=response(model)))


async def test_another_users_public_adapter_is_usable_by_its_full_name(tenants: Tenants) -> None:
    assert await tenants.served_by("alice", "bob/pub") == "bob/pub"
    assert await tenants.served_by("carol", "bob/pub") == "bob/pub"
    await assert_not_found(await tenants.complete("alice", "pub"))  # = alice/pub
    resp = await tenants.request("alice", "GET", "/v1/adapters/bob/pub")
    assert resp.status == 200 and (await resp.json())["id"] == "bob/pub"


async def fingerprint(resp: ClientResponse, name: str) -> tuple[Any, ...]:
    """What a client can observe of an answer, with the name it asked for blanked out (and the
    values that differ for every answer alike: the date and the random request id)."""
    headers = sorted((k, v) for k, v in resp.headers.items() if k.lower() not in ("date", "x-request-id"))
    return resp.status, headers, (await resp.text()).replace(name, "<NAME>")


PROBES: dict[str, Callable[[Tenants, str], Awaitable[ClientResponse]]] = {
    "completion": lambda t, ref: t.request("alice", "POST", "/v1/completions", json=completion(ref)),
    "stream": lambda t, ref: t.request("alice", "POST", "/v1/completions", json=completion(ref, stream=True)),
    "chat": lambda t, ref: t.request("alice", "POST", "/v1/chat/completions", json=chat(ref)),
    "responses": lambda t, ref: t.request("alice", "POST", "/v1/responses", json=response(ref)),
    "tokenize": lambda t, ref: t.request("alice", "POST", "/tokenize", json={"model": ref, "prompt": "Hello"}),
    "detokenize": lambda t, ref: t.request("alice", "POST", "/detokenize", json={"model": ref, "tokens": [44, 73]}),
    "show": lambda t, ref: t.request("alice", "GET", f"/v1/adapters/{ref}"),
    "delete": lambda t, ref: t.request("alice", "DELETE", f"/v1/adapters/{ref}"),
}


@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize(
    ("hidden", "missing"),
    [("bob/chat", "bob/chaz"), ("bob/poems", "bob/poemz"), ("bob/late", "bob/lame")],
    ids=["private", "private2", "not-yet-synced"],
)
async def test_another_users_private_adapter_is_indistinguishable_from_a_missing_one(
    tenants: Tenants, probe: str, hidden: str, missing: str
) -> None:
    """The same status, headers and body (up to the name itself), and the same store traffic
    (none: a look-up outside one's namespace would answer differently for names that exist)."""
    if hidden == "bob/late":  # published after the last sync: known to the store only
        store = LocalFolderStore(tenants.scratch / "store")
        tenants.records[hidden] = await publish_adapter(store, tenants.scratch, "bob", "late", base_model=BASE)
    answers, traffic = [], []
    for ref in (hidden, missing, hidden):  # twice: the first answer must not have changed anything
        mark = len(tenants.store.calls)
        resp = await PROBES[probe](tenants, ref)
        assert resp.status == 404, await resp.text()
        answers.append(await fingerprint(resp, ref))
        traffic.append(tenants.store.since(mark))
    assert answers[0] == answers[1] == answers[2]
    assert traffic == [[], [], []]
    # ... while the owner still has it, untouched.
    assert await tenants.served_by("bob", hidden) == hidden
    resp = await tenants.request("bob", "GET", f"/v1/adapters/{hidden}")
    assert resp.status == 200, await resp.text()


async def test_in_ones_own_namespace_a_missing_name_is_looked_up_in_the_store(tenants: Tenants) -> None:
    """Published since the last poll: served at once to its owner (that look-up reveals nothing
    the owner may not know), and a missing name costs exactly the same look-up."""
    await publish_adapter(
        LocalFolderStore(tenants.scratch / "store"), tenants.scratch, "alice", "fresh", base_model=BASE
    )
    traffic = []
    for model in ("fresh", "frezh"):
        mark = len(tenants.store.calls)
        await tenants.complete("alice", model)
        traffic.append([call for call in tenants.store.since(mark) if call[0] == "get_record"])
    assert traffic == [[("get_record", ("alice", "fresh"))], [("get_record", ("alice", "frezh"))]]


async def test_lists_show_own_and_public_adapters_and_admins_see_all(tenants: Tenants) -> None:
    for user, visible in VISIBLE.items():
        assert await model_ids(await tenants.request(user, "GET", "/v1/models")) == {BASE} | visible, user
        assert await model_ids(await tenants.request(user, "GET", "/v1/adapters")) == visible, user


async def test_an_upload_into_another_namespace_is_403_and_stores_nothing(tenants: Tenants) -> None:
    before = sorted(await LocalFolderStore(tenants.scratch / "store").list_stamps())
    for owner in ("bob", "carol", "alice/../bob", "../bob"):
        resp = await tenants.upload("alice", "sneaky", owner=owner)
        await assert_error(resp, 403, param="owner", code="permission_denied")
    assert [c for c in tenants.store.calls if c[0] in STORE_WRITES] == []
    assert sorted(await LocalFolderStore(tenants.scratch / "store").list_stamps()) == before
    await assert_not_found(await tenants.complete("bob", "sneaky"))


async def test_an_upload_goes_into_the_callers_own_namespace(tenants: Tenants) -> None:
    for fields, name in (({}, "mine"), ({"owner": "alice"}, "also-mine")):
        resp = await tenants.upload("alice", name, **fields)
        assert resp.status == 201, await resp.text()
        assert (await resp.json())["id"] == f"alice/{name}"
        assert (await tenants.complete("alice", name)).status == 200
        await assert_not_found(await tenants.complete("bob", f"alice/{name}"))  # private by default


async def test_admins_may_upload_and_delete_anywhere(tenants: Tenants) -> None:
    resp = await tenants.upload(ADMIN, "gift", owner="bob")
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["id"] == "bob/gift"
    assert (await tenants.complete("bob", "gift")).status == 200
    await assert_not_found(await tenants.complete("alice", "bob/gift"))
    for ref in ("bob/chat", "alice/x", "bob/pub"):
        resp = await tenants.request(ADMIN, "DELETE", f"/v1/adapters/{ref}")
        assert resp.status == 200, await resp.text()
        owner = ref.split("/")[0]
        await assert_not_found(await tenants.complete(owner, ref))
        assert await LocalFolderStore(tenants.scratch / "store").get_record(*ref.split("/")) is None


async def test_deleting_is_for_owners_only(tenants: Tenants) -> None:
    await assert_not_found(await tenants.request("alice", "DELETE", "/v1/adapters/bob/chat"))
    await assert_error(await tenants.request("alice", "DELETE", "/v1/adapters/bob/pub"), 403, code="permission_denied")
    assert [c for c in tenants.store.calls if c[0] in STORE_WRITES] == []
    assert await tenants.served_by("carol", "bob/pub") == "bob/pub"  # still served to everyone
    assert await tenants.served_by("bob", "chat") == "bob/chat"

    resp = await tenants.request("alice", "DELETE", "/v1/adapters/alice/x")
    assert resp.status == 200 and await resp.json() == {"id": "alice/x", "object": "adapter", "deleted": True}
    await assert_not_found(await tenants.complete("alice", "x"))
    assert await LocalFolderStore(tenants.scratch / "store").get_record("alice", "x") is None


@pytest.mark.parametrize(("method", "path"), [("POST", "/admin/sync"), ("GET", "/admin/resident")])
async def test_admin_endpoints_are_for_admins(tenants: Tenants, method: str, path: str) -> None:
    for user in USERS:
        await assert_error(await tenants.request(user, method, path), 403, code="permission_denied")
    assert [c for c in tenants.store.calls if c[0] == "list_stamps"] == []  # a refused sync touched nothing
    resp = await tenants.request(ADMIN, method, path)
    assert resp.status == 200, await resp.text()


# -- the prefix cache --------------------------------------------------------------------


async def test_each_tenant_has_its_own_prefix_cache_salt(tenants: Tenants) -> None:
    """The base model is shared, so its prefix cache would be: a salt per tenant keeps one tenant's
    prompts from warming (and so timing) another's; a salt the caller sends cannot name another's."""

    async def salt(user: str, **fields: Any) -> str:
        body = completion(BASE, "The same long prefix, then a question", **fields)
        resp = await tenants.request(user, "POST", "/v1/completions", json=body)
        assert resp.status == 200, await resp.text()
        call = tenants.gw.engine.generate_calls[-1]
        assert call.cache_salt
        return call.cache_salt

    alice = await salt("alice")
    assert await salt("alice") == alice  # one tenant shares its own cached prefixes
    bob = await salt("bob")
    assert bob != alice
    assert await salt("bob", cache_salt=alice) not in (alice, bob)  # choosing alice's salt does not reach it
    assert await salt("alice", cache_salt="mine") != alice  # a caller's own salt splits within the tenant


async def test_prefix_cache_sharing_across_tenants_when_turned_off(start_gateway: StartGateway) -> None:
    gw = await start_gateway(prefix_cache_per_tenant=False)
    assert (await gw.post("/v1/completions", completion(BASE, "Hi"))).status == 200
    assert gw.engine.generate_calls[-1].cache_salt is None
