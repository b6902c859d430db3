"""The interface every adapter store offers: a local folder (`file:///path`) or S3 (`s3://bucket/prefix`).

Both use the layout of `layout.py`. Version files are immutable; a record is written after its
files and is the commit point. Readers fetch files into their own disk cache and verify them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from adapters_manifest.record import AdapterRecord

# Called with the number of bytes transferred since the last call (progress bars).
ProgressCallback = Callable[[int], None]


class StoreUnavailableError(Exception):
    """The store could not be reached or answered with a server error: try again later."""


class StoreAccessError(StoreUnavailableError):
    """The store answered but refuses us: no such bucket, access denied, no credentials.

    A configuration problem rather than an outage, but a subclass so that a running gateway
    keeps serving what it has cached; at start-up a caller may treat it as fatal.
    """


class RecordConflictError(Exception):
    """A conditional record write lost: the record changed (or appeared, or went) since its stamp
    was read, or the version's files are no longer all in the store. Read again and retry."""


class AdapterStore(Protocol):
    url: str  # for logs and messages: never holds credentials

    async def list_stamps(self, owner: str | None = None) -> dict[str, str]:
        """`owner/name` -> a stamp (ETag) of its record, for every record (of `owner`, if given):
        one cheap listing."""

    async def get_record(self, owner: str, name: str) -> AdapterRecord | None:
        """One record, or None when there is none."""

    async def record_stamp(self, owner: str, name: str) -> str | None:
        """The stamp `list_stamps` gives this record now; None when there is none."""

    async def list_records(self) -> list[AdapterRecord]:
        """Every record (a listing plus one read each)."""

    async def fetch_file(self, record: AdapterRecord, file_name: str, dest: Path) -> None:
        """Copy one file of a version to `dest` as it is stored (the caller verifies it)."""

    async def has_version(self, record: AdapterRecord) -> bool:
        """Whether every file of this version is already stored."""

    async def put_file(
        self, record: AdapterRecord, file_name: str, source: Path, progress: ProgressCallback | None = None
    ) -> None:
        """Store one file of a version (before its record)."""

    async def put_record(self, record: AdapterRecord, *, if_stamp: str | None = None, if_absent: bool = False) -> None:
        """Commit a record: from now on readers see this version. Under the adapter's lock (which
        delete_adapter takes too), and only if every file of the version is stored and, when
        asked, the record still has stamp `if_stamp` (or, `if_absent`, there is none); else
        RecordConflictError and nothing is written."""

    async def list_versions(self, owner: str, name: str) -> dict[str, float]:
        """Every stored version of an adapter -> since when (epoch seconds) it is not current: its
        retirement marker's time, else its newest file's (a version never committed)."""

    async def delete_versions(self, owner: str, name: str, versions: set[str]) -> list[str]:
        """Under the adapter's lock: remove these versions' files, except the one its record names
        now. Returns the versions removed."""

    async def put_base(self, base_model: str, data: bytes) -> None:
        """Publish what a gateway's base model accepts (`bases/<name>.json`)."""

    async def get_base(self, base_model: str) -> bytes | None:
        """What `put_base` published for this served name, or None."""

    async def list_bases(self) -> list[str]:
        """The served names of every published base."""

    async def delete_adapter(self, owner: str, name: str) -> bool:
        """Under the adapter's lock: remove the record (the commit point: serving stops), then
        every version's files, which no record names any more. False when there was no record."""
