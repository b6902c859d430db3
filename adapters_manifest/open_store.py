"""Turn a store URL (or a plain path) into a store."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from adapters_manifest.local_store import LocalFolderStore
from adapters_manifest.store import AdapterStore


def open_store(url: str) -> AdapterStore:
    scheme = urlparse(url).scheme
    if scheme == "s3":
        from adapters_manifest.s3_store import S3Store  # boto3 only when S3 is used

        return S3Store.from_url(url)
    if scheme == "file":
        return LocalFolderStore.from_url(url)
    if scheme == "":
        return LocalFolderStore(Path(url))
    raise ValueError(f"unsupported store scheme {scheme!r}: use s3://bucket/prefix, file:///path or a local path")
