"""The manifest record: one JSON document per adapter, the commit point of an upload."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)

# Semantic routing: `model: "auto"` picks the caller's adapter whose routes best match the prompt.
MAX_ROUTES = 32
MAX_ROUTE_CHARS = 300
MAX_DESCRIPTION_CHARS = 500
RESERVED_NAMES = frozenset({"auto"})  # `auto` means routing: an adapter so named could never be asked for


def check_name(value: str, what: str = "name") -> str:
    """Owner and adapter names: lower-case, no path separators, no '..'."""
    if not NAME_PATTERN.fullmatch(value) or ".." in value:
        raise ValueError(
            f"invalid {what} {value!r}: use 1-64 characters of [a-z0-9._-], "
            "starting with a letter or digit, without '..'"
        )
    return value


def check_upload_name(value: str) -> str:
    """An adapter name a new upload may take: a valid name that is not reserved. Look-ups use
    `check_name` alone, so a reserved name is just not found there."""
    check_name(value)
    if value in RESERVED_NAMES:
        raise ValueError(f"the adapter name {value!r} is reserved (model {value!r} routes to one of your adapters)")
    return value


class RoutingError(ValueError):
    """A description or routes over their limits; `field` is the upload field at fault."""

    def __init__(self, field: Literal["description", "routes"], message: str) -> None:
        super().__init__(message)
        self.field = field


def check_routing(description: str, routes: Sequence[str]) -> tuple[str, list[str]]:
    """The description and routes every upload path stores, stripped of surrounding whitespace;
    RoutingError naming the first problem. Records already stored are not re-checked (they parse
    as they are): the limits bind uploads only."""
    description = description.strip()
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise RoutingError(
            "description", f"description is {len(description)} characters; at most {MAX_DESCRIPTION_CHARS}"
        )
    if isinstance(routes, str):  # a lone string would pass as a sequence of one-character routes
        raise RoutingError("routes", "routes must be a list of strings, not one string")
    if len(routes) > MAX_ROUTES:
        raise RoutingError("routes", f"{len(routes)} routes; at most {MAX_ROUTES}")
    cleaned: list[str] = []
    for number, route in enumerate(routes, start=1):
        if not isinstance(route, str):
            raise RoutingError("routes", f"route {number} is not a string")
        route = route.strip()
        if not route:
            raise RoutingError("routes", f"route {number} is empty")
        if len(route) > MAX_ROUTE_CHARS:
            raise RoutingError("routes", f"route {number} is {len(route)} characters; at most {MAX_ROUTE_CHARS}")
        if route in cleaned:
            raise RoutingError("routes", f"route {number} repeats route {cleaned.index(route) + 1}")
        cleaned.append(route)
    return description, cleaned


class AdapterFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["adapter_config.json", "adapter_model.safetensors"]  # never a path: readers join it to folders
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


def content_version(files: list[AdapterFile], description: str = "", routes: Sequence[str] = ()) -> str:
    """A version is the hash of the files' hashes, and of the description and routes when there
    are any (they decide routing, so changing them is a new version): the same content gives the
    same version, and an adapter without either keeps the version it had before routing existed."""
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.name):
        digest.update(f"{f.name}:{f.sha256}\n".encode())
    if description or routes:  # JSON: no text can pass for another's boundary
        digest.update(f"routing:{json.dumps([description, list(routes)])}\n".encode())
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
    description: str = ""  # limits (check_routing) bind uploads, not reads: older records parse as they are
    routes: list[str] = []  # example utterances for routing, in upload order
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
