"""`lora-gateway adapters push|list|show|rm|register`: manage the adapters in a store."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

from adapters_manifest.open_store import open_store
from adapters_manifest.publish import publish, validated_record
from adapters_manifest.published_base import PublishedBase
from adapters_manifest.record import (
    ADAPTER_FILES,
    MAX_DESCRIPTION_CHARS,
    MAX_ROUTE_CHARS,
    MAX_ROUTES,
    AdapterRecord,
    check_name,
    check_routing,
    check_upload_name,
)
from adapters_manifest.store import AdapterStore, StoreUnavailableError
from adapters_manifest.validation import AdapterValidationError, BaseModelSpec, ValidationLimits, read_config

DEFAULT_STORE = "adapter-store"


def _parser() -> argparse.ArgumentParser:
    common = store_option()
    parser = argparse.ArgumentParser(prog="lora-gateway adapters", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    flags = upload_options(required=True)
    push = commands.add_parser("push", parents=[common, flags], help="validate and upload an adapter folder")
    push.add_argument("folder", type=Path)
    register = commands.add_parser("register", parents=[common, flags], help="adopt adapter files already in S3")
    register.add_argument("source", help="s3://bucket/prefix holding adapter_config.json and adapter_model.safetensors")
    listing = commands.add_parser("list", parents=[common], help="list adapters")
    listing.add_argument("--owner")
    show = commands.add_parser("show", parents=[common], help="print an adapter's record (JSON, routes included)")
    show.add_argument("ref", help="owner/name")
    remove = commands.add_parser("rm", parents=[common], help="delete an adapter (record, then files)")
    remove.add_argument("ref", help="owner/name")
    return parser


def store_option() -> argparse.ArgumentParser:
    """`--store`, defaulting to $LORA_GATEWAY_STORE."""
    store_default = os.environ.get("LORA_GATEWAY_STORE", DEFAULT_STORE)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store", default=store_default, help=f"s3://bucket/prefix, file:///path or a path (default: {store_default})"
    )
    return common


def upload_options(required: bool) -> argparse.ArgumentParser:
    """Where a published adapter goes and what its record says (push, register, train --push)."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--owner", required=required)
    flags.add_argument("--name", required=required)
    flags.add_argument("--description", default="", help=f"at most {MAX_DESCRIPTION_CHARS} characters")
    flags.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="TEXT",
        help=f"an example request that model 'auto' routes to this adapter (repeatable; at most {MAX_ROUTES} "
        f"routes in all, each 1-{MAX_ROUTE_CHARS} characters, no repeats)",
    )
    flags.add_argument(
        "--routes-file",
        type=Path,
        metavar="FILE",
        help="more routes, one a line (blank lines ignored), after the --route ones",
    )
    flags.add_argument("--public", action="store_true", help="every user may use it (default: only the owner)")
    flags.add_argument(
        "--warm", action="store_true", help="gateways fetch it to disk at start and keep it pinned in their engines"
    )
    flags.add_argument(
        "--model",
        type=Path,
        help="base model folder to check modules and shapes against (default: the base a gateway published to "
        "the store)",
    )
    flags.add_argument("--max-lora-rank", type=int, help="refuse ranks above this (the gateway's --max-lora-rank)")
    flags.add_argument(
        "--base-model",
        help="served base model name: the published base to check against, and the record's "
        "(default: the store's only published base, else from adapter_config.json)",
    )
    return flags


