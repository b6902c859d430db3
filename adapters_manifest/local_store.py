"""A store in a local folder (`file:///path`): the embedded default for one machine."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from adapters_manifest import layout
from adapters_manifest.atomic_file import replacing
from adapters_manifest.record import AdapterRecord
from adapters_manifest.store import ProgressCallback, RecordConflictError

log = logging.getLogger(__name__)

VERSION = re.compile(r"[0-9a-f]{16}")


def _atomic_copy(source: Path, dest: Path) -> None:
    with replacing(dest) as tmp:
        shutil.copyfile(source, tmp)


def _atomic_write(dest: Path, data: bytes) -> None:
    with replacing(dest) as tmp:
        tmp.write_bytes(data)


def _stamp(stat: os.stat_result) -> str:
    # The inode too: every write is a rename of a new file, and mtimes are coarse (a few ms).
    return f"{stat.st_mtime_ns}-{stat.st_size}-{stat.st_ino}"


@contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """An exclusive lock between processes on this machine (flock), held for the block."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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

    async def list_stamps(self, owner: str | None = None) -> dict[str, str]:
        return await asyncio.to_thread(self._list_stamps, owner)

    def _list_stamps(self, owner: str | None = None) -> dict[str, str]:
        stamps = {}
        for path in (self.root / layout.MANIFEST_DIR).glob(f"{owner or '*'}/*.json"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # deleted while listing
                continue
            stamps[f"{path.parent.name}/{path.stem}"] = _stamp(stat)
        return stamps

    async def record_stamp(self, owner: str, name: str) -> str | None:
        return await asyncio.to_thread(self._record_stamp, owner, name)

    def _record_stamp(self, owner: str, name: str) -> str | None:
        try:
            return _stamp(self._record_path(owner, name).stat())
        except FileNotFoundError:
            return None

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
        return self._has_version(record)

    def _has_version(self, record: AdapterRecord) -> bool:
        return all((self.root / layout.file_key(record, f.name)).is_file() for f in record.files)

    # -- writing -------------------------------------------------------------------

    async def put_file(
        self, record: AdapterRecord, file_name: str, source: Path, progress: ProgressCallback | None = None
    ) -> None:
        await asyncio.to_thread(self._put_file, source, self.root / layout.file_key(record, file_name))
        if progress is not None:
            progress(source.stat().st_size)

    def _put_file(self, source: Path, dest: Path, attempts: int = 3) -> None:
        for attempt in range(attempts):
            try:
                _atomic_copy(source, dest)
                return
            except FileNotFoundError:  # a delete of the adapter removed the folder meanwhile
                if attempt == attempts - 1 or not source.is_file():
                    raise

    async def put_record(self, record: AdapterRecord, *, if_stamp: str | None = None, if_absent: bool = False) -> None:
        await asyncio.to_thread(self._put_record, record, if_stamp, if_absent)

    def _put_record(self, record: AdapterRecord, if_stamp: str | None, if_absent: bool) -> None:
        data = record.model_dump_json(indent=2).encode()
        with _locked(self._lock_path(record.owner, record.name)):
            current = self._record_stamp(record.owner, record.name)
            if (if_absent and current is not None) or (if_stamp is not None and current != if_stamp):
                raise RecordConflictError(f"the record of {record.ref} changed meanwhile")
            if not self._has_version(record):  # a delete took them since they were put
                raise RecordConflictError(f"files of {record.versioned_ref} are missing")
            _atomic_write(self._record_path(record.owner, record.name), data)
            try:
                self._mark_retired(record)
            except OSError as e:  # committed all the same: grace counts from the files' time
                log.warning("marking the versions %s replaced failed: %s", record.versioned_ref, e)

    def _mark_retired(self, current: AdapterRecord) -> None:
        """The grace period of every version the commit replaced starts now (once: the first
        replacement counts); the current one's marker goes, should it have been retired before."""
        for folder in self._version_folders(current.owner, current.name):
            marker = folder / layout.RETIRED_MARKER
            if folder.name == current.version:
                marker.unlink(missing_ok=True)
            elif not marker.exists():
                marker.touch()

    def _version_folders(self, owner: str, name: str) -> list[Path]:
        folder = self.root / layout.versions_prefix(owner, name)
        return [p for p in folder.iterdir() if p.is_dir() and VERSION.fullmatch(p.name)] if folder.is_dir() else []

    async def list_versions(self, owner: str, name: str) -> dict[str, float]:
        return await asyncio.to_thread(self._list_versions, owner, name)

    def _list_versions(self, owner: str, name: str) -> dict[str, float]:
        versions = {}
        for folder in self._version_folders(owner, name):
            marker = folder / layout.RETIRED_MARKER
            try:
                paths = [marker] if marker.exists() else list(folder.iterdir())
                versions[folder.name] = max((p.stat().st_mtime for p in paths), default=folder.stat().st_mtime)
            except FileNotFoundError:  # removed meanwhile
                continue
        return versions

    async def delete_versions(self, owner: str, name: str, versions: set[str]) -> list[str]:
        return await asyncio.to_thread(self._delete_versions, owner, name, versions)

    def _delete_versions(self, owner: str, name: str, versions: set[str]) -> list[str]:
        with _locked(self._lock_path(owner, name)):
            try:
                current = AdapterRecord.model_validate_json(self._record_path(owner, name).read_bytes()).version
            except FileNotFoundError:
                current = None
            removed = sorted(v for v in versions if v != current)
            for version in removed:
                shutil.rmtree(self.root / layout.versions_prefix(owner, name) / version, True)
            return removed

    async def put_base(self, base_model: str, data: bytes) -> None:
        await asyncio.to_thread(_atomic_write, self.root / layout.base_key(base_model), data)

    async def get_base(self, base_model: str) -> bytes | None:
        try:
            return await asyncio.to_thread((self.root / layout.base_key(base_model)).read_bytes)
        except FileNotFoundError:
            return None

    async def list_bases(self) -> list[str]:
        return sorted(layout.base_name(p.name) for p in (self.root / layout.BASES_DIR).glob("*.json"))

    async def delete_adapter(self, owner: str, name: str) -> bool:
        return await asyncio.to_thread(self._delete_adapter, owner, name)

    def _delete_adapter(self, owner: str, name: str) -> bool:
        with _locked(self._lock_path(owner, name)):
            try:
                self._record_path(owner, name).unlink()
            except FileNotFoundError:
                return False
            # No record names any version now, and none can be committed until the lock is free.
            shutil.rmtree(self.root / layout.ADAPTERS_DIR / owner / name, True)
        return True

    def _lock_path(self, owner: str, name: str) -> Path:
        return self.root / layout.lock_key(owner, name)
