"""The engine core process dies mid-load: requests in flight get a clear 503, /readyz says 503,
and the gateway exits non-zero so its supervisor (Kubernetes) restarts it.

What is accepted, and why: a whole (non-streamed) response has sent nothing when the engine dies,
so it must be a 503 with OpenAI's JSON error and Retry-After. A stream has already sent its 200
and some tokens: the status cannot change, so it must end with an error event in OpenAI's shape
(code service_unavailable) and then `data: [DONE]`, never just a cut connection.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gateway_tools.dev.models import DevModel
from gateway_tools.dev.process import ServerProcess
from gateway_tools.dev.tiny_model import BASE_MODEL_NAME
from tests.e2e.conftest import ADMIN, Keys, start_gateway

pytestmark = pytest.mark.e2e

LONG = 1900  # tokens (the context is 2048): seconds of generation here, still running at the kill
STREAMS = 4
WHOLE = 4


def engine_core(server: ServerProcess) -> psutil.Process:
    """vLLM's engine core: the gateway's child process that runs the model."""
    assert server.process is not None
    children = psutil.Process(server.process.pid).children(recursive=True)
    cores = [c for c in children if "EngineCore" in c.name() or "EngineCore" in " ".join(c.cmdline())]
    assert len(cores) == 1, [(c.pid, c.name(), c.cmdline()) for c in children]
    return cores[0]


def seats_in_use(url: str) -> float:
    """The sequences the gateway has admitted into the engine and not yet ended, from its /metrics page."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "lora_gateway_engine_seats_in_use")  # fmt: skip


def sse_events(body: str) -> list[Any]:
    return [line[5:].strip() for line in body.splitlines() if line.startswith("data:")]


def test_engine_core_killed_mid_load(tiny: DevModel, keys: Keys, tmp_path) -> None:
    server = start_gateway(tiny, keys, tmp_path, max_loras=2, max_cpu_loras=2)
    headers = {"Authorization": f"Bearer {keys.by_user[ADMIN]}"}
    url = server.base_url
    models = [BASE_MODEL_NAME, "alice/chat", "bob/chat"]
    core = engine_core(server)
    try:
        # Once every stream has begun, the engine core is stopped (SIGSTOP), so no request can make its tokens
        # and finish, however slowly this host then gets the whole requests in; SIGKILL comes after.
        started_streams = threading.Barrier(STREAMS + 1, action=lambda: core.send_signal(signal.SIGSTOP), timeout=120)

        def whole(i: int) -> requests.Response:
            body = {"model": models[i % 3], "prompt": "def f(x):", "max_tokens": LONG, "temperature": 0}
            return requests.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)

        def stream(i: int) -> tuple[int, str]:
            body = {"model": models[i % 3], "prompt": "import os", "max_tokens": LONG, "temperature": 0, "stream": True}
            with requests.post(f"{url}/v1/completions", json=body, headers=headers, stream=True, timeout=120) as r:
                lines = r.iter_lines(decode_unicode=True)
                received = [next(lines)]  # the first token: the stream has begun
                started_streams.wait()
                received += list(lines)
                return r.status_code, "\n".join(received)

        for model in models:  # the adapters in the engine already, so that every request below enters at once
            body = {"model": model, "prompt": "hi", "max_tokens": 1}
            assert requests.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120).ok

        with ThreadPoolExecutor(WHOLE + STREAMS) as pool:
            streams = [pool.submit(stream, i) for i in range(STREAMS)]
            wholes = [pool.submit(whole, i) for i in range(WHOLE)]
            started_streams.wait()  # every stream has begun, and the engine core is stopped
            deadline = time.monotonic() + 120
            while seats_in_use(url) < STREAMS + WHOLE:  # the whole requests are in the engine too
                assert time.monotonic() < deadline, "the requests never were all in the engine at once"
                time.sleep(0.05)
            assert not any(f.done() for f in wholes + streams), "a request finished before the kill"
            readyz: list[tuple[int, dict[str, Any]]] = []
            core.send_signal(signal.SIGKILL)
            deadline = time.monotonic() + 30
            assert server.process is not None
            while server.process.poll() is None and time.monotonic() < deadline:
                try:
                    r = requests.get(f"{url}/readyz", timeout=5)
                    readyz.append((r.status_code, r.json()))
                except requests.ConnectionError:
                    break  # the gateway stopped listening on its way out
                time.sleep(0.02)

            for future in wholes:
                response = future.result(timeout=60)
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "service_unavailable"
                assert int(response.headers["Retry-After"]) >= 1
            for future in streams:
                status, body = future.result(timeout=60)
                assert status == 200
                events = sse_events(body)
                assert events[-1] == "[DONE]", body[-500:]
                error = json.loads(events[-2])
                assert error["error"]["code"] == "service_unavailable", error

        # Before the engine's death is noticed /readyz may still say 200; after, never again.
        dead = [i for i, (status, body) in enumerate(readyz) if status == 503 and body.get("reason") == "engine dead"]
        assert dead, readyz
        assert all(status == 503 for status, _ in readyz[dead[0] :]), readyz
        assert server.process.wait(30) == 1, server.log_tail()
        assert "exiting so the process is restarted" in server.log_tail(200)
    finally:
        if core.is_running():
            core.send_signal(signal.SIGCONT)  # a failed assertion left it stopped: let it shut down
        server.stop()
