"""`lora-gateway keys add|list|rm`: manage the API keys file (only hashes are stored)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from adapters_manifest.record import check_name
from gateway.auth.keys import add_key, read_keys_file, remove_keys


def _user(value: str) -> str:
    try:
        return check_name(value, "user")  # users are namespaces: the same rules as owners
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str]) -> int:
    keys_file_default = os.environ.get("LORA_GATEWAY_KEYS_FILE")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--keys-file",
        type=Path,
        required=keys_file_default is None,
        default=keys_file_default,
        help="the keys file the gateway reads (--keys-file of serve)",
    )
    parser = argparse.ArgumentParser(prog="lora-gateway keys", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", parents=[common], help="create a key; it is printed once, on the last line")
    add.add_argument("user", type=_user)
    add.add_argument("--admin", action="store_true", help="may manage every namespace")
    add.add_argument("--label", default="", help="a note to recognise the key by")
    commands.add_parser("list", parents=[common], help="list keys (ids and users, never keys)")
    remove = commands.add_parser("rm", parents=[common], help="revoke keys")
    remove.add_argument("--id", dest="key_id", help="the key id shown by list")
    remove.add_argument("--user", type=_user, help="every key of this user")
    opts = parser.parse_args(argv)

    if opts.command == "add":
        key, entry = add_key(opts.keys_file, opts.user, admin=opts.admin, label=opts.label)
        role = "admin" if entry.admin else "user"
        print(f"Added key {entry.id} for {role} {entry.user} to {opts.keys_file}. It is shown only now:")
        print(key)
    elif opts.command == "list":
        for entry in read_keys_file(opts.keys_file).keys:
            print(f"{entry.id}  {entry.user}{'  (admin)' if entry.admin else ''}  {entry.label}".rstrip())
    else:
        if not (opts.key_id or opts.user):
            parser.error("rm needs --id or --user")
        removed = remove_keys(opts.keys_file, user=opts.user, key_id=opts.key_id)
        if not removed:  # a mistyped id must not pass for a revocation
            print(f"no key matched {'id ' + opts.key_id if opts.key_id else 'user ' + opts.user}", file=sys.stderr)
            return 1
        print(f"revoked {removed} key(s)")
    return 0
