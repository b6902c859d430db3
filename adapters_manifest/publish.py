"""Publishing an adapter folder to a store: files first, the record last (the commit point)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from adapters_manifest.adapter_dir import describe_files
from adapters_manifest.record import AdapterRecord, check_routing, check_upload_name, content_version
from adapters_manifest.store import AdapterStore, ProgressCallback, RecordConflictError
from adapters_manifest.validation import BaseModelSpec, ValidationLimits, read_config, validate_adapter_dir

MAX_COMMIT_ATTEMPTS = 5


def record_for(
    folder: Path,
    owner: str,
    name: str,
    *,
    base_model: str,
    description: str = "",
    routes: Sequence[str] = (),
    visibility: str = "private",
    warm: bool = False,
) -> AdapterRecord:
    """The record an adapter folder would get; its version is the hash of its files (and of its
    description and routes, if any). It checks only those (RoutingError): uploads use `validated_record`."""
    description, checked_routes = check_routing(description, routes)
    files = describe_files(folder)
    config = read_config(folder)
    return AdapterRecord(
        owner=owner,
        name=name,
        version=content_version(files, description, checked_routes),
        base_model=base_model,
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        target_modules=sorted(config["target_modules"]),
        files=files,
        description=description,
        routes=checked_routes,
        visibility=visibility,
        warm=warm,
    )


def validated_record(
    folder: Path,
    owner: str,
    name: str,
    *,
    base: BaseModelSpec | None,
    limits: ValidationLimits = ValidationLimits(),
    base_model: str,
    description: str = "",
    routes: Sequence[str] = (),
    visibility: str = "private",
    warm: bool = False,
) -> AdapterRecord:
    """Every upload path: refuse a reserved name or bad routing fields (ValueError, RoutingError)
    before the costlier adapter checks (AdapterValidationError), else describe it."""
    check_upload_name(name)
    check_routing(description, routes)
    validate_adapter_dir(folder, base, limits)
    return record_for(
        folder,
        owner,
        name,
        base_model=base_model,
        description=description,
        routes=routes,
        visibility=visibility,
        warm=warm,
    )


async def publish(
    store: AdapterStore, folder: Path, record: AdapterRecord, progress: ProgressCallback | None = None
) -> AdapterRecord:
    """Upload the version's files unless the store has them (versions are immutable), then the
    record, conditionally: a delete (or another publish) that came in between makes the commit
    fail, and the files are checked (and put back) before trying again."""
    for _ in range(MAX_COMMIT_ATTEMPTS):
        stamp = await store.record_stamp(record.owner, record.name)
        if not await store.has_version(record):
            for f in record.files:
                await store.put_file(record, f.name, folder / f.name, progress)
        try:
            await store.put_record(record, if_stamp=stamp, if_absent=stamp is None)
        except RecordConflictError:
            continue
        return record
    raise RecordConflictError(f"{record.ref} kept changing while it was published; try again")
