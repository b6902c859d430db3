"""The manifest record: one JSON document per adapter, the commit point of an upload."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)


def check_name(value: str, what: str = "name") -> str:
    """Owner and adapter names: lower-case, no path separators, no '..'."""
    if not NAME_PATTERN.fullmatch(value) or ".." in value:
        raise ValueError(
            f"invalid {what} {value!r}: use 1-64 characters of [a-z0-9._-], "
            "starting with a letter or digit, without '..'"
        )
    return value


class AdapterFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["adapter_config.json", "adapter_model.safetensors"]  # never a path: readers join it to folders
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


def content_version(files: list[AdapterFile]) -> str:
    """A version is the hash of the files' hashes: the same bytes give the same version."""
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.name):
        digest.update(f"{f.name}:{f.sha256}\n".encode())
    return digest.hexdigest()[:16]


class AdapterRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    owner: str
    name: str
    version: str = Field(pattern=r"^[0-9a-f]{16}$")
    base_model: str
    rank: int = Field(ge=1)
    alpha: float
    target_modules: list[str]
    files: list[AdapterFile]
    description: str = ""
    routes: list[str] = []
    visibility: Literal["private", "public"] = "private"
    warm: bool = False
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @field_validator("owner", "name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return check_name(value)

    @property
    def ref(self) -> str:
        """The name users put in `model`: `owner/name`."""
        return f"{self.owner}/{self.name}"

    @property
    def versioned_ref(self) -> str:
        """Unique per content: what the engine knows this adapter as."""
        return f"{self.owner}/{self.name}@{self.version}"
