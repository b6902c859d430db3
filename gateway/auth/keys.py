"""API keys: a file of sha256 hashes (never the keys), mapping each key to a user.

File format (YAML or JSON; a Kubernetes Secret mounts it as a file):

    keys:
      - id: 3f9a1c2b          # the first 8 hex digits of the hash: names a key for removal
        user: alice
        sha256: 3f9a1c2b...    # hashlib.sha256(key.encode()).hexdigest()
        admin: false
        label: laptop          # optional

The file is re-read when it changes, so keys are added and revoked without a restart.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

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


def add_key(path: Path, user: str, admin: bool = False, label: str = "") -> tuple[str, KeyEntry]:
    """Create a key for `user`, store only its hash; the key itself is returned once."""
    model = read_keys_file(path)
    key = new_key()
    digest = hash_key(key)
    entry = KeyEntry(id=digest[:8], user=user, sha256=digest, admin=admin, label=label)
    model.keys.append(entry)
    write_keys_file(path, model)
    return key, entry


def remove_keys(path: Path, *, user: str | None = None, key_id: str | None = None) -> int:
    """Revoke keys by id, or every key of a user; returns how many were removed."""
    model = read_keys_file(path)
    kept = [k for k in model.keys if not ((key_id and k.id == key_id) or (user and not key_id and k.user == user))]
    removed = len(model.keys) - len(kept)
    if removed:
        write_keys_file(path, KeysFileModel(keys=kept))
    return removed


class KeyRing:
    """The keys in force, re-read from the file when its content changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # The content last read (valid or not): compared, not the modification time, which a
        # same-size rewrite within the file system's timestamp granularity would not change.
        self._content: bytes | None = None
        self._by_hash: dict[str, Principal] = {}
        self.reload_if_changed()

    def reload_if_changed(self) -> bool:
        try:
            content = self.path.read_bytes()
        except FileNotFoundError:
            content = b""
        except OSError as exc:
            log.error("keys file %s is unreadable, keeping the previous keys: %s", self.path, exc)
            return False
        if content == self._content:
            return False
        self._content = content  # an invalid file is reported once, not at every check
        try:
            model = parse_keys(content)
        except (ValueError, yaml.YAMLError) as exc:
            # Keep the keys in force: a half-edited file must not lock everyone out (or in).
            log.error("keys file %s is invalid, keeping the previous keys: %s", self.path, exc)
            return False
        self._by_hash = {k.sha256: Principal(user=k.user, admin=k.admin) for k in model.keys}
        log.info("keys file %s loaded: %d keys", self.path, len(self._by_hash))
        return True

    def principal_for(self, key: str) -> Principal | None:
        # Looked up by the key's hash: timing can tell at most something about a hash, not a key.
        return self._by_hash.get(hash_key(key))
