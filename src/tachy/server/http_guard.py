"""uvicorn's HTTP/1.1 protocol (h11) with bounds on what one client may hold: connections, header bytes, and
the time it may take to send a request or to read a response.

Without them a client could: send a 40 MB header (uvicorn's httptools parser buffers any size; measured: 20-40
MB cost the memory and a 0.6 s stop of the event loop), open connections until the process runs out of file
descriptors, or keep connections open forever by sending a request a byte at a time (slowloris), each one
holding memory and, with a half-sent body, an open request. h11 bounds a request's head
(``max_header_bytes``: over it a 431), and this protocol closes a connection whose head is not complete
``header_timeout_s`` after it opened or after its previous response, or whose body is not complete
``body_timeout_s`` after its head (408 when no response has begun), answers 503 to connections beyond
``max_connections`` or beyond ``max_connections_per_client`` from one address, and drops a connection whose
client has read nothing of a response for ``write_timeout_s`` while more than 64 KiB of it waits to be sent
(without this, a client that stops reading holds its connection and its request's handler forever).
Idle keep-alive connections close after uvicorn's own 5 s.

h11 is used whatever else is installed (uvicorn prefers httptools when present), so every install behaves the
same; it is pure Python, a few tens of microseconds per request and per streamed chunk.
"""
from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

try:   # the socket's send queue (_unsent); Unix only
    import fcntl
    import termios
except ImportError:
    fcntl = termios = None

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class ConnectionLimits:
    """What clients may hold (``tachy serve --max-connections / --max-connections-per-client / --header-timeout /
    --body-timeout / --write-timeout``)."""

    max_connections: int = 512          # open connections; more are answered 503 and closed
    max_connections_per_client: int = 128   # of them from one address (behind a proxy: all of them)
    max_header_bytes: int = 64 * 1024   # request line + headers
    header_timeout_s: float = 30.0      # to send a request's head, from connecting or the previous response
    body_timeout_s: float = 60.0        # to send its body, from the end of its head
    write_timeout_s: float = 60.0       # to read a response whose unsent part is over 64 KiB, before it is dropped

    def __post_init__(self):
        if self.max_connections < 1 or self.max_connections_per_client < 1 or self.max_header_bytes < 1024 \
                or min(self.header_timeout_s, self.body_timeout_s, self.write_timeout_s) <= 0:
            raise ValueError("connection limits: max_connections and max_connections_per_client >= 1, "
                             "max_header_bytes >= 1024 and timeouts > 0")


def _plain_response(status: int, reason: str) -> bytes:
    body = f"{reason}\n".encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with ``limits`` (set on a subclass by :func:`uvicorn_config`)."""

    limits = ConnectionLimits()
    _deadline: asyncio.TimerHandle | None = None   # the armed clock (_expect)
    _begun = False                  # bytes of a request arrived since the connection opened or the last response
    _head_bytes = 0                 # of the head being received, and its last 3 bytes (a terminator may straddle
    _head_tail = b""                # two reads)
    _waiting_for: str | None = None   # what the armed clock waits for: "head", "body" or nothing
    _write_deadline: asyncio.TimerHandle | None = None   # armed while the transport's write buffer is full
    _unsent_then = 0                # response bytes not yet received at the last look (_check_reading)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._close_with(503, "Service Unavailable: too many connections")
            return
        if self.client is not None and self.limits.max_connections_per_client < self.limits.max_connections:
            host = self.client[0]
            if sum(c.client is not None and c.client[0] == host for c in self.connections) \
                    > self.limits.max_connections_per_client:
                self._close_with(503, "Service Unavailable: too many connections from this address")
                return
        self._expect(self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._expect(None)
        self._stop_write_clock()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The transport holds more than its high-water mark of unsent bytes: from now on, the client must read
        something every write_timeout_s."""
        super().pause_writing()
        if self._write_deadline is None:
            self._unsent_then = self._unsent()
            self._write_deadline = self.loop.call_later(self.limits.write_timeout_s, self._check_reading)

    def resume_writing(self) -> None:
        self._stop_write_clock()
        super().resume_writing()

    def _stop_write_clock(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _unsent(self) -> int:
        """Bytes of responses the client has not received: the transport's buffer, plus (on Linux) the socket's
        send queue. The transport's buffer alone moves in bursts of half the kernel's buffer (megabytes), which
        a slow but steady reader may take longer than the timeout to drain."""
        unsent = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None and hasattr(termios, "TIOCOUTQ"):   # Linux
            try:
                unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            except OSError:
                pass
        return unsent

    def _check_reading(self) -> None:
        """Still paused: go on waiting if the client has read since the last look, else drop the connection,
        unsent bytes and all (close() would wait for them). The response's handler then sees a disconnect, as
        when the client goes away."""
        self._write_deadline = None
        unsent = self._unsent()
        if unsent < self._unsent_then:
            self._unsent_then = unsent
            self._write_deadline = self.loop.call_later(self.limits.write_timeout_s, self._check_reading)
        else:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_over_limit(data):
            self._close_with(431, "Request Header Fields Too Large")
            return
        self._begun = True
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        self._begun, self._head_bytes, self._head_tail = False, 0, b""
        super().on_response_complete()
        self._follow()

    def _head_over_limit(self, data: bytes) -> bool:
        """Whether the head being received is over max_header_bytes with ``data``. h11's own bound applies to a
        head still incomplete after a read only: a 64 KB head that arrives in one read passes it."""
        window = self._head_tail + data
        end = window.find(b"\r\n\r\n")
        size = self._head_bytes + (end + 4 - len(self._head_tail) if end >= 0 else len(data))
        if size > self.limits.max_header_bytes:
            return True
        self._head_bytes, self._head_tail = (0, b"") if end >= 0 else (size, window[-3:])
        return False

    def _follow(self) -> None:
        """Arm the clock for what the client owes next: a head (IDLE), a body (SEND_BODY), or nothing."""
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE and self.conn.our_state is h11.IDLE:
            if self._waiting_for != "head":
                self._expect(self.limits.header_timeout_s, "head")
        elif state is h11.SEND_BODY:
            if self._waiting_for != "body":
                self._expect(self.limits.body_timeout_s, "body")
        else:
            self._expect(None)

    def _expect(self, seconds: float | None, what: str = "head") -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._waiting_for = None, None
        if seconds is not None:
            self._deadline = self.loop.call_later(seconds, self._timed_out)
            self._waiting_for = what

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        started = self.cycle is not None and self.cycle.response_started and self._waiting_for == "body"
        if started or not self._begun:   # an idle connection is closed without a word, as keep-alive's are
            self.transport.close()
        else:
            self._close_with(408, "Request Timeout")

    def _close_with(self, status: int, reason: str) -> None:
        self.transport.write(_plain_response(status, reason))
        self.transport.close()


def uvicorn_config(app, host: str, port: int, limits: ConnectionLimits = ConnectionLimits(), **kwargs):
    """uvicorn's Config for ``app`` with :class:`GuardedH11Protocol` under ``limits`` (serve and tests alike)."""
    import uvicorn

    protocol = type("GuardedH11", (GuardedH11Protocol,), {"limits": limits})
    return uvicorn.Config(app, host=host, port=port, http=protocol,
                          h11_max_incomplete_event_size=limits.max_header_bytes, **kwargs)
