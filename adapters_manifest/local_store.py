"""A store in a local folder (`file:///path`): the embedded default for one machine."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from urllib.parse import urlparse

from adapters_manifest import layout
from adapters_manifest.atomic_file import replacing
from adapters_manifest.record import AdapterRecord
from adapters_manifest.store import ProgressCallback


def _atomic_copy(source: Path, dest: Path) -> None:
    with replacing(dest) as tmp:
        shutil.copyfile(source, tmp)


def _atomic_write(dest: Path, data: bytes) -> None:
    with replacing(dest) as tmp:
        tmp.write_bytes(data)


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

    def _record_path(self, owner: str, name: str) -> Path:
        return self.root / layout.record_key(owner, name)

    # -- reading -------------------------------------------------------------------

    async def list_stamps(self) -> dict[str, str]:
        return await asyncio.to_thread(self._list_stamps)

    def _list_stamps(self) -> dict[str, str]:
        stamps = {}
        for path in (self.root / layout.MANIFEST_DIR).glob("*/*.json"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # deleted while listing
                continue
            stamps[f"{path.parent.name}/{path.stem}"] = f"{stat.st_mtime_ns}-{stat.st_size}"
        return stamps

    async def get_record(self, owner: str, name: str) -> AdapterRecord | None:
        try:
            data = await asyncio.to_thread(self._record_path(owner, name).read_bytes)
        except FileNotFoundError:
            return None
        return AdapterRecord.model_validate_json(data)

    async def list_records(self) -> list[AdapterRecord]:
        records = []
        for ref in sorted(await self.list_stamps()):
            record = await self.get_record(*ref.split("/"))
            if record is not None:
                records.append(record)
        return records

    async def fetch_file(self, record: AdapterRecord, file_name: str, dest: Path) -> None:
        await asyncio.to_thread(shutil.copyfile, self.root / layout.file_key(record, file_name), dest)

    async def has_version(self, record: AdapterRecord) -> bool:
        return all((self.root / layout.file_key(record, f.name)).is_file() for f in record.files)

    # -- writing -------------------------------------------------------------------

    async def put_file(
        self, record: AdapterRecord, file_name: str, source: Path, progress: ProgressCallback | None = None
    ) -> None:
        await asyncio.to_thread(_atomic_copy, source, self.root / layout.file_key(record, file_name))
        if progress is not None:
            progress(source.stat().st_size)

    async def put_record(self, record: AdapterRecord) -> None:
        data = record.model_dump_json(indent=2).encode()
        await asyncio.to_thread(_atomic_write, self._record_path(record.owner, record.name), data)

    async def delete_adapter(self, owner: str, name: str) -> bool:
        try:
            await asyncio.to_thread(self._record_path(owner, name).unlink)
        except FileNotFoundError:
            return False
        await asyncio.to_thread(shutil.rmtree, self.root / layout.ADAPTERS_DIR / owner / name, True)
        return True
