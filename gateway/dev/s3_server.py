"""A real S3 HTTP API on loopback (moto's server), for the tests and the benchmarks.

The server runs in a thread of this process, so moto's buckets (module-level state) outlive
`stop()`: `stop()` then `start()` on the same port is an outage that the data survives.
`stop()` closes the listening socket and every open connection, so clients see connection
refused at once (not a hang). moto's own `ThreadedMotoServer.stop()` does neither: its
socket stays bound and its keep-alive connections keep being served.

    with S3Server() as s3:
        s3.create_bucket("adapters")
        env = s3.client_env()  # for a child gateway: --store s3://adapters/prefix

`python -m gateway.dev.s3_server --bucket adapters` serves one from its own process instead.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from types import TracebackType
from typing import Any

import boto3
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import ThreadedWSGIServer

from gateway.dev.process import free_port

REGION = "us-east-1"  # no LocationConstraint needed


class _QuietHandler(MotoRequestHandler):
    def log_request(self, *args: Any) -> None:  # one line per request drowns benchmark logs
        pass


class _Server(ThreadedWSGIServer):
    """Remembers its open connections so that stop() can cut them like an outage would."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        with self.lock:
            self.connections.add(conn)
        return conn, addr

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        with self.lock:
            conns = list(self.connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # the handler thread sees EOF and ends
            except OSError:
                pass


class S3Server:
    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host  # loopback only: moto checks no signatures
        self.port = port or free_port()
        self._app = DomainDispatcherApplication(create_backend_app)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> S3Server:
        if self._server is not None:
            return self
        deadline = time.monotonic() + 10
        while True:  # after a stop, the port may take a moment to be free again
            try:
                self._server = _Server(self.host, self.port, self._app, handler=_QuietHandler)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Refuse connections from now on; buckets and objects are kept for the next start()."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server.cut_connections()
        assert self._thread is not None
        self._thread.join()
        self._server = self._thread = None

    @property
    def running(self) -> bool:
        return self._server is not None

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

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
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
