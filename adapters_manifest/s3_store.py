"""A store in an S3 bucket (`s3://bucket/prefix`), on AWS or any S3-compatible endpoint.

Endpoint, region and credentials come from the standard AWS settings (AWS_ENDPOINT_URL or
AWS_ENDPOINT_URL_S3, AWS_DEFAULT_REGION or AWS_REGION, AWS_ACCESS_KEY_ID..., AWS_PROFILE and
the config files), so nothing here is specific to one provider. boto3 blocks, so every call
runs in this store's own small thread pool: a hung store cannot take the threads the rest
of the process uses for `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from adapters_manifest import layout
from adapters_manifest.atomic_file import replacing
from adapters_manifest.record import AdapterRecord
from adapters_manifest.store import ProgressCallback, RecordConflictError, StoreAccessError, StoreUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

VERSION = re.compile(r"[0-9a-f]{16}")
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
ACCESS_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "AccountProblem",
}
# A conditional write that lost (412), or one that raced another conditional write (409).
CONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
LOCK_LEASE_S = 60.0  # a lock older than this was left by a writer that died: it may be taken over
LOCK_WAIT_S = 30.0
LOCK_POLL_S = 0.05
THROTTLING_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "ServiceUnavailable"}


def _parse_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> (bucket, "some/prefix"); the prefix may be empty."""
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise ValueError("not an S3 store URL: expected s3://bucket/prefix")
    if "@" in parts.netloc:
        # Never echo the URL: it holds a secret.
        raise ValueError(
            "an S3 store URL must not hold credentials: use the AWS settings (AWS_ACCESS_KEY_ID, a profile)"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"unsupported query or fragment in S3 store URL {url!r}: expected s3://bucket/prefix")
    if not BUCKET_PATTERN.fullmatch(parts.netloc):
        raise ValueError(f"invalid bucket name {parts.netloc!r} in {url!r}: 3-63 characters of [a-z0-9.-]")
    return parts.netloc, parts.path.strip("/")


