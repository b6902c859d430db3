"""A store in a local folder (`file:///path`): the embedded default for one machine."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from adapters_manifest import layout
from adapters_manifest.adapter_dir import describe_files, read_config
from adapters_manifest.record import ADAPTER_FILES, AdapterRecord, content_version


class AdapterNotStoredError(Exception):
    """The record names files the store does not hold."""


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class LocalFolderStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = root.resolve().as_uri()

    @classmethod
    def from_url(cls, url: str) -> LocalFolderStore:
        parsed = urlparse(url)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise ValueError(f"not a local store URL: {url!r} (expected file:///path)")
        return cls(Path(parsed.path))

    # -- reading -------------------------------------------------------------------

    async def list_records(self) -> list[AdapterRecord]:
        return await asyncio.to_thread(self._list_records)

    def _list_records(self) -> list[AdapterRecord]:
        manifest = self.root / layout.MANIFEST_DIR
        return [
            AdapterRecord.model_validate_json(path.read_bytes())
            for path in sorted(manifest.glob("*/*.json"))
        ]

    async def get_record(self, owner: str, name: str) -> AdapterRecord | None:
        path = self.root / layout.record_key(owner, name)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None
        return AdapterRecord.model_validate_json(data)

    async def local_dir(self, record: AdapterRecord) -> Path:
        folder = self.root / layout.version_prefix(record)
        missing = [f.name for f in record.files if not (folder / f.name).is_file()]
        if missing:
            raise AdapterNotStoredError(f"{record.ref}@{record.version}: missing {', '.join(missing)}")
        return folder

    # -- writing -------------------------------------------------------------------

    def publish(
        self,
        source: Path,
        owner: str,
        name: str,
        *,
        base_model: str,
        description: str = "",
        visibility: str = "private",
        warm: bool = False,
    ) -> AdapterRecord:
        """Copy an adapter folder in as a new immutable version, then commit its record."""
        files = describe_files(source)
        config = read_config(source)
        record = AdapterRecord(
            owner=owner,
            name=name,
            version=content_version(files),
            base_model=base_model,
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            target_modules=sorted(config["target_modules"]),
            files=files,
            description=description,
            visibility=visibility,
            warm=warm,
        )
        version_dir = self.root / layout.version_prefix(record)
        if not version_dir.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".staging-"))
            for file_name in ADAPTER_FILES:
                shutil.copyfile(source / file_name, staging / file_name)
            version_dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, version_dir)
        # The record is written last: readers never see a record whose files are absent.
        _atomic_write(
            self.root / layout.record_key(owner, name),
            record.model_dump_json(indent=2).encode(),
        )
        return record
