"""Where things live inside a store (the same for S3 prefixes and local folders)."""

from __future__ import annotations

from urllib.parse import quote, unquote

from adapters_manifest.record import AdapterRecord

MANIFEST_DIR = "manifest"
ADAPTERS_DIR = "adapters"
BASES_DIR = "bases"  # what each gateway's base model accepts (published_base.py)
LOCKS_DIR = "locks"  # one per adapter: its record commits and its deletion take turns


def record_key(owner: str, name: str) -> str:
    return f"{MANIFEST_DIR}/{owner}/{name}.json"


def version_prefix(record: AdapterRecord) -> str:
    """Immutable folder of one version's files."""
    return f"{ADAPTERS_DIR}/{record.owner}/{record.name}/{record.version}"


RETIRED_MARKER = ".retired"  # in a version's folder: when a newer version replaced it (its grace starts)


def versions_prefix(owner: str, name: str) -> str:
    """The folder of every version of one adapter (with its slash: `name2` is not under `name`)."""
    return f"{ADAPTERS_DIR}/{owner}/{name}/"


def file_key(record: AdapterRecord, file_name: str) -> str:
    return f"{version_prefix(record)}/{file_name}"


def lock_key(owner: str, name: str) -> str:
    return f"{LOCKS_DIR}/{owner}/{name}.lock"


def base_key(base_model: str) -> str:
    """A served name may hold slashes (`org/model`): quoted into one path part."""
    return f"{BASES_DIR}/{quote(base_model, safe='')}.json"


def base_name(file_name: str) -> str:
    """The served name a `bases/` entry is for (its file name, `.json` removed, unquoted)."""
    return unquote(file_name.removesuffix(".json"))
