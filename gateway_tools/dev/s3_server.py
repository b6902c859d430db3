"""A real S3 HTTP API on loopback (moto's server), for the tests and the benchmarks.

The server is moto's `ThreadedMotoServer`, a thread of this process, so moto's buckets
(module-level state) outlive `stop()`: `stop()` then `start()` on the same port is an outage
the data survives. Seen on moto 5.2.5 / werkzeug 3.1: stop() closes the listening socket
(werkzeug's serve_forever does on shutdown) and moto answers every request with
`Connection: close`, so no pooled connection outlives it: clients get connection refused at
once, and the port can be bound again right away.

    with S3Server() as s3:
        s3.create_bucket("adapters")
        env = s3.client_env()  # for a child gateway: --store s3://adapters/prefix

`python -m gateway_tools.dev.s3_server --bucket adapters` serves one from its own process instead.
"""

from __future__ import annotations

import argparse
import logging
import socket
import threading
import time
from types import TracebackType
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

from gateway_tools.dev.process import free_port

REGION = "us-east-1"  # no LocationConstraint needed


def _wait_until_free(host: str, port: int, timeout_s: float = 5.0) -> None:
    """ThreadedMotoServer.start() waits forever if its thread cannot bind: fail clearly instead."""
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as werkzeug binds
            try:
                probe.bind((host, port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise OSError(f"port {port} on {host} is taken: cannot start the S3 server there") from None
        time.sleep(0.1)


class S3Server:
    host = "127.0.0.1"  # loopback only: moto checks no signatures

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._server: ThreadedMotoServer | None = None
        # werkzeug logs a line per request unless its logger already has a level.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> S3Server:
        if self._server is None:
            _wait_until_free(self.host, self.port)
            self._server = ThreadedMotoServer(self.host, self.port, verbose=False)
            self._server.start()
        return self

    def stop(self) -> None:
        """Refuse connections from now on; buckets and objects are kept for the next start()."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client_env(self) -> dict[str, str]:
        """What a process needs to reach this server through the standard AWS settings."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            # These beat a profile's settings; no IMDS probe on a machine without credentials.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        """A plain boto3 S3 client for this server (set-up and inspection in tests)."""
        env = self.client_env()
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )

    def create_bucket(self, name: str) -> str:
        """Create `name` (3+ characters) unless it exists; returns the name."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="A loopback S3 server (moto) until interrupted.")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    opts = parser.parse_args()
    with S3Server(opts.port) as server:
        for bucket in opts.bucket:
            server.create_bucket(bucket)
        print(" ".join(f"{k}={v}" for k, v in server.client_env().items() if v), flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
