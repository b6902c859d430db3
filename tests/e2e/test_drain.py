"""SIGTERM: readiness turns 503 and new requests are refused, while a stream started before it
runs to its end; then the process exits 0."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
import urllib.parse

import pytest
import requests

from gateway_tools.dev.models import DevModel
from gateway_tools.dev.tiny_model import BASE_MODEL_NAME
from tests.e2e.conftest import ADMIN, Keys, start_gateway

pytestmark = pytest.mark.e2e

# 8 sequences of 1500 tokens with their top-5 logprobs: ~8 MB of events, more than the kernel buffers on
# both ends of the small socket below can hold (the send buffer grows to tcp_wmem's 4 MB at most)
STREAM_TOKENS, SEQUENCES, LOGPROBS = 1500, 8, 5
RECEIVE_BUFFER_BYTES = 4096


def open_stream(base_url: str, key: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A streamed completion on a socket with a small receive buffer: while the test reads nothing, the
    gateway cannot send the stream to its end, so the request stays in flight however fast the engine is
    and however slowly the test runs."""
    url = urllib.parse.urlsplit(base_url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
    sock.settimeout(120)
    sock.connect((url.hostname, url.port))
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    connection.sock = sock
    body = {"model": "alice/chat", "prompt": "x", "max_tokens": STREAM_TOKENS, "n": SEQUENCES, "logprobs": LOGPROBS,
            "temperature": 1.0, "seed": 1, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connection.request("POST", "/v1/completions", body=json.dumps(body), headers=headers)
    response = connection.getresponse()
    assert response.status == 200, response.read()[:500]
    return connection, response


def events(lines: list[bytes]) -> list[dict]:
    return [json.loads(line[len(b"data: ") :]) for line in lines if line.startswith(b"data: {")]


def test_sigterm_drains_streams_and_refuses_new_work(tiny: DevModel, keys: Keys, tmp_path) -> None:
    server = start_gateway(tiny, keys, tmp_path, drain_timeout_s=120, stalled_read_timeout_s=600)
    try:
        connection, response = open_stream(server.base_url, keys.by_user[ADMIN])
        first = response.readline()  # generating: the request is in flight
        assert first.startswith(b"data: {")
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)

        headers = {"Authorization": f"Bearer {keys.by_user[ADMIN]}"}
        deadline = time.monotonic() + 60
        while requests.get(server.base_url + "/readyz", timeout=30).status_code != 503:
            assert time.monotonic() < deadline, "/readyz did not turn 503 after SIGTERM"
            time.sleep(0.05)
        refused = requests.post(
            server.base_url + "/v1/completions",
            json={"model": BASE_MODEL_NAME, "prompt": "x", "max_tokens": 2},
            headers=headers,
            timeout=30,
        )
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "service_unavailable"
        assert int(refused.headers["Retry-After"]) >= 1

        rest = response.read().splitlines()  # the stream started before SIGTERM runs to its end
        connection.close()
        usage = [e["usage"] for e in events([first, *rest]) if e.get("usage")]
        assert usage and usage[-1]["completion_tokens"] == STREAM_TOKENS * SEQUENCES
        assert rest[-1] == b"data: [DONE]" or b"data: [DONE]" in rest
        assert server.process.wait(60) == 0
        assert "draining 1 in-flight requests" in server.log_tail(20_000)
    finally:
        server.stop()