def _public_endpoint(endpoint_url: str) -> str:
    """The endpoint for messages: scheme, host and port only (never user info or a query)."""
    parts = urlsplit(endpoint_url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def _user_info(endpoint_url: str) -> str:
    """`user:password@` of an endpoint URL (botocore quotes the URL in its errors), else ""."""
    netloc = urlsplit(endpoint_url).netloc
    return netloc.rpartition("@")[0] + "@" if "@" in netloc else ""


def _error_code(exc: ClientError) -> tuple[str, int]:
    code = exc.response.get("Error", {}).get("Code", "")
    return code, exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


def _is_not_found(exc: ClientError) -> bool:
    return _error_code(exc)[0] in NOT_FOUND_CODES


def _lost_condition(exc: ClientError) -> bool:
    code, status = _error_code(exc)
    return code in CONDITION_CODES or status in (409, 412)


class S3Store:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 5.0,
        max_attempts: int = 3,
        threads: int = 16,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        session = boto3.session.Session()
        # botocore itself reads only AWS_DEFAULT_REGION; AWS_REGION is the other standard name.
        region = session.region_name or os.environ.get("AWS_REGION")
        config = Config(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,  # per socket read, not per transfer: big files are fine
            # Bounded: with the backoff, an unreachable endpoint fails in a few seconds, not minutes.
            retries={"total_max_attempts": max_attempts, "mode": "standard"},  # the first one included
            max_pool_connections=2 * threads,
        )
        # One client for the store's life (clients are thread-safe); endpoint_url=None lets
        # botocore take AWS_ENDPOINT_URL(_S3) or the profile's endpoint_url.
        self._client = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        # download_file retries broken streams itself (5 times by default): keep outages short.
        self._transfer = TransferConfig(num_download_attempts=2)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="s3-store")
        self._where = f"S3 store {self.url} (endpoint {_public_endpoint(self._client.meta.endpoint_url)})"
        self._user_info = _user_info(self._client.meta.endpoint_url)
        # Honour AWS_REQUEST_CHECKSUM_CALCULATION=when_required (for endpoints without checksums).
        when_required = self._client.meta.config.request_checksum_calculation == "when_required"
        self._checksum = {} if when_required else {"ChecksumAlgorithm": "SHA256"}

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> S3Store:
        bucket, prefix = _parse_url(url)
        return cls(bucket, prefix, **kwargs)

    def _key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking boto3 call in the pool, turning outages into StoreUnavailableError."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
        except (BotoCoreError, ClientError, S3UploadFailedError, RetriesExceededError) as exc:
            mapped = self._map_error(exc)
            if mapped is None:
                raise
            raise mapped from exc

    def _map_error(self, exc: Exception) -> StoreUnavailableError | None:
        mapped = self._classify(exc)
        if mapped is not None and self._user_info:
            mapped.args = (str(mapped).replace(self._user_info, ""),)
        return mapped

    def _classify(self, exc: Exception) -> StoreUnavailableError | None:
        # The transfer manager wraps the real error: look at the one it wraps.
        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
            exc = exc.__context__
        if isinstance(exc, RetriesExceededError) and exc.last_exception is not None:
            exc = exc.last_exception
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreAccessError(
                f"{self._where}: no usable AWS credentials ({exc}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
            return StoreUnavailableError(f"{self._where} is unreachable: {exc}")
        if isinstance(exc, ClientError):
            code, status = _error_code(exc)
            if code == "NoSuchBucket":
                return StoreAccessError(f"{self._where}: bucket {self.bucket!r} does not exist")
            if status == 403 or code in ACCESS_CODES:
                return StoreAccessError(
                    f"{self._where}: access denied ({code}); check the credentials and the bucket policy"
                )
            if status >= 500 or code in THROTTLING_CODES:
                what = f"{status} {code}" if code != str(status) else str(status)  # HEAD answers have no body
                return StoreUnavailableError(f"{self._where} answered {what}; try again later")
        return None

    # -- reading -------------------------------------------------------------------

    async def list_stamps(self, owner: str | None = None) -> dict[str, str]:
        return await self._run(self._list_stamps, owner)

    def _list_stamps(self, owner: str | None = None) -> dict[str, str]:
        base = self._key(layout.MANIFEST_DIR) + "/"
        stamps = {}
        prefix = f"{base}{owner}/" if owner else base
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                owner, _, file_name = obj["Key"][len(base) :].partition("/")
                # Exactly `<owner>/<name>.json`, like the local store's `*/*.json`.
                if owner and file_name.endswith(".json") and "/" not in file_name:
                    stamps[f"{owner}/{file_name[: -len('.json')]}"] = obj["ETag"].strip('"')
        return stamps

    async def get_record(self, owner: str, name: str) -> AdapterRecord | None:
        data = await self._run(self._get_bytes, self._key(layout.record_key(owner, name)))
        return None if data is None else AdapterRecord.model_validate_json(data)

    async def record_stamp(self, owner: str, name: str) -> str | None:
        return await self._run(self._record_stamp, owner, name)

    def _record_stamp(self, owner: str, name: str) -> str | None:
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self._key(layout.record_key(owner, name)))
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            raise
        return head["ETag"].strip('"')

    def _get_bytes(self, key: str) -> bytes | None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            raise
        with response["Body"] as body:
            return body.read()

    async def list_records(self) -> list[AdapterRecord]:
        # Many small GETs: overlap them, but no more at once than the pool runs.
        refs = sorted(await self.list_stamps())
        records = await asyncio.gather(*(self.get_record(*ref.split("/")) for ref in refs))
        return [r for r in records if r is not None]

    async def fetch_file(self, record: AdapterRecord, file_name: str, dest: Path) -> None:
        key = self._key(layout.file_key(record, file_name))
        size = next((f.size for f in record.files if f.name == file_name), None)
        if size is not None and size < self._transfer.multipart_threshold:
            # One GET: download_file would HEAD first (a whole round trip more) and start a
            # transfer thread pool, which more than doubles the time of a small file.
            await self._run(self._get_to_file, key, dest)
        else:
            await self._run(self._download, key, dest)

    def _download(self, key: str, dest: Path) -> None:
        try:
            # Ranged GETs in parallel for big files; written to a temporary name, then renamed.
            self._client.download_file(self.bucket, key, str(dest), Config=self._transfer)
        except ClientError as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(f"{key} is not in {self._where}") from exc
            raise

    def _get_to_file(self, key: str, dest: Path) -> None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(f"{key} is not in {self._where}") from exc
            raise
        # Like download_file: a temporary name, renamed once whole (a broken stream leaves nothing).
        body = response["Body"]
        try:
            with replacing(dest) as partial, partial.open("wb") as out:
                for chunk in body.iter_chunks(1 << 20):  # checks the length (and checksum) as it reads
                    out.write(chunk)
        finally:
            body.close()

    async def has_version(self, record: AdapterRecord) -> bool:
        return await self._run(self._has_version, record)

    def _has_version(self, record: AdapterRecord) -> bool:
        for f in record.files:
            try:
                head = self._client.head_object(Bucket=self.bucket, Key=self._key(layout.file_key(record, f.name)))
            except ClientError as exc:
                if _is_not_found(exc):
                    return False
                raise
            if head["ContentLength"] != f.size:  # an interrupted or foreign upload
                return False
        return True

    # -- writing -------------------------------------------------------------------

    async def put_file(
        self, record: AdapterRecord, file_name: str, source: Path, progress: ProgressCallback | None = None
    ) -> None:
        # Multipart above 8 MB; `progress` is called from the transfer threads.
        await self._run(
            self._client.upload_file,
            str(source),
            self.bucket,
            self._key(layout.file_key(record, file_name)),
            ExtraArgs=dict(self._checksum),
            Callback=progress,
            Config=self._transfer,
        )

    async def put_record(self, record: AdapterRecord, *, if_stamp: str | None = None, if_absent: bool = False) -> None:
        await self._run(self._put_record, record, if_stamp, if_absent)

    def _put_record(self, record: AdapterRecord, if_stamp: str | None, if_absent: bool) -> None:
        conditions = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": f'"{if_stamp}"'} if if_stamp else {}
        with self._locked(record.owner, record.name):
            if not self._has_version(record):  # a delete took them since they were put
                raise RecordConflictError(f"files of {record.versioned_ref} are missing")
            try:
                self._client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(layout.record_key(record.owner, record.name)),
                    Body=record.model_dump_json(indent=2).encode(),
                    ContentType="application/json",
                    **conditions,
                    **self._checksum,
                )
            except ClientError as exc:
                # If-Match on a record deleted meanwhile: 404 rather than 412.
                if _lost_condition(exc) or (if_stamp is not None and _is_not_found(exc)):
                    raise RecordConflictError(f"the record of {record.ref} changed meanwhile") from None
                raise
            try:
                self._mark_retired(record)
            except (
                BotoCoreError,
                ClientError,
            ) as e:  # committed all the same: the grace then counts from the files' time
                log.warning("marking the versions %s replaced failed: %s", record.versioned_ref, e)

    def _version_objects(self, owner: str, name: str) -> dict[str, list[dict[str, Any]]]:
        """version -> its objects (as listed: Key, LastModified...)."""
        prefix = self._key(layout.versions_prefix(owner, name))
        versions: dict[str, list[dict[str, Any]]] = {}
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                version, _, file_name = obj["Key"][len(prefix) :].partition("/")
                if VERSION.fullmatch(version) and file_name:
                    versions.setdefault(version, []).append(obj)
        return versions

    def _mark_retired(self, current: AdapterRecord) -> None:
        """The grace period of every version the commit replaced starts now (once: the first
        replacement counts); the current one's marker goes, should it have been retired before."""
        for version, objects in self._version_objects(current.owner, current.name).items():
            marker = (
                f"{self._key(layout.versions_prefix(current.owner, current.name))}{version}/{layout.RETIRED_MARKER}"
            )
            marked = any(obj["Key"] == marker for obj in objects)
            if version == current.version and marked:
                self._client.delete_object(Bucket=self.bucket, Key=marker)
            elif version != current.version and not marked:
                self._client.put_object(Bucket=self.bucket, Key=marker, Body=b"")

    async def list_versions(self, owner: str, name: str) -> dict[str, float]:
        return await self._run(self._list_versions, owner, name)

    def _list_versions(self, owner: str, name: str) -> dict[str, float]:
        versions = {}
        for version, objects in self._version_objects(owner, name).items():
            markers = [o for o in objects if o["Key"].endswith("/" + layout.RETIRED_MARKER)]
            versions[version] = max(o["LastModified"].timestamp() for o in markers or objects)
        return versions

    async def delete_versions(self, owner: str, name: str, versions: set[str]) -> list[str]:
        return await self._run(self._delete_versions, owner, name, versions)

    def _delete_versions(self, owner: str, name: str, versions: set[str]) -> list[str]:
        with self._locked(owner, name):
            data = self._get_bytes(self._key(layout.record_key(owner, name)))
            current = AdapterRecord.model_validate_json(data).version if data is not None else None
            removed = sorted(v for v in versions if v != current and VERSION.fullmatch(v))
            for version in removed:
                self._delete_prefix(f"{self._key(layout.versions_prefix(owner, name))}{version}/", f"{owner}/{name}")
            return removed

    @contextmanager
    def _locked(self, owner: str, name: str) -> Iterator[None]:
        """A lock object created only if absent (a conditional PUT): record commits and deletes of
        one adapter take turns across every gateway and CLI. A lock older than its lease was left
        by a writer that died and is taken over."""
        key = self._key(layout.lock_key(owner, name))
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            lease = json.dumps({"expires_at": time.time() + LOCK_LEASE_S}).encode()
            try:
                etag = self._client.put_object(Bucket=self.bucket, Key=key, Body=lease, IfNoneMatch="*")["ETag"]
                break
            except ClientError as exc:
                if not _lost_condition(exc):
                    raise
            self._take_over_if_expired(key)
            if time.monotonic() > deadline:
                raise StoreUnavailableError(f"{self._where}: {owner}/{name} stayed locked by another writer")
            time.sleep(LOCK_POLL_S)
        try:
            yield
        finally:
            try:
                self._client.delete_object(Bucket=self.bucket, Key=key, IfMatch=etag)
            except ClientError as exc:
                if not _lost_condition(exc):  # else: taken over after our lease ran out
                    raise

    def _take_over_if_expired(self, key: str) -> None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _is_not_found(exc):
                return
            raise
        with response["Body"] as body:
            try:
                expires_at = float(json.loads(body.read())["expires_at"])
            except (ValueError, KeyError, TypeError):
                expires_at = 0.0
        if expires_at < time.time():
            try:
                self._client.delete_object(Bucket=self.bucket, Key=key, IfMatch=response["ETag"])
            except ClientError as exc:
                if not _lost_condition(exc):
                    raise

    async def put_base(self, base_model: str, data: bytes) -> None:
        await self._run(
            self._client.put_object,
            Bucket=self.bucket,
            Key=self._key(layout.base_key(base_model)),
            Body=data,
            ContentType="application/json",
            **self._checksum,
        )

    async def get_base(self, base_model: str) -> bytes | None:
        return await self._run(self._get_bytes, self._key(layout.base_key(base_model)))

    async def list_bases(self) -> list[str]:
        return await self._run(self._list_bases)

    def _list_bases(self) -> list[str]:
        base = self._key(layout.BASES_DIR) + "/"
        names = []
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            names += [
                layout.base_name(o["Key"][len(base) :]) for o in page.get("Contents", []) if o["Key"].endswith(".json")
            ]
        return sorted(names)

    async def delete_adapter(self, owner: str, name: str) -> bool:
        return await self._run(self._delete_adapter, owner, name)

    def _delete_adapter(self, owner: str, name: str) -> bool:
        record_key = self._key(layout.record_key(owner, name))
        with self._locked(owner, name):
            # DeleteObject succeeds on missing keys, so ask first. A GET (not a HEAD) so that a
            # missing bucket says NoSuchBucket instead of a bare 404.
            if self._get_bytes(record_key) is None:
                return False
            self._client.delete_object(Bucket=self.bucket, Key=record_key)  # the commit point: serving stops
            # No record names any version now, and none can be committed until the lock is free.
            self._delete_prefix(self._key(f"{layout.ADAPTERS_DIR}/{owner}/{name}/"), f"{owner}/{name}")
        return True

    def _delete_prefix(self, prefix: str, what: str) -> None:
        """Every object under `prefix` (end it with a slash: `name/` keeps `name2` out)."""
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]  # at most 1,000 a page
            if not keys:
                continue
            response = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
            if errors := response.get("Errors"):
                first = errors[0]
                raise StoreUnavailableError(
                    f"{self._where}: {len(errors)} files of {what} were not deleted "
                    f"(first: {first.get('Key')}: {first.get('Code')})"
                )
