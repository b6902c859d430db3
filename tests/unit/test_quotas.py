"""Per-tenant bounds on the real app (fake engine): adapters per user, versions kept per adapter
(old ones collected once no replica can still be fetching them), and a paginated listing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters_manifest import layout
from tests.fakes import write_adapter_dir
from tests.unit.harness import ADAPTERS, Gateway, StartGateway, adapter_form, assert_error, until


async def upload(gw: Gateway, tmp_path: Path, name: str, payload: str, **fields: str) -> Any:
    folder = write_adapter_dir(tmp_path / f"{name}-{payload}", payload=payload.encode())
    form = adapter_form(folder, name=name)
    for key, value in fields.items():
        form.add_field(key, value)
    return await gw.client.post("/v1/adapters", data=form)


def stored_versions(gw: Gateway, owner: str, name: str) -> set[str]:
    folder = gw.store.root / layout.ADAPTERS_DIR / owner / name
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


# -- adapters per user -----------------------------------------------------------------------


async def test_adapters_per_user_are_bounded_and_replacing_one_is_not_a_new_one(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gw = await start_gateway(max_adapters_per_user=2)
    for name in ("one", "two"):
        assert (await upload(gw, tmp_path, name, "v1")).status == 201
    error = await assert_error(await upload(gw, tmp_path, "three", "v1"), 403, param="name", code="quota_exceeded")
    assert "2 adapters" in error["message"]
    assert await gw.store.get_record("dev", "three") is None
    assert (await upload(gw, tmp_path, "two", "v2")).status == 201  # a new version of one it has
    assert (await gw.client.delete("/v1/adapters/dev/one")).status == 200
    assert (await upload(gw, tmp_path, "three", "v1")).status == 201  # room again


# -- versions kept per adapter -----------------------------------------------------------------


async def test_replaced_versions_are_collected_once_their_grace_period_is_over(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gw = await start_gateway(version_grace_s=0.5, max_versions_per_adapter=10)
    versions = []
    for n in range(5):
        resp = await upload(gw, tmp_path, "churn", f"v{n}")
        assert resp.status == 201, await resp.text()
        versions.append((await resp.json())["version"])
    current = versions[-1]
    await until(lambda: stored_versions(gw, "dev", "churn") == {current}, timeout_s=10.0)
    record = await gw.store.get_record("dev", "churn")
    assert record is not None and record.version == current and await gw.store.has_version(record)
    resp = await gw.post("/v1/completions", {"model": "dev/churn", "prompt": "x", "max_tokens": 1})
    assert resp.status == 200, await resp.text()


async def test_versions_still_in_their_grace_period_bound_how_often_an_adapter_is_replaced(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gw = await start_gateway(version_grace_s=3600, max_versions_per_adapter=3)
    for n in range(3):
        assert (await upload(gw, tmp_path, "churn", f"v{n}")).status == 201
    resp = await upload(gw, tmp_path, "churn", "v3")
    error = await assert_error(resp, 429, param="name", code="quota_exceeded")
    assert "3 versions" in error["message"] and int(resp.headers["Retry-After"]) > 0
    assert len(stored_versions(gw, "dev", "churn")) == 3


# -- the listing -------------------------------------------------------------------------------


async def test_the_adapter_listing_is_paginated(gw: Gateway, tmp_path: Path) -> None:
    for n in range(5):
        assert (await upload(gw, tmp_path, f"a{n}", "v1")).status == 201
    seen, after, pages = [], None, 0
    while True:
        query = {"limit": "2", **({"after": after} if after else {})}
        resp = await gw.client.get("/v1/adapters", params=query)
        assert resp.status == 200, await resp.text()
        page = await resp.json()
        assert len(page["data"]) <= 2
        seen += [a["id"] for a in page["data"]]
        pages += 1
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert sorted(seen) == seen
    assert set(seen) == {f"dev/a{n}" for n in range(5)} | set(ADAPTERS)
    assert pages == 4  # 7 adapters, 2 a page


async def test_the_listing_has_a_default_and_a_largest_page(start_gateway: StartGateway, tmp_path: Path) -> None:
    gw = await start_gateway(max_list_page=3)
    for n in range(4):
        assert (await upload(gw, tmp_path, f"a{n}", "v1")).status == 201
    page = await (await gw.client.get("/v1/adapters")).json()
    assert len(page["data"]) == 3 and page["has_more"] is True
    for bad in ("0", "-1", "4", "x", "\u00b2", "1.5", ""):
        await assert_error(await gw.client.get("/v1/adapters", params={"limit": bad}), 400, param="limit")