def main(argv: list[str]) -> int:
    opts = _parser().parse_args(argv)
    try:
        store = open_store(opts.store)
        return asyncio.run(COMMANDS[opts.command](store, opts))
    except (AdapterValidationError, ValueError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    except (StoreUnavailableError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


async def _push(store: AdapterStore, opts: argparse.Namespace) -> int:
    record = await upload(store, opts.folder, opts)
    print(f"pushed {record.ref} version {record.version} to {store.url}")
    return 0


async def _register(store: AdapterStore, opts: argparse.Namespace) -> int:
    record_fields(opts)  # before the download, not after
    with tempfile.TemporaryDirectory() as tmp:
        await asyncio.to_thread(_download_s3_folder, opts.source, Path(tmp))
        record = await upload(store, Path(tmp), opts)
    print(f"registered {opts.source} as {record.ref} version {record.version} in {store.url}")
    return 0


async def upload(store: AdapterStore, folder: Path, opts: argparse.Namespace) -> AdapterRecord:
    from tqdm import tqdm

    description, routes = record_fields(opts)
    checks = await _checks_for(store, folder, opts)
    print(checks.said, file=sys.stderr)  # before validating: a refusal says what it was judged by too
    record = validated_record(
        folder,
        opts.owner,
        opts.name,
        base=checks.base,
        limits=checks.limits,
        base_model=checks.base_model,
        description=description,
        routes=routes,
        visibility="public" if opts.public else "private",
        warm=opts.warm,
    )
    total = sum(f.size for f in record.files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"{record.ref}", file=sys.stderr) as bar:
        return await publish(store, folder, record, progress=bar.update)


def record_fields(opts: argparse.Namespace) -> tuple[str, list[str]]:
    """Check the upload flags (ValueError): owner, name (not a reserved one), description and routes.
    Returns the description and routes the record gets: the --route values, then --routes-file's lines."""
    check_name(opts.owner, "owner")
    check_upload_name(opts.name)
    routes = list(opts.route)
    if opts.routes_file is not None:
        routes += _read_routes_file(opts.routes_file)
    return check_routing(opts.description, routes)


def _read_routes_file(path: Path) -> list[str]:
    """One route a line; blank lines ignored. ValueError (exit 2, one line) when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--routes-file {path}: not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"--routes-file {path}: {exc.strerror or exc}") from None
    return [line for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class _Checks:
    base: BaseModelSpec | None  # None: the adapter's structure only
    limits: ValidationLimits
    base_model: str  # for the record
    said: str  # what the adapter was checked against, for the user


async def _checks_for(store: AdapterStore, folder: Path, opts: argparse.Namespace) -> _Checks:
    """A base folder given with --model; else the base a gateway published to the store (the
    exact checks that gateway runs); else structural checks only, said loudly."""
    if opts.model is not None:
        return _Checks(
            BaseModelSpec.from_model_dir(opts.model, opts.max_lora_rank),
            ValidationLimits(),
            opts.base_model or _base_model_of(folder),
            f"checked against the base model in {opts.model}",
        )
    published = await store.list_bases()
    wanted = opts.base_model or (published[0] if len(published) == 1 else _base_model_of(folder))
    data = await store.get_base(wanted) if wanted in published else None
    if data is None:
        if opts.max_lora_rank is not None:
            raise ValueError("--max-lora-rank needs --model (the base the rank and shapes are checked against)")
        return _Checks(
            None,
            ValidationLimits(),
            wanted,
            f"warning: no gateway published base {wanted!r} to {store.url} "
            f"(published: {', '.join(published) or 'none'}): only the adapter's structure was checked; "
            "pass --model BASE_FOLDER, --base-model NAME, or start a gateway on this store first",
        )
    base = PublishedBase.model_validate_json(data)
    spec = base.spec()
    if opts.max_lora_rank is not None:  # stricter than the gateway's, never looser
        spec = replace(spec, max_lora_rank=min(opts.max_lora_rank, spec.max_lora_rank or opts.max_lora_rank))
    return _Checks(
        spec,
        base.limits(),
        base.base_model,
        f"checked against base {base.base_model} as its gateway published it to {store.url} "
        f"({base.published_at:%Y-%m-%d %H:%M} UTC): max rank {base.max_lora_rank}, {len(base.module_shapes)} modules",
    )


def _base_model_of(folder: Path) -> str:
    """PEFT writes the base it trained on into the config; a record keeps its last path part."""
    config = read_config(folder)
    return Path(str(config.get("base_model_name_or_path") or "unknown")).name or "unknown"


def _download_s3_folder(source: str, dest: Path) -> None:
    import boto3

    parsed = urlparse(source)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"register takes s3://bucket/prefix, not {source!r}")
    client = boto3.client("s3")
    prefix = parsed.path.strip("/")
    for file_name in ADAPTER_FILES:
        client.download_file(parsed.netloc, f"{prefix}/{file_name}" if prefix else file_name, str(dest / file_name))


async def _list(store: AdapterStore, opts: argparse.Namespace) -> int:
    records = [r for r in await store.list_records() if opts.owner in (None, r.owner)]
    rows = [("ADAPTER", "VERSION", "RANK", "VISIBILITY", "BYTES", "CREATED", "ROUTES", "DESCRIPTION")]
    rows += [
        (
            r.ref,
            r.version,
            str(r.rank),
            r.visibility,
            str(sum(f.size for f in r.files)),
            r.created_at.strftime("%Y-%m-%d %H:%M"),
            str(len(r.routes)),
            r.description,
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


async def _show(store: AdapterStore, opts: argparse.Namespace) -> int:
    owner, name = _split_ref(opts.ref)
    record = await store.get_record(owner, name)
    if record is None:
        print(f"no adapter {opts.ref} in {store.url}", file=sys.stderr)
        return 1
    print(record.model_dump_json(indent=2))
    return 0


async def _remove(store: AdapterStore, opts: argparse.Namespace) -> int:
    owner, name = _split_ref(opts.ref)
    if not await store.delete_adapter(owner, name):
        print(f"no adapter {opts.ref} in {store.url}", file=sys.stderr)
        return 1
    print(f"deleted {opts.ref} from {store.url}")
    return 0


def _split_ref(ref: str) -> tuple[str, str]:
    owner, _, name = ref.partition("/")
    return check_name(owner, "owner"), check_name(name)


COMMANDS = {"push": _push, "register": _register, "list": _list, "show": _show, "rm": _remove}
