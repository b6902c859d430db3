"""API keys: `lora-gateway keys add|list|rm` keeps only hashes, and a running KeyRing follows the
file (keys added and revoked take effect without a restart; a broken file changes nothing)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
import yaml

from gateway.auth.keys import KEY_PREFIX, KeyRing, Principal, add_key, read_keys_file, remove_keys
from gateway.cli import main

# No ambient LORA_GATEWAY_KEYS_FILE reaches these tests: tests/unit/conftest.py clears LORA_GATEWAY_*.


def keys_cli(capsys: pytest.CaptureFixture[str], keys_file: Path, *args: str) -> tuple[int, str, str]:
    """Run `lora-gateway keys ARGS --keys-file FILE`; (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main(["keys", *args, "--keys-file", str(keys_file)])
    except SystemExit as exc:  # argparse's errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def cli_add(capsys: pytest.CaptureFixture[str], keys_file: Path, user: str, *flags: str) -> str:
    code, out, err = keys_cli(capsys, keys_file, "add", user, *flags)
    assert code == 0, err
    return out.splitlines()[-1]


# -- the CLI -----------------------------------------------------------------------------------


def test_keys_add_stores_only_the_hash_and_prints_the_key_alone_on_the_last_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.yaml"
    code, out, _ = keys_cli(capsys, keys_file, "add", "alice", "--label", "laptop")
    assert code == 0
    key = out.splitlines()[-1]
    assert key == key.strip() and key.startswith(KEY_PREFIX) and " " not in key
    assert len(key) >= len(KEY_PREFIX) + 40  # 32 random bytes, url-safe base64
    assert out.count(key) == 1  # shown once, on its own line

    text = keys_file.read_text()
    assert key not in text and key.removeprefix(KEY_PREFIX) not in text
    digest = hashlib.sha256(key.encode()).hexdigest()
    (entry,) = yaml.safe_load(text)["keys"]
    assert entry == {"id": digest[:8], "user": "alice", "sha256": digest, "admin": False, "label": "laptop"}
    assert f"Added key {digest[:8]} for user alice" in out
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600  # a file of credentials' hashes: owner only

    assert KeyRing(keys_file).principal_for(key) == Principal("alice", admin=False)


def test_keys_add_admin(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    key = cli_add(capsys, keys_file, "root", "--admin")
    assert KeyRing(keys_file).principal_for(key) == Principal("root", admin=True)


def test_every_key_is_new(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    keys = [cli_add(capsys, keys_file, "alice") for _ in range(5)]
    assert len(set(keys)) == 5
    ring = KeyRing(keys_file)
    assert all(ring.principal_for(k) == Principal("alice") for k in keys)


def test_keys_file_from_the_environment(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys_file = tmp_path / "from-env.yaml"
    monkeypatch.setenv("LORA_GATEWAY_KEYS_FILE", str(keys_file))
    assert main(["keys", "add", "alice"]) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    assert KeyRing(keys_file).principal_for(key) == Principal("alice")


def test_keys_list_shows_ids_and_users_never_keys(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    alice = cli_add(capsys, keys_file, "alice", "--label", "laptop")
    root = cli_add(capsys, keys_file, "root", "--admin")
    code, out, _ = keys_cli(capsys, keys_file, "list")
    assert code == 0
    ids = {entry.user: entry.id for entry in read_keys_file(keys_file).keys}
    assert out.splitlines() == [f"{ids['alice']}  alice  laptop", f"{ids['root']}  root  (admin)"]
    for key in (alice, root):
        assert key not in out and key.removeprefix(KEY_PREFIX)[:8] not in out
        assert hashlib.sha256(key.encode()).hexdigest() not in out  # not even the whole hash


def test_keys_rm_by_id_revokes_only_that_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    first, second = cli_add(capsys, keys_file, "alice"), cli_add(capsys, keys_file, "alice")
    bob = cli_add(capsys, keys_file, "bob")
    first_id = hashlib.sha256(first.encode()).hexdigest()[:8]
    code, out, _ = keys_cli(capsys, keys_file, "rm", "--id", first_id)
    assert (code, out) == (0, "revoked 1 key(s)\n")
    ring = KeyRing(keys_file)
    assert ring.principal_for(first) is None
    assert ring.principal_for(second) == Principal("alice") and ring.principal_for(bob) == Principal("bob")


def test_keys_rm_by_user_revokes_every_key_of_that_user(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    alice = [cli_add(capsys, keys_file, "alice") for _ in range(3)]
    bob = cli_add(capsys, keys_file, "bob")
    code, out, _ = keys_cli(capsys, keys_file, "rm", "--user", "alice")
    assert (code, out) == (0, "revoked 3 key(s)\n")
    ring = KeyRing(keys_file)
    assert [ring.principal_for(k) for k in alice] == [None] * 3
    assert ring.principal_for(bob) == Principal("bob")
    assert [e.user for e in read_keys_file(keys_file).keys] == ["bob"]


@pytest.mark.parametrize("selector", [["--id", "0badc0de"], ["--user", "nobody"]])
def test_keys_rm_that_matches_nothing_fails_and_changes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, selector: list[str]
) -> None:
    """A mistyped id must not look like a successful revocation."""
    keys_file = tmp_path / "keys.yaml"
    key = cli_add(capsys, keys_file, "alice")
    before = keys_file.read_bytes()
    code, _, err = keys_cli(capsys, keys_file, "rm", *selector)
    assert code != 0 and "no key" in err.lower()
    assert keys_file.read_bytes() == before
    assert KeyRing(keys_file).principal_for(key) == Principal("alice")


def test_keys_rm_needs_an_id_or_a_user(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = keys_cli(capsys, tmp_path / "keys.yaml", "rm")
    assert code == 2 and "--id or --user" in err


@pytest.mark.parametrize("user", ["Alice", "a b", "../bob", "a/b", "", "_x", ".hidden", "a..b", "a\x00", "é", "x" * 65])
def test_keys_add_refuses_an_invalid_user_name(capsys: pytest.CaptureFixture[str], tmp_path: Path, user: str) -> None:
    """Users are namespaces (owner names of adapters): the same rules, and a clean error."""
    keys_file = tmp_path / "keys.yaml"
    code, out, err = keys_cli(capsys, keys_file, "add", user)
    assert code == 2
    assert "invalid user" in err and "Traceback" not in err
    assert KEY_PREFIX not in out
    assert not keys_file.exists()


def test_keys_file_with_an_invalid_user_is_refused(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    add_key(keys_file, "alice")
    data = yaml.safe_load(keys_file.read_text())
    data["keys"][0]["user"] = "../bob"
    keys_file.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="invalid user"):
        read_keys_file(keys_file)


# -- KeyRing: the keys in force ---------------------------------------------------------------


def test_keyring_applies_added_and_revoked_keys_on_reload(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    alice, _ = add_key(keys_file, "alice")
    ring = KeyRing(keys_file)
    assert ring.principal_for(alice) == Principal("alice")
    assert ring.reload_if_changed() is False  # nothing changed: nothing re-parsed

    bob, _ = add_key(keys_file, "bob", admin=True)
    assert ring.principal_for(bob) is None  # not before the reload ...
    assert ring.reload_if_changed() is True
    assert ring.principal_for(bob) == Principal("bob", admin=True)  # ... and at once after it

    assert remove_keys(keys_file, user="alice") == 1
    assert ring.reload_if_changed() is True
    assert ring.principal_for(alice) is None
    assert ring.principal_for(bob) == Principal("bob", admin=True)


def test_keyring_notices_a_same_size_rewrite_within_the_timestamp_granularity(tmp_path: Path) -> None:
    """Revoke a key and add another of the same user in the same clock tick (file systems with
    coarse timestamps, copies that keep mtimes): the file has the same size and modification
    time, yet the old key must stop working and the new one start."""
    keys_file = tmp_path / "keys.yaml"
    old, _ = add_key(keys_file, "alice")
    ring = KeyRing(keys_file)
    before = keys_file.stat()
    for _ in range(1000):  # YAML quotes an id that reads as a number: draw until the size matches
        remove_keys(keys_file, user="alice")
        new, _ = add_key(keys_file, "alice")
        if keys_file.stat().st_size == before.st_size:
            break
    os.utime(keys_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert keys_file.stat().st_size == before.st_size

    ring.reload_if_changed()
    assert ring.principal_for(old) is None
    assert ring.principal_for(new) == Principal("alice")


# Files that are not a list of entries: nothing in them can be attributed to one key.
INVALID_FILES = {
    "yaml syntax": b"keys: [\n  - {id: ",
    "not a mapping": b"- a\n- b\n",
    "unknown field": b"keys: []\nextra: 1\n",
    "python tag": b"keys: !!python/object/apply:os.system ['true']\n",
    "not utf-8": b"keys:\n  - {id: '\xff\xfe'}\n",
    "binary": bytes(range(256)),
}
# Files whose entries are invalid: those entries fail closed (tests/unit/test_keys_hardening.py).
INVALID_ENTRIES = {
    "bad hash": b"keys:\n  - {id: '12345678', user: alice, sha256: nothex}\n",
    "invalid user": b"keys:\n  - {id: '12345678', user: ../bob, sha256: '" + b"1" * 64 + b"'}\n",
}


@pytest.mark.parametrize("content", INVALID_ENTRIES.values(), ids=INVALID_ENTRIES.keys())
def test_keyring_refuses_invalid_entries_and_lets_no_one_in_by_them(tmp_path: Path, content: bytes) -> None:
    """Alice's entry was replaced by a broken one: her key stops working, and nobody new gets in."""
    keys_file = tmp_path / "keys.yaml"
    alice, _ = add_key(keys_file, "alice")
    ring = KeyRing(keys_file)
    keys_file.write_bytes(content)
    ring.reload_if_changed()
    assert ring.principal_for(alice) is None
    assert ring.status.refused_entries == 1


@pytest.mark.parametrize("content", INVALID_FILES.values(), ids=INVALID_FILES.keys())
def test_keyring_keeps_the_previous_keys_when_the_file_becomes_invalid(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A half-edited file must lock nobody out, and let nobody new in; fixing it applies it."""
    keys_file = tmp_path / "keys.yaml"
    alice, _ = add_key(keys_file, "alice")
    ring = KeyRing(keys_file)
    good = keys_file.read_bytes()

    keys_file.write_bytes(content)
    assert ring.reload_if_changed() is False
    assert ring.principal_for(alice) == Principal("alice")
    assert "invalid, keeping the previous keys" in caplog.text
    assert ring.status.file_refused and not ring.status.valid  # and said so (/readyz, metrics)
    ring.reload_if_changed()  # still broken: still the previous keys
    assert ring.principal_for(alice) == Principal("alice")

    keys_file.write_bytes(good)
    bob, _ = add_key(keys_file, "bob")
    assert ring.reload_if_changed() is True
    assert ring.principal_for(alice) == Principal("alice") and ring.principal_for(bob) == Principal("bob")


def test_keyring_with_a_deleted_file_has_no_keys(tmp_path: Path) -> None:
    """Deleting the file revokes every key (fail closed), and recreating it restores them."""
    keys_file = tmp_path / "keys.yaml"
    alice, _ = add_key(keys_file, "alice")
    ring = KeyRing(keys_file)
    good = keys_file.read_bytes()
    keys_file.unlink()
    assert ring.reload_if_changed() is True
    assert ring.principal_for(alice) is None
    keys_file.write_bytes(good)
    assert ring.reload_if_changed() is True
    assert ring.principal_for(alice) == Principal("alice")


def test_keyring_knows_only_keys_not_hashes_or_ids(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    key, entry = add_key(keys_file, "alice")
    ring = KeyRing(keys_file)
    for guess in (entry.sha256, entry.id, key.removeprefix(KEY_PREFIX), key + " ", key.upper(), "", "alice"):
        assert ring.principal_for(guess) is None, guess
