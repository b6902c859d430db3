"""API keys: a file of sha256 hashes (never the keys), mapping each key to a user.

File format (YAML or JSON; a Kubernetes Secret mounts it as a file):

    keys:
      - id: 3f9a1c2b          # the first 8 hex digits of the hash: names a key for removal
        user: alice
        sha256: 3f9a1c2b...    # hashlib.sha256(key.encode()).hexdigest()
        admin: false
        label: laptop          # optional

The file is re-read when it changes, so keys are added and revoked without a restart. A file
edited into an invalid state fails closed where it can: each entry is checked on its own, and an
entry that is wrong (or a hash that two entries claim) lets no one in, while the valid entries
apply (so a revocation made in the same edit as a typo applies). A file that is not a list of
entries at all (YAML syntax, not a mapping) says nothing about any one key: it is refused whole
and the previous keys stay. Both are reported (`KeyRing.status`: /readyz and the metrics).

`keys add` and `keys rm` read, change and atomically replace the file under an exclusive lock
on a file beside it (`keys.yaml.lock`), so that runs at the same time lose nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import secrets
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adapters_manifest.atomic_file import replacing
from adapters_manifest.record import check_name

log = logging.getLogger(__name__)

KEY_PREFIX = "lgw_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user, and whether they may manage every namespace."""

    user: str
    admin: bool = False


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[0-9a-f]{8}$")
    user: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    admin: bool = False
    label: str = ""

    @field_validator("user")
    @classmethod
    def _valid_user(cls, value: str) -> str:
        return check_name(value, "user")  # users are namespaces: the same rules as owners


class KeysFileModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = []


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def read_keys_file(path: Path) -> KeysFileModel:
    """Parse and validate a keys file; a missing file is an empty one."""
    try:
        return parse_keys(path.read_bytes())
    except FileNotFoundError:
        return KeysFileModel()


def parse_keys(content: bytes) -> KeysFileModel:
    """ValueError (UnicodeDecodeError, pydantic's ValidationError) or yaml.YAMLError when invalid."""
    data = yaml.safe_load(content.decode()) or {}  # JSON is YAML too
    return KeysFileModel.model_validate(data)


def write_keys_file(path: Path, model: KeysFileModel) -> None:
    """Atomically, so a gateway re-reading it never sees half a file."""
    with replacing(path) as tmp:
        tmp.write_text(yaml.safe_dump(model.model_dump(), sort_keys=False))
        tmp.chmod(0o600)


@contextmanager
def editing(path: Path) -> Iterator[None]:
    """Held while reading, changing and replacing the keys file: one editor at a time, across
    processes (flock on `<file>.lock`; the keys file itself is replaced, so it cannot hold a lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def add_key(path: Path, user: str, admin: bool = False, label: str = "") -> tuple[str, KeyEntry]:
    """Create a key for `user`, store only its hash; the key itself is returned once."""
    key = new_key()
    digest = hash_key(key)
    entry = KeyEntry(id=digest[:8], user=user, sha256=digest, admin=admin, label=label)
    with editing(path):
        model = read_keys_file(path)
        model.keys.append(entry)
        write_keys_file(path, model)
    return key, entry


def remove_keys(path: Path, *, user: str | None = None, key_id: str | None = None) -> int:
    """Revoke keys by id, or every key of a user; returns how many were removed."""
    with editing(path):
        model = read_keys_file(path)
        kept = [k for k in model.keys if not ((key_id and k.id == key_id) or (user and not key_id and k.user == user))]
        removed = len(model.keys) - len(kept)
        if removed:
            write_keys_file(path, KeysFileModel(keys=kept))
    return removed


@dataclass(frozen=True)
class KeysFileStatus:
    """How the last read of the keys file went (for /readyz and the metrics)."""

    valid: bool = True
    refused_entries: int = 0  # entries that let no one in: invalid, or a hash claimed twice
    file_refused: bool = False  # not a list of entries at all: the previous keys stay

    def public(self) -> dict[str, Any]:
        return {"valid": self.valid, "refused_entries": self.refused_entries, "file_refused": self.file_refused}


class KeysFileRefused(ValueError):
    """The file is not a list of entries: nothing in it can be attributed to one key."""


def parse_entries(content: bytes) -> tuple[list[KeyEntry], list[str]]:
    """The valid entries, and why each other one is refused; KeysFileRefused when no entry can be told."""
    try:
        data = yaml.safe_load(content.decode()) or {}
    except (ValueError, yaml.YAMLError) as exc:
        raise KeysFileRefused(str(exc)) from None
    if not isinstance(data, dict) or set(data) - {"keys"} or not isinstance(data.get("keys", []), list):
        raise KeysFileRefused("expected a mapping with one field, keys: a list of entries")
    valid, problems = [], []
    for index, raw in enumerate(data.get("keys", [])):
        try:
            valid.append(KeyEntry.model_validate(raw))
        except ValidationError as exc:
            problems.append(f"entry {index}: {exc.error_count()} invalid field(s)")  # no values: they may be secret
    claimed = Counter(entry.sha256 for entry in valid)
    for entry in valid:
        if claimed[entry.sha256] > 1:
            problems.append(f"entry {entry.id}: its hash is in {claimed[entry.sha256]} entries")
    return [entry for entry in valid if claimed[entry.sha256] == 1], problems


class KeyRing:
    """The keys in force, re-read from the file when its content changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # The content last read (valid or not): compared, not the modification time, which a
        # same-size rewrite within the file system's timestamp granularity would not change.
        self._content: bytes | None = None
        self._by_hash: dict[str, Principal] = {}
        self.status = KeysFileStatus()
        self.reload_if_changed()

    def reload_if_changed(self) -> bool:
        try:
            content = self.path.read_bytes()
        except FileNotFoundError:
            content = b""
        except OSError as exc:
            log.error("keys file %s is unreadable, keeping the previous keys: %s", self.path, exc)
            self.status = KeysFileStatus(valid=False, file_refused=True)
            return False
        if content == self._content:
            return False
        self._content = content  # an invalid file is reported once, not at every check
        try:
            entries, problems = parse_entries(content)
        except KeysFileRefused as exc:
            # No entry can be told apart: keep the keys in force (none would lock everyone out).
            log.error("keys file %s is invalid, keeping the previous keys: %s", self.path, exc)
            self.status = KeysFileStatus(valid=False, file_refused=True)
            return False
        self._by_hash = {k.sha256: Principal(user=k.user, admin=k.admin) for k in entries}
        self.status = KeysFileStatus(valid=not problems, refused_entries=len(problems))
        if problems:
            log.error(
                "keys file %s has %d refused entries, which let no one in: %s",
                self.path,
                len(problems),
                "; ".join(problems),
            )
        log.info("keys file %s loaded: %d keys", self.path, len(self._by_hash))
        return True

    def principal_for(self, key: str) -> Principal | None:
        # Looked up by the key's hash: timing can tell at most something about a hash, not a key.
        return self._by_hash.get(hash_key(key))
