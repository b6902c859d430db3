"""SIGTERM: readiness turns 503 and new requests are refused, while a stream started before it
runs to its end; then the process exits 0."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import requests

from gateway.dev.models import DevModel
from gateway.dev.tiny_model import BASE_MODEL_NAME
from tests.e2e.conftest import ADMIN, Keys, client_for, start_gateway

pytestmark = pytest.mark.e2e

STREAM_TOKENS = 1500  # several seconds of generation here


def test_sigterm_drains_streams_and_refuses_new_work(tiny: DevModel, keys: Keys, tmp_path) -> None:
    server = start_gateway(tiny, keys, tmp_path, drain_timeout_s=120)
    try:
        client = client_for(server, keys.by_user[ADMIN])
        stream = client.completions.create(
            model="alice/chat", prompt="x", max_tokens=STREAM_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = iter(stream)
        first = next(chunks)  # generating: the request is in flight
        received = [first]
        finished = threading.Event()

        def read_rest() -> None:
            received.extend(chunks)
            finished.set()

        reader = threading.Thread(target=read_rest)
        reader.start()
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)

        headers = {"Authorization": f"Bearer {keys.by_user[ADMIN]}"}
        deadline = time.monotonic() + 10
        while requests.get(server.base_url + "/readyz", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "/readyz did not turn 503 after SIGTERM"
            time.sleep(0.05)
        assert not finished.is_set(), "the stream ended before the drain could be observed"
        refused = requests.post(
            server.base_url + "/v1/completions",
            json={"model": BASE_MODEL_NAME, "prompt": "x", "max_tokens": 2},
            headers=headers,
            timeout=30,
        )
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "service_unavailable"
        assert int(refused.headers["Retry-After"]) >= 1

        reader.join(120)
        assert finished.is_set()
        assert received[-1].usage is not None and received[-1].usage.completion_tokens == STREAM_TOKENS
        assert server.process.wait(60) == 0
    finally:
        server.stop()
