"""Adapter routes (example utterances `model: "auto"` will route by) on every upload path: their
limits, their part in the version, the reserved name `auto`, the CLI flags and the HTTP field."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse

from adapter_training.cli import main as train_main
from adapters_manifest import cli as adapters_cli
from adapters_manifest.local_store import LocalFolderStore
from adapters_manifest.publish import publish, record_for, validated_record
from adapters_manifest.record import (
    MAX_DESCRIPTION_CHARS,
    MAX_ROUTE_CHARS,
    MAX_ROUTES,
    AdapterFile,
    RoutingError,
    check_name,
    check_routing,
    check_upload_name,
    content_version,
)
from gateway.api.adapters import MAX_FIELD_BYTES, MAX_ROUTES_FIELD_BYTES
from gateway.auth.keys import Principal
from gateway.catalog import AdapterCatalog
from tests.fakes import publish_adapter, write_adapter_dir
from tests.unit.harness import Gateway, adapter_form, assert_error


def distinct_routes(count: int, chars: int, char: str = "x") -> list[str]:
    """`count` different routes of exactly `chars` characters each."""
    return [f"{number:03d}".rjust(chars, char) for number in range(count)]


# -- check_routing: the limits ----------------------------------------------------------------


def test_the_limits_are_the_documented_ones() -> None:
    assert (MAX_ROUTES, MAX_ROUTE_CHARS, MAX_DESCRIPTION_CHARS) == (32, 300, 500)


def test_routes_and_a_description_at_their_limits_are_accepted() -> None:
    routes = distinct_routes(MAX_ROUTES, MAX_ROUTE_CHARS)
    description = "d" * MAX_DESCRIPTION_CHARS
    assert check_routing(description, routes) == (description, routes)


def test_one_character_routes_and_no_routes_are_accepted() -> None:
    assert check_routing("", ["a", "b"]) == ("", ["a", "b"])
    assert check_routing("", []) == ("", [])
    assert check_routing("", ()) == ("", [])


def test_surrounding_whitespace_is_stripped_before_the_limits_apply() -> None:
    padded = "  " + "r" * MAX_ROUTE_CHARS + "\n"
    description = "\t" + "d" * MAX_DESCRIPTION_CHARS + "  "
    assert check_routing(description, [padded, " inner  space "]) == (
        "d" * MAX_DESCRIPTION_CHARS,
        ["r" * MAX_ROUTE_CHARS, "inner  space"],
    )
    assert check_routing("   ", []) == ("", [])


@pytest.mark.parametrize(
    ("description", "routes", "field", "message"),
    [
        ("", distinct_routes(MAX_ROUTES + 1, 5), "routes", "33 routes; at most 32"),
        ("", ["ok", "r" * (MAX_ROUTE_CHARS + 1)], "routes", "route 2 is 301 characters; at most 300"),
        ("", ["ok", "fine", " " + "r" * 412 + " "], "routes", "route 3 is 412 characters; at most 300"),
        ("", ["ok", ""], "routes", "route 2 is empty"),
        ("", [" \n\t "], "routes", "route 1 is empty"),
        ("", ["book a flight", "cancel it", "book a flight"], "routes", "route 3 repeats route 1"),
        ("", ["book a flight", "  book a flight "], "routes", "route 2 repeats route 1"),
        ("", ["ok", 7], "routes", "route 2 is not a string"),
        ("", "book a flight", "routes", "routes must be a list of strings, not one string"),
        ("d" * (MAX_DESCRIPTION_CHARS + 1), [], "description", "description is 501 characters; at most 500"),
    ],
    ids=[
        "too many",
        "one over",
        "far over, stripped",
        "empty",
        "blank",
        "duplicate",
        "duplicate once stripped",
        "not a string",
        "one string",
        "long description",
    ],
)
def test_routing_over_its_limits_is_refused_naming_the_problem(
    description: str, routes: Any, field: str, message: str
) -> None:
    with pytest.raises(RoutingError) as refused:
        check_routing(description, routes)
    assert str(refused.value) == message
    assert refused.value.field == field
    assert isinstance(refused.value, ValueError)  # the CLI's and callers' one kind of refusal


# -- versions -----------------------------------------------------------------------------------

FILES = [
    AdapterFile(name="adapter_config.json", sha256="a" * 64, size=10),
    AdapterFile(name="adapter_model.safetensors", sha256="b" * 64, size=20),
]
VERSION_BEFORE_ROUTES = "a169fa4b85848dc2"  # what content_version gave these files before routes existed


def test_without_description_or_routes_the_version_is_the_one_from_before_routes() -> None:
    assert content_version(FILES) == VERSION_BEFORE_ROUTES
    assert content_version(FILES, "", []) == VERSION_BEFORE_ROUTES
    assert content_version(list(reversed(FILES)), "", ()) == VERSION_BEFORE_ROUTES


def test_routes_and_description_are_part_of_the_version_when_set() -> None:
    routed = content_version(FILES, "", ["book a flight"])
    assert routed != VERSION_BEFORE_ROUTES
    assert content_version(FILES, "", ["book a flight"]) == routed
    assert content_version(FILES, "", ["cancel a flight"]) != routed
    assert content_version(FILES, "", ["book a flight", "cancel a flight"]) != routed
    described = content_version(FILES, "travel", [])
    assert described not in (VERSION_BEFORE_ROUTES, routed)
    assert content_version(FILES, "travel", ["book a flight"]) not in (described, routed)
    # No text can pass for another split between description and routes.
    assert content_version(FILES, "a", ["b"]) != content_version(FILES, "", ["a", "b"])


def test_record_for_keeps_old_versions_and_makes_a_new_one_when_routes_change(tmp_path: Path) -> None:
    folder = write_adapter_dir(tmp_path / "a")
    plain = record_for(folder, "alice", "travel", base_model="b")
    assert plain.version == content_version(plain.files) and plain.routes == []
    same_plain = record_for(folder, "alice", "travel", base_model="b", description="  ", routes=())
    assert same_plain.version == plain.version

    routed = record_for(folder, "alice", "travel", base_model="b", routes=["book a flight", "find a hotel"])
    assert routed.version != plain.version and routed.files == plain.files
    assert routed.routes == ["book a flight", "find a hotel"]
    again = record_for(folder, "alice", "travel", base_model="b", routes=[" book a flight", "find a hotel\n"])
    assert again.version == routed.version and again.routes == routed.routes
    other = record_for(folder, "alice", "travel", base_model="b", routes=["book a flight"])
    assert other.version not in (routed.version, plain.version)
    described = record_for(folder, "alice", "travel", base_model="b", description="trips")
    assert described.version != plain.version and described.description == "trips"


def test_record_for_and_validated_record_refuse_routes_over_the_limits(tmp_path: Path) -> None:
    folder = write_adapter_dir(tmp_path / "a")
    with pytest.raises(RoutingError, match="route 2 repeats route 1"):
        record_for(folder, "alice", "travel", base_model="b", routes=["x", "x"])
    with pytest.raises(RoutingError, match="description is 501 characters"):
        validated_record(folder, "alice", "travel", base=None, base_model="b", description="d" * 501)
    record = validated_record(folder, "alice", "travel", base=None, base_model="b", routes=[" a ", "b"])
    assert record.routes == ["a", "b"]


# -- the reserved name ----------------------------------------------------------------------------


def test_auto_is_reserved_for_uploads_only() -> None:
    with pytest.raises(ValueError, match="the adapter name 'auto' is reserved"):
        check_upload_name("auto")
    assert check_upload_name("autos") == "autos" and check_upload_name("auto-1") == "auto-1"
    assert check_name("auto") == "auto"  # look-ups still parse it (they find nothing)
    with pytest.raises(ValueError, match="invalid name"):
        check_upload_name("Auto")  # still a name first


def test_validated_record_refuses_the_reserved_name(tmp_path: Path) -> None:
    folder = write_adapter_dir(tmp_path / "a")
    with pytest.raises(ValueError, match="reserved"):
        validated_record(folder, "alice", "auto", base=None, base_model="b")


# -- records already in a store --------------------------------------------------------------------


async def test_a_stored_record_over_the_limits_still_parses_and_is_served(tmp_path: Path) -> None:
    """The limits bind uploads: a record written by other means (or older limits) is not lost."""
    store = LocalFolderStore(tmp_path / "store")
    folder = write_adapter_dir(tmp_path / "a")
    loose = record_for(folder, "alice", "loose", base_model="fake-base").model_copy(
        update={"routes": ["same", "same", "", "r" * 1000, *distinct_routes(40, 3)], "description": "d" * 2000}
    )
    await publish(store, folder, loose)
    assert await store.get_record("alice", "loose") == loose
    catalog = AdapterCatalog(store, "fake-base")
    assert (await catalog.sync()).listed == 1
    assert await catalog.resolve("alice/loose", Principal("alice")) == loose


async def test_a_record_whose_routes_do_not_parse_fails_the_sync_like_any_bad_record(tmp_path: Path) -> None:
    """As for any record that does not parse: the sync fails, says why, and what was known is
    still served."""
    store = LocalFolderStore(tmp_path / "store")
    known = await publish_adapter(store, tmp_path, "alice", "known")
    bad = await publish_adapter(store, tmp_path, "alice", "bad")
    catalog = AdapterCatalog(store, "fake-base")
    await catalog.sync()
    record_path = store.root / "manifest" / "alice" / "bad.json"
    record_path.write_text(json.dumps({**bad.model_dump(mode="json"), "routes": "not a list"}))

    with pytest.raises(ValueError, match="routes"):
        await catalog.sync()
    assert catalog.last_error is not None and "routes" in catalog.last_error
    assert catalog.records() == [bad, known]  # unchanged: the next good sync picks the record up
    assert await catalog.resolve("alice/known", Principal("alice")) == known


# -- the CLI --------------------------------------------------------------------------------------


def cli(store: Path, *argv: str) -> int:
    return adapters_cli.main([*argv, "--store", str(store)])


def push(store: Path, folder: Path, name: str, *extra: str) -> int:
    return cli(store, "push", str(folder), "--owner", "carol", "--name", name, *extra)


def test_push_stores_route_flags_then_the_routes_files_lines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = tmp_path / "store"
    routes_file = tmp_path / "routes.txt"
    routes_file.write_text("find a hotel\n\n   \n  rent a car  \r\nbook a table\n")
    folder = write_adapter_dir(tmp_path / "a")
    flags = ("--route", "book a flight", "--route", " cancel my flight ", "--routes-file", str(routes_file))
    assert push(store, folder, "travel", *flags, "--description", " trips ") == 0
    record = asyncio.run(LocalFolderStore(store).get_record("carol", "travel"))
    assert record is not None
    assert record.routes == ["book a flight", "cancel my flight", "find a hotel", "rent a car", "book a table"]
    assert record.description == "trips"
    assert record.version != content_version(record.files)
    assert f"pushed carol/travel version {record.version}" in capsys.readouterr().out

    assert cli(store, "show", "carol/travel") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["routes"] == record.routes and shown["version"] == record.version

    assert cli(store, "list") == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["ADAPTER", "VERSION", "RANK", "VISIBILITY", "BYTES", "CREATED", "ROUTES", "DESCRIPTION"]
    assert row.split()[0] == "carol/travel" and row.split()[-2:] == ["5", "trips"]


def test_push_without_routes_keeps_the_files_version(tmp_path: Path) -> None:
    store, folder = tmp_path / "store", write_adapter_dir(tmp_path / "a")
    assert push(store, folder, "plain") == 0
    record = asyncio.run(LocalFolderStore(store).get_record("carol", "plain"))
    assert record is not None and record.routes == [] and record.version == content_version(record.files)


def test_pushing_other_routes_is_a_new_version_and_the_same_ones_are_not(tmp_path: Path) -> None:
    store, folder = tmp_path / "store", write_adapter_dir(tmp_path / "a")

    def version_after(*flags: str) -> str:
        assert push(store, folder, "travel", *flags) == 0
        record = asyncio.run(LocalFolderStore(store).get_record("carol", "travel"))
        assert record is not None
        return record.version

    first = version_after("--route", "book a flight")
    assert version_after("--route", "book a flight") == first
    assert version_after("--route", "book a train") != first


@pytest.mark.parametrize(
    ("flags", "refusal"),
    [
        (("--route", ""), "refused: route 1 is empty"),
        (("--route", "a", "--route", "a"), "refused: route 2 repeats route 1"),
        (("--route", "r" * 301), "refused: route 1 is 301 characters; at most 300"),
        (tuple(f for n in range(33) for f in ("--route", f"r{n}")), "refused: 33 routes; at most 32"),
        (("--description", "d" * 501), "refused: description is 501 characters; at most 500"),
        (("--routes-file", "missing.txt"), "refused: --routes-file missing.txt: No such file or directory"),
    ],
    ids=["empty", "duplicate", "too long", "too many", "long description", "missing file"],
)
def test_push_refuses_bad_routes_in_one_line_and_stores_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, flags: tuple[str, ...], refusal: str
) -> None:
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    assert push(store, write_adapter_dir(tmp_path / "a"), "travel", *flags) == 2
    assert capsys.readouterr().err.splitlines() == [refusal]
    assert asyncio.run(LocalFolderStore(store).get_record("carol", "travel")) is None


def test_a_routes_file_over_the_limits_or_not_text_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store, folder = tmp_path / "store", write_adapter_dir(tmp_path / "a")
    routes_file = tmp_path / "routes.txt"
    routes_file.write_text("".join(f"utterance {n}\n\n" for n in range(MAX_ROUTES)))  # blank lines do not count
    assert push(store, folder, "travel", "--routes-file", str(routes_file)) == 0
    assert push(store, folder, "travel", "--routes-file", str(routes_file), "--route", "one more") == 2
    assert capsys.readouterr().err.splitlines()[-1] == "refused: 33 routes; at most 32"
    routes_file.write_bytes(b"\xff\xfe not utf-8\n")
    assert push(store, folder, "travel", "--routes-file", str(routes_file)) == 2
    assert capsys.readouterr().err.splitlines() == [f"refused: --routes-file {routes_file}: not UTF-8 text"]
    assert push(store, folder, "travel", "--routes-file", str(tmp_path)) == 2  # a folder
    assert capsys.readouterr().err.splitlines() == [f"refused: --routes-file {tmp_path}: Is a directory"]


def test_push_and_register_refuse_the_reserved_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = tmp_path / "store"
    assert push(store, write_adapter_dir(tmp_path / "a"), "auto") == 2
    err = capsys.readouterr().err
    assert err.startswith("refused: the adapter name 'auto' is reserved") and err.count("\n") == 1
    assert cli(store, "register", "s3://bucket/x", "--owner", "carol", "--name", "auto") == 2
    assert capsys.readouterr().err.startswith("refused: the adapter name 'auto' is reserved")
    assert asyncio.run(LocalFolderStore(store).list_stamps()) == {}


@pytest.mark.parametrize(
    ("flags", "refusal"),
    [
        (("--name", "auto"), "error: the adapter name 'auto' is reserved"),
        (("--name", "travel", "--route", ""), "error: route 1 is empty"),
    ],
    ids=["reserved name", "bad route"],
)
def test_train_push_refuses_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture, flags: tuple[str, ...], refusal: str
) -> None:
    argv = [str(tmp_path / "no-data.jsonl"), "--base", str(tmp_path / "no-base"), "--out", str(tmp_path / "o")]
    assert train_main([*argv, "--push", "--owner", "carol", *flags, "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(refusal) and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


# -- the HTTP upload -------------------------------------------------------------------------------


async def upload(gw: Gateway, name: str = "travel", **fields: str) -> ClientResponse:
    folder = write_adapter_dir(gw.scratch / f"upload-{name}")
    return await gw.client.post("/v1/adapters", data=adapter_form(folder, name, **fields))


async def test_an_upload_with_routes_stores_and_shows_them(gw: Gateway) -> None:
    routes = ["book a flight", "  cancel my flight ", "find a hotel"]
    resp = await upload(gw, routes=json.dumps(routes), description=" trips ")
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert created["routes"] == ["book a flight", "cancel my flight", "find a hotel"]
    assert created["description"] == "trips"
    record = await gw.store.get_record("dev", "travel")
    assert record is not None and record.routes == created["routes"] and record.version == created["version"]
    shown = await (await gw.client.get("/v1/adapters/dev/travel")).json()
    assert shown["routes"] == created["routes"] and shown["version"] == created["version"]
    listed = await (await gw.client.get("/v1/adapters")).json()
    assert [a["routes"] for a in listed["data"] if a["id"] == "dev/travel"] == [created["routes"]]


async def test_an_upload_without_routes_has_none_and_the_files_version(gw: Gateway) -> None:
    resp = await upload(gw)
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    record = await gw.store.get_record("dev", "travel")
    assert created["routes"] == [] and record is not None and record.version == content_version(record.files)
    resp = await upload(gw, routes="[]")
    assert resp.status == 201 and (await resp.json())["version"] == created["version"]


async def test_uploading_other_routes_is_a_new_version_and_the_same_ones_are_not(gw: Gateway) -> None:
    async def version_of(routes: list[str]) -> str:
        resp = await upload(gw, routes=json.dumps(routes))
        assert resp.status == 201, await resp.text()
        return (await resp.json())["version"]

    first = await version_of(["book a flight"])
    assert await version_of(["book a flight"]) == first
    assert await version_of(["book a train"]) != first


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"routes": "book a flight"}, "routes", "Form field 'routes' is not valid JSON: send a JSON array of strings."),
        ({"routes": ""}, "routes", "Form field 'routes' is not valid JSON"),
        ({"routes": "[" * 20_000}, "routes", "Form field 'routes' is not valid JSON"),
        ({"routes": '"book a flight"'}, "routes", "Form field 'routes' must be a JSON array of strings."),
        ({"routes": '{"a": "b"}'}, "routes", "Form field 'routes' must be a JSON array of strings."),
        ({"routes": '["ok", 1]'}, "routes", "Form field 'routes' must be a JSON array of strings."),
        ({"routes": '["ok", ["nested"]]'}, "routes", "Form field 'routes' must be a JSON array of strings."),
        ({"routes": '["ok", " "]'}, "routes", "route 2 is empty"),
        ({"routes": '["a", "b", "a"]'}, "routes", "route 3 repeats route 1"),
        ({"routes": json.dumps(["r" * 301])}, "routes", "route 1 is 301 characters; at most 300"),
        ({"routes": json.dumps(distinct_routes(33, 4))}, "routes", "33 routes; at most 32"),
        ({"description": "d" * 501}, "description", "description is 501 characters; at most 500"),
    ],
    ids=[
        "not json",
        "empty",
        "nested too deep",
        "a string",
        "an object",
        "a number in it",
        "a list in it",
        "blank route",
        "duplicate",
        "too long",
        "too many",
        "long description",
    ],
)
async def test_bad_routes_are_a_400_naming_the_field_and_nothing_is_stored(
    gw: Gateway, fields: dict[str, str], param: str, message: str
) -> None:
    error = await assert_error(await upload(gw, **fields), 400, param=param, code=None)
    assert error["message"].startswith(message)
    assert error["type"] == "invalid_request_error"
    assert await gw.store.get_record("dev", "travel") is None


async def test_the_routes_field_fits_the_most_routes_even_fully_escaped(gw: Gateway) -> None:
    # 300 characters outside the BMP each: JSON's ASCII escapes make them 12 bytes apiece.
    routes = [chr(0x1F600 + n) * MAX_ROUTE_CHARS for n in range(MAX_ROUTES)]
    raw = json.dumps(routes, indent=2)
    assert len(raw.encode()) > MAX_FIELD_BYTES * 20  # far beyond what other fields may hold
    resp = await upload(gw, routes=raw)
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["routes"] == routes


async def test_the_fields_keep_their_byte_limits(gw: Gateway) -> None:
    error = await assert_error(await upload(gw, routes=" " * (MAX_ROUTES_FIELD_BYTES + 1)), 413)
    assert "Form field 'routes' is larger than" in error["message"]
    error = await assert_error(await upload(gw, description="d" * (MAX_FIELD_BYTES + 1)), 413)
    assert f"Form field 'description' is larger than {MAX_FIELD_BYTES} bytes." == error["message"]
    assert await gw.store.get_record("dev", "travel") is None


async def test_an_upload_named_auto_is_refused(gw: Gateway) -> None:
    error = await assert_error(await upload(gw, name="auto"), 400, param="name")
    assert error["message"].startswith("the adapter name 'auto' is reserved")
    assert await gw.store.get_record("dev", "auto") is None
    resp = await upload(gw, name="autopilot")
    assert resp.status == 201, await resp.text()


async def test_the_upload_form_documents_routes(gw: Gateway) -> None:
    document = await (await gw.client.get("/openapi.json")).json()
    form = document["paths"]["/v1/adapters"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert "routes" in form["properties"]
    assert "JSON array" in form["properties"]["routes"]["description"]
    assert "500" in form["properties"]["description"]["description"]
