"""The HTTP protocol's bounds (server/http_guard.py) on a small app over real sockets: header bytes, slow heads
and bodies, connection count, and that ordinary keep-alive and long streams are untouched."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402

from tachy.server.background import serve_in_thread  # noqa: E402
from tachy.server.http_guard import ConnectionLimits  # noqa: E402

LIMITS = ConnectionLimits(max_connections=4, max_header_bytes=8 * 1024, header_timeout_s=1.0, body_timeout_s=1.0)


def small_app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks():
            for i in range(8):   # 1.6 s: longer than both timeouts
                yield f"chunk {i}\n"
                await asyncio.sleep(0.2)
        return StreamingResponse(chunks(), media_type="text/plain")

    return app


@pytest.fixture(scope="module")
def address():
    with serve_in_thread(small_app(), limits=LIMITS) as url:
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port)


def connect(address) -> socket.socket:
    s = socket.create_connection(address, timeout=5)
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes (or 5 s pass)."""
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def post(body: bytes = b"{}", extra: bytes = b"") -> bytes:
    return (b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" + extra +
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def response_of(s: socket.socket) -> bytes:
    """One response on a kept-alive connection (this app's answers are small and sent at once)."""
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        data += s.recv(65536)
    return data


def test_requests_on_one_kept_alive_connection_still_work(address):
    with connect(address) as s:
        for _ in range(3):
            s.sendall(post(b'{"a": 1}'))
            assert response_of(s).startswith(b"HTTP/1.1 200")
            time.sleep(0.6)   # < header_timeout_s each time: the clock restarts after every response


def test_a_head_sent_in_pieces_within_the_time_is_fine(address):
    with connect(address) as s:
        request = post(b'{"a": 1}')
        for i in range(0, len(request), 20):
            s.sendall(request[i:i + 20])
            time.sleep(0.01)
        assert response_of(s).startswith(b"HTTP/1.1 200")


def test_oversized_headers_are_refused_and_the_server_carries_on(address):
    with connect(address) as s:
        s.sendall(post(extra=b"x-big: " + b"a" * (64 * 1024) + b"\r\n"))
        assert read_all(s).startswith(b"HTTP/1.1 431")
    with connect(address) as s:
        s.sendall(post())
        assert response_of(s).startswith(b"HTTP/1.1 200")


def test_headers_over_the_limit_in_pieces_are_refused_and_under_it_pass(address):
    with connect(address) as s:
        request = post(extra=b"x-big: " + b"a" * (6 * 1024) + b"\r\n")   # under 8 KB
        s.sendall(request[:3000])
        time.sleep(0.05)
        s.sendall(request[3000:])
        assert response_of(s).startswith(b"HTTP/1.1 200")
    with connect(address) as s:
        try:
            for _ in range(8):   # 32 KB of one header, 4 KB a read
                s.sendall(b"x-big: " + b"a" * 4096 if _ else post()[:40])
                time.sleep(0.02)
        except OSError:
            pass
        assert read_all(s).startswith(b"HTTP/1.1 431")


def test_a_slow_head_is_closed_with_408(address):
    with connect(address) as s:
        start = time.monotonic()
        s.sendall(b"POST /echo HTTP/1.1\r\nhost: x\r\n")   # and never the rest
        for _ in range(3):   # trickling bytes does not restart the clock
            time.sleep(0.3)
            try:
                s.sendall(b"x-a: b\r\n")
            except OSError:
                break
        data = read_all(s)
        assert data.startswith(b"HTTP/1.1 408"), data[:80]
        assert time.monotonic() - start < 3


def test_a_silent_connection_is_closed(address):
    with connect(address) as s:
        start = time.monotonic()
        assert read_all(s) == b""
        assert time.monotonic() - start < 3


def test_a_slow_body_is_closed_with_408(address):
    with connect(address) as s:
        head = post(b"x" * 100)
        s.sendall(head[:-90])   # the head and 10 of 100 body bytes
        data = read_all(s)
        assert data.startswith(b"HTTP/1.1 408"), data[:80]


def test_connections_beyond_the_limit_get_503_and_room_comes_back(address):
    held = [connect(address) for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(0.1)
        with connect(address) as extra:
            assert read_all(extra).startswith(b"HTTP/1.1 503")
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    with connect(address) as s:
        s.sendall(post())
        assert response_of(s).startswith(b"HTTP/1.1 200")


def test_a_stream_longer_than_the_timeouts_is_not_cut(address):
    with connect(address) as s:
        s.sendall(b"GET /stream HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        data = read_all(s)
    assert data.startswith(b"HTTP/1.1 200")
    assert data.count(b"chunk ") == 8


def test_the_command_line_sets_the_limits_and_refuses_bad_ones():
    from tachy.cli import build_parser
    from tachy.errors import TachyError
    from tachy.server.cli import connection_limits

    parse = lambda *flags: connection_limits(build_parser().parse_args(["serve", *flags]))   # noqa: E731
    assert parse() == ConnectionLimits()
    assert parse("--max-connections", "9", "--max-header-bytes", "4096", "--header-timeout", "2",
                 "--body-timeout", "3") == ConnectionLimits(9, 4096, 2.0, 3.0)
    for flags in (["--max-connections", "0"], ["--max-header-bytes", "10"], ["--header-timeout", "0"],
                  ["--body-timeout", "-1"]):
        with pytest.raises(TachyError, match="connection limits"):
            parse(*flags)
