"""DiskCache: adapter versions on local disk, fetched from the store (the tier before the engine).

Guarantees:
- a version's folder appears whole or not at all (download into a temporary folder, verify
  every file's sha256 against the record, then one rename); a partial download is never used;
- concurrent requests for one version share one download (single flight); downloads run in
  parallel up to `max_parallel`; a checksum mismatch is retried, then refused, never served;
- a version the engine holds (pinned) is never deleted: vLLM may re-read its files;
- unpinned versions are kept, least recently used first out, within `max_bytes`;
- a retired version (superseded or deleted in the store) is deleted once unpinned.
The single flight, pins, retirement and LRU order are `RefcountedLRU`'s; the byte budget and the
checksums are this tier's.

A download is an `adapter.fetch` span (source without secrets, bytes, retries, duration), a
child of whatever started it: a request's `adapter.acquire`, or the warm prefetch.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from opentelemetry import trace
from opentelemetry.trace import Tracer

from adapters_manifest.adapter_dir import sha256_file
from adapters_manifest.record import AdapterRecord
from adapters_manifest.store import AdapterStore, StoreUnavailableError
from adapters_manifest.validation import AdapterValidationError
from gateway.metrics import TIER_DISK, GatewayMetrics, detached_metrics, elapsed_since
from gateway.refcounted_lru import EntryState, LruEntry, RefcountedLRU
from gateway.telemetry import spans

log = logging.getLogger(__name__)


class ChecksumMismatchError(AdapterValidationError):
    """The store's bytes do not match the record's sha256 (corrupt or tampered): the adapter's own
    fault, which its owner may be told."""


@dataclass(kw_only=True)
class _CachedVersion(LruEntry):  # its holders are its pins
    path: Path
    size: int = 0


class DiskCache:
    def __init__(
        self,
        store: AdapterStore,
        root: Path,
        max_bytes: int,
        max_parallel: int = 4,
        attempts: int = 3,
        tracer: Tracer | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._store = store
        self._root = root
        self._max_bytes = max_bytes
        self._attempts = attempts
        self._downloads = asyncio.Semaphore(max_parallel)
        self._versions: RefcountedLRU[_CachedVersion] = RefcountedLRU()
        self._tracer = tracer or trace.NoOpTracer()
        self._metrics = metrics or detached_metrics()
        self._source = spans.store_source(store.url)
        # Folders of an earlier process may be incomplete: only verified downloads are trusted.
        for stale in root.glob(".download-*"):
            shutil.rmtree(stale, ignore_errors=True)

    @property
    def used_bytes(self) -> int:
        return sum(v.size for v in self._versions.values() if v.loaded.done())  # (a failed one left)

    def is_cached(self, record: AdapterRecord) -> bool:
        version = self._versions.get(record.versioned_ref)
        return version is not None and version.loaded.done()

    async def pin(self, record: AdapterRecord) -> Path:
        """The local folder of this version, kept until `unpin`; downloads it when needed."""
        key = record.versioned_ref
        version = self._versions.get(key)
        if version is None:
            version = _CachedVersion(key=key, path=self._version_dir(record))
            self._versions.start(version, self._download(version, record))
        self._versions.hold(version)  # pinned for serving: a retired version is current again (republished)
        try:
            await asyncio.shield(version.loaded)
        except BaseException:
            # Release this pin's own version: after a failed download the key may already name
            # a retry that another request started and pinned.
            self._unpin(version)
            raise
        return version.path

    def unpin(self, record: AdapterRecord) -> None:
        version = self._versions.get(record.versioned_ref)
        if version is not None:
            self._unpin(version)

    def retire(self, record: AdapterRecord) -> None:
        """This version is no longer served: delete it now, or when its last pin goes."""
        version = self._versions.get(record.versioned_ref)
        if version is None:
            shutil.rmtree(self._version_dir(record), ignore_errors=True)
        elif self._versions.retire(version) is EntryState.DROPPED:
            _delete(version)

    # -- internals -------------------------------------------------------------

    def _unpin(self, version: _CachedVersion) -> None:
        # Neither dropped nor idle: still pinned, downloading (`_download` decides), or a failed download (gone).
        state = self._versions.release(version)
        if state is EntryState.DROPPED:
            _delete(version)
        elif state is EntryState.IDLE:
            self._shrink()

    def _version_dir(self, record: AdapterRecord) -> Path:
        return self._root / record.owner / record.name / record.version

    async def _download(self, version: _CachedVersion, record: AdapterRecord) -> None:
        try:
            # (The common case, no folder yet, skips a thread hop: it is on the cold path's clock.)
            if not version.path.is_dir() or not await asyncio.to_thread(_matches, version.path, record):
                await self._traced_fetch(version.path, record)
        except asyncio.CancelledError:  # the app is shutting down
            self._versions.set_failed(version, None)
            raise
        except Exception as exc:
            self._versions.set_failed(version, exc)
            return
        version.size = sum(f.size for f in record.files)
        if self._versions.set_loaded(version) is EntryState.DROPPED:
            _delete(version)  # retired while downloading, and every request for it has left
        else:
            self._shrink()

    async def _traced_fetch(self, dest: Path, record: AdapterRecord) -> None:
        attributes = {
            **spans.adapter_attributes(record),
            spans.FETCH_SOURCE: self._source,
            spans.FETCH_BYTES: sum(f.size for f in record.files),
        }
        with self._tracer.start_as_current_span(spans.FETCH, attributes=attributes) as span:
            async with self._downloads:
                started = time.perf_counter()
                try:
                    await self._fetch_verified(dest, record, span)
                except Exception:
                    self._metrics.load_finished(TIER_DISK, elapsed_since(started), ok=False)
                    raise
                finally:
                    span.set_attribute(spans.FETCH_DURATION, elapsed_since(started))
            self._metrics.load_finished(TIER_DISK, elapsed_since(started), ok=True)

    async def _fetch_verified(self, dest: Path, record: AdapterRecord, span: trace.Span) -> None:
        span.set_attribute(spans.FETCH_RETRIES, 0)
        for attempt in range(1, self._attempts + 1):
            staging = self._root / f".download-{uuid.uuid4().hex}"
            staging.mkdir(parents=True)
            try:
                for f in record.files:
                    await self._store.fetch_file(record, f.name, staging / f.name)
                    actual = await asyncio.to_thread(sha256_file, staging / f.name)
                    if actual != f.sha256:
                        raise ChecksumMismatchError(
                            f"{f.name} of {record.versioned_ref}: sha256 {actual[:12]}... does not match "
                            f"the record's {f.sha256[:12]}..."
                        )
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(dest, ignore_errors=True)
                staging.rename(dest)  # the folder appears complete, at once
                log.info("fetched %s from %s", record.versioned_ref, self._store.url)
                return
            except (ChecksumMismatchError, StoreUnavailableError) as exc:
                if attempt == self._attempts:
                    raise
                log.warning("fetching %s failed (attempt %d): %s", record.versioned_ref, attempt, exc)
                span.add_event("retry", {"attempt": attempt, "reason": f"{type(exc).__name__}: {exc}"})
                span.set_attribute(spans.FETCH_RETRIES, attempt)
                await asyncio.sleep(0.2 * 2**attempt)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _shrink(self) -> None:
        """Drop least recently used unpinned versions until the cache fits its budget."""
        used = self.used_bytes
        for version in list(self._versions.idle()):
            if used <= self._max_bytes:
                return
            log.info("disk cache: dropping %s (least recently used, %d bytes)", version.key, version.size)
            self._versions.evict(version)
            _delete(version)
            used -= version.size


def _delete(version: _CachedVersion) -> None:
    """The folder of a version out of the cache."""
    shutil.rmtree(version.path, ignore_errors=True)


def _matches(folder: Path, record: AdapterRecord) -> bool:
    """A folder left by an earlier run is reused only if every file matches the record."""
    return all(
        (folder / f.name).is_file()
        and (folder / f.name).stat().st_size == f.size
        and sha256_file(folder / f.name) == f.sha256
        for f in record.files
    )
