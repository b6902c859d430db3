"""A keys file edited into an invalid state: the entries that are wrong fail closed (a revocation in
the same edit applies), a file that cannot be read as a list of entries is refused whole, and both
are reported by /readyz and a metric. `keys add` and `keys rm` run at once lose nothing."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import gateway.auth.keys as keys_module
from gateway.auth.keys import KeyRing, Principal, add_key, remove_keys
from gateway.auth.middleware import AUTHENTICATOR
from tests.unit.harness import StartGateway


def entries(keys_file: Path) -> list[dict[str, Any]]:
    return yaml.safe_load(keys_file.read_text())["keys"]


def write_entries(keys_file: Path, data: list[dict[str, Any]]) -> None:
    keys_file.write_text(yaml.safe_dump({"keys": data}))


def test_a_revocation_edited_together_with_a_typo_applies(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    alice, _ = add_key(keys_file, "alice")
    bob, _ = add_key(keys_file, "bob")
    carol, _ = add_key(keys_file, "carol")
    ring = KeyRing(keys_file)
    # One edit: alice revoked, and a typo in bob's entry.
    edited = [e for e in entries(keys_file) if e["user"] != "alice"]
    next(e for e in edited if e["user"] == "bob")["sha256"] += "x"
    write_entries(keys_file, edited)
    ring.reload_if_changed()
    assert ring.principal_for(alice) is None  # the revocation applies
    assert ring.principal_for(bob) is None  # the broken entry fails closed
    assert ring.principal_for(carol) == Principal("carol")  # the untouched one works on
    assert (ring.status.valid, ring.status.refused_entries) == (False, 1)


def test_an_entry_made_invalid_in_any_field_lets_no_one_in(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    bob, _ = add_key(keys_file, "bob")
    ring = KeyRing(keys_file)
    [entry] = entries(keys_file)
    for field, value in (("user", "../bob"), ("id", "nothex"), ("admin", "maybe"), ("extra", 1)):
        write_entries(keys_file, [{**entry, field: value}])
        ring.reload_if_changed()
        assert ring.principal_for(bob) is None, field
        assert ring.status.refused_entries == 1, field
        write_entries(keys_file, [entry])
        ring.reload_if_changed()
        assert ring.principal_for(bob) == Principal("bob") and ring.status.valid


def test_two_entries_with_one_hash_are_both_refused(tmp_path: Path) -> None:
    """Which user such a key stands for would be a guess."""
    keys_file = tmp_path / "keys.yaml"
    bob, _ = add_key(keys_file, "bob")
    ring = KeyRing(keys_file)
    [entry] = entries(keys_file)
    write_entries(keys_file, [entry, {**entry, "user": "mallory", "admin": True}])
    ring.reload_if_changed()
    assert ring.principal_for(bob) is None and ring.status.refused_entries == 2


def test_a_file_refused_whole_keeps_the_previous_keys_and_says_so(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    alice, _ = add_key(keys_file, "alice")
    ring = KeyRing(keys_file)
    keys_file.write_bytes(keys_file.read_bytes() + b"\n  - {id: ")  # YAML syntax: no entry can be told
    ring.reload_if_changed()
    assert ring.principal_for(alice) == Principal("alice")
    assert ring.status.valid is False and ring.status.file_refused is True


async def test_readyz_and_metrics_report_a_broken_keys_file(start_gateway: StartGateway, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    add_key(keys_file, "alice")
    gw = await start_gateway(keys_file=keys_file)
    resp = await gw.client.get("/readyz")
    assert (await resp.json())["keys_file"] == {"valid": True, "refused_entries": 0, "file_refused": False}
    [entry] = entries(keys_file)
    write_entries(keys_file, [{**entry, "user": "../alice"}])
    gw.app[AUTHENTICATOR].keys.reload_if_changed()
    resp = await gw.client.get("/readyz")
    body = await resp.json()
    assert resp.status == 200  # still serving the keys that are valid
    assert body["keys_file"] == {"valid": False, "refused_entries": 1, "file_refused": False}
    assert "../alice" not in await resp.text()  # the file's content stays out of an anonymous answer
    metrics = await (await gw.client.get("/metrics")).text()
    assert "lora_gateway_keys_file_valid 0.0" in metrics
    assert "lora_gateway_keys_file_refused_entries 1.0" in metrics


def test_concurrent_adds_and_removes_lose_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys_file = tmp_path / "keys.yaml"
    doomed = [add_key(keys_file, f"old{i}")[1].id for i in range(4)]
    read = keys_module.read_keys_file

    def slow_read(path: Path) -> keys_module.KeysFileModel:
        model = read(path)
        time.sleep(0.05)  # widen the window between reading the file and writing it back
        return model

    monkeypatch.setattr(keys_module, "read_keys_file", slow_read)
    added: list[str] = []
    work = [threading.Thread(target=lambda i=i: added.append(add_key(keys_file, f"new{i}")[0])) for i in range(8)]
    work += [threading.Thread(target=remove_keys, args=(keys_file,), kwargs={"key_id": k}) for k in doomed]
    for thread in work:
        thread.start()
    for thread in work:
        thread.join(30)
    users = sorted(e.user for e in read(keys_file).keys)
    assert users == sorted(f"new{i}" for i in range(8))
    ring = KeyRing(keys_file)
    assert all(ring.principal_for(key) is not None for key in added)
    assert not list(tmp_path.glob(".keys.yaml.*"))  # no temporary files left behind
