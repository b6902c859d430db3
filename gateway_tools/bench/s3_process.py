"""moto's S3 server in a process of its own that the benchmark can stop and start (an outage).

Its own process, so moto's request handling does not share the benchmark's GIL and event loop;
moto's buckets live in that process, so they survive a stop and start (S3Server keeps them).
The child reads `stop` / `start` lines on stdin and answers `ok` once done.
"""

from __future__ import annotations

import subprocess
import sys
from types import TracebackType

from gateway_tools.dev.process import free_port


class S3Process:
    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.port = free_port()
        self.env: dict[str, str] = {}
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> S3Process:
        command = [sys.executable, "-m", "gateway_tools.bench.s3_process", str(self.port), self.bucket]
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        line = self._read()  # printed once the bucket exists
        self.env = dict(item.split("=", 1) for item in line.split())
        return self

    def _read(self) -> str:
        assert self._process is not None and self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the S3 server exited with {self._process.wait()}")
        return line.strip()

    def _command(self, word: str) -> None:
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write(word + "\n")
        self._process.stdin.flush()
        if (answer := self._read()) != "ok":
            raise RuntimeError(f"the S3 server answered {answer!r} to {word!r}")

    def stop(self) -> None:
        """Connections are refused from now on; the data is kept."""
        self._command("stop")

    def start(self) -> None:
        self._command("start")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)


def _child(port: int, bucket: str) -> None:
    from gateway_tools.dev.s3_server import S3Server

    server = S3Server(port).start()
    server.create_bucket(bucket)
    print(" ".join(f"{k}={v}" for k, v in server.client_env().items()), flush=True)
    for line in sys.stdin:
        word = line.strip()
        if word == "stop":
            server.stop()
        elif word == "start":
            server.start()
        else:
            print(f"unknown command {word}", flush=True)
            continue
        print("ok", flush=True)
    server.stop()


if __name__ == "__main__":
    _child(int(sys.argv[1]), sys.argv[2])
