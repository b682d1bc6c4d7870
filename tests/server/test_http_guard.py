"""The HTTP protocol's bounds (server/http_guard.py) on a small app over real sockets: header bytes, slow heads
and bodies, connection counts (in all and per address), clients that stop reading, and that ordinary keep-alive,
long streams and slow readers are untouched."""
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

LIMITS = ConnectionLimits(max_connections=6, max_connections_per_client=4, max_header_bytes=8 * 1024,
                          header_timeout_s=1.0, body_timeout_s=1.0, write_timeout_s=1.0)
BIG_CHUNKS = 512   # /big: 512 chunks of 64 KiB, 32 MiB, far more than the kernel's socket buffers hold
big_streams: list[str] = []   # each /big response's generator, once ended: "sent all" or "stopped"


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

    @app.get("/big")
    async def big() -> StreamingResponse:
        async def chunks():
            ended = "stopped"
            try:
                for _ in range(BIG_CHUNKS):
                    yield b"x" * 65536
                ended = "sent all"
            finally:
                big_streams.append(ended)
        return StreamingResponse(chunks(), media_type="application/octet-stream")

    return app


@pytest.fixture(scope="module")
def address():
    with serve_in_thread(small_app(), limits=LIMITS) as url:
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port)


def connect(address, source: str | None = None) -> socket.socket:
    """A connection to ``address``, from the loopback address ``source`` (127.x.y.z) if given."""
    return socket.create_connection(address, timeout=5, source_address=(source, 0) if source else None)


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
    held = [connect(address, f"127.0.0.{2 + i % 2}") for i in range(LIMITS.max_connections)]   # 3 per address
    try:
        time.sleep(0.1)
        with connect(address, "127.0.0.4") as extra:
            assert read_all(extra).startswith(b"HTTP/1.1 503")
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    with connect(address) as s:
        s.sendall(post())
        assert response_of(s).startswith(b"HTTP/1.1 200")


def test_one_address_cannot_take_every_connection(address):
    held = [connect(address, "127.0.0.5") for _ in range(LIMITS.max_connections_per_client)]
    try:
        time.sleep(0.1)
        with connect(address, "127.0.0.5") as extra:
            data = read_all(extra)
            assert data.startswith(b"HTTP/1.1 503") and b"from this address" in data
        with connect(address, "127.0.0.6") as other:   # another client still gets in
            other.sendall(post())
            assert response_of(other).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()


def big_request(address, source: str) -> socket.socket:
    s = connect(address, source)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.sendall(b"GET /big HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    return s


def wait_for_big_stream(count: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while len(big_streams) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_client_that_stops_reading_is_dropped_and_its_handler_ends(address):
    big_streams.clear()
    with big_request(address, "127.0.0.7") as s:
        start = time.monotonic()
        wait_for_big_stream(1, 10)   # uvicorn's send returns at once after a disconnect: the generator runs out
        assert len(big_streams) == 1, "the response's handler should not wait on the unread connection forever"
        assert time.monotonic() - start < 8
        received = len(read_all(s))
    assert received < BIG_CHUNKS * 65536 // 2, "the connection should have been dropped, not the response sent"


def test_a_slow_but_steady_reader_gets_everything(address):
    """Reading in pauses shorter than write_timeout_s: the clock restarts each time the buffer drains."""
    big_streams.clear()
    with big_request(address, "127.0.0.8") as s:
        received = 0
        start = time.monotonic()
        while chunk := s.recv(1 << 20):
            received += len(chunk)
            if time.monotonic() - start < 2.5:   # 2.5 s of 0.4 s pauses (the timeout is 1 s), then at full speed
                time.sleep(0.4)
    wait_for_big_stream(1, 5)
    assert big_streams == ["sent all"]
    assert received > BIG_CHUNKS * 65536


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
    assert parse("--max-connections", "9", "--max-connections-per-client", "5", "--max-header-bytes", "4096",
                 "--header-timeout", "2", "--body-timeout", "3", "--write-timeout", "4") == ConnectionLimits(
        max_connections=9, max_connections_per_client=5, max_header_bytes=4096, header_timeout_s=2.0,
        body_timeout_s=3.0, write_timeout_s=4.0)
    for flags in (["--max-connections", "0"], ["--max-connections-per-client", "0"], ["--max-header-bytes", "10"],
                  ["--header-timeout", "0"], ["--body-timeout", "-1"], ["--write-timeout", "0"]):
        with pytest.raises(TachyError, match="connection limits"):
            parse(*flags)
