"""Slow clients cannot hold connections: a request head that does not arrive, an idle keep-alive
connection and a stream nobody reads are each closed after their (configurable) bound. On the real
app and HTTP server (runner_options, as `serve` starts it) with the fake engine, over raw sockets."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from adapters_manifest.local_store import LocalFolderStore
from gateway.server import runner_options
from tests.fakes import FakeEngine, publish_adapter
from tests.unit.harness import BASE, gateway_app, gateway_settings, until, wait_ready

WAIT_S = 10.0  # generous: the bounds under test are a fraction of a second


Serve = Callable[..., Awaitable[int]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """Start the gateway on a loopback port with these settings; returns the port."""
    runners: list[web.AppRunner] = []

    async def start(engine: FakeEngine, **settings: Any) -> int:
        store = LocalFolderStore(tmp_path / "store")
        await publish_adapter(store, tmp_path, "alice", "coding", base_model=BASE)
        serve_settings = gateway_settings(tmp_path, store, **settings)
        runner = web.AppRunner(gateway_app(serve_settings, engine), **runner_options(serve_settings))
        runners.append(runner)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = int(runner.addresses[0][1])
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as session:
            await wait_ready(session)
        return port

    yield start
    for runner in runners:
        await runner.cleanup()


def connect(port: int, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:  # before connecting: it sets the window the server may fill
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def closed_by_server(sock: socket.socket, timeout_s: float = WAIT_S) -> bool:
    """Reads (and drops) whatever comes until the server closes the connection; False on timeout."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            while await loop.sock_recv(sock, 65536):
                pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


HEAD = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n"


async def test_a_request_head_that_does_not_arrive_is_closed_after_the_bound(serve: Serve) -> None:
    port = await serve(FakeEngine(), keepalive_timeout_s=0.3)
    connections = [connect(port) for _ in range(20)]
    loop = asyncio.get_running_loop()
    for sock in connections:  # headers started, never finished
        await loop.sock_sendall(sock, HEAD)
    started = time.monotonic()
    closed = await asyncio.gather(*(closed_by_server(sock) for sock in connections))
    assert all(closed) and time.monotonic() - started < WAIT_S
    for sock in connections:
        sock.close()


async def test_a_head_sent_byte_by_byte_does_not_extend_the_bound(serve: Serve) -> None:
    port = await serve(FakeEngine(), keepalive_timeout_s=0.5)
    sock = connect(port)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for byte in HEAD + b"X-Slow: " + b"a" * 8000:  # 8 kB at 10 bytes a second: 13 minutes of headers
            await loop.sock_sendall(sock, bytes([byte]))
            await asyncio.sleep(0.1)
            assert time.monotonic() - started < WAIT_S, "still open"
    sock.close()


async def test_an_idle_keep_alive_connection_is_closed_after_the_bound(serve: Serve) -> None:
    port = await serve(FakeEngine(), keepalive_timeout_s=0.3)
    sock = connect(port)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, HEAD + b"\r\n")
    assert (await loop.sock_recv(sock, 65536)).startswith(b"HTTP/1.1 200")
    assert await closed_by_server(sock)  # kept alive, then idle
    sock.close()


async def test_a_stream_whose_client_stops_reading_is_cut_and_its_generation_aborted(serve: Serve) -> None:
    engine = FakeEngine(max_model_len=1 << 20)
    port = await serve(engine, stalled_read_timeout_s=0.5)
    body = b'{"model": "alice/coding", "prompt": "Hi", "max_tokens": 500000, "stream": true}'
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    sock = connect(port, receive_buffer=4096)
    await asyncio.get_running_loop().sock_sendall(sock, request)
    # Never read: the buffers fill and the gateway's writes block.
    await until(lambda: engine.active_generations == 1, WAIT_S)
    await until(lambda: engine.active_generations == 0, WAIT_S)
    assert len(engine.aborted) == 1  # cut short, not finished
    assert await closed_by_server(sock)
    sock.close()
    engine.check()
