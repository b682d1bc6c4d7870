"""Run the app on loopback in a background thread (tests, the load test, notebooks)."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from .http_guard import ConnectionLimits, uvicorn_config


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int | None = None,
                    timeout_s: float = 60.0, limits: ConnectionLimits = ConnectionLimits()) -> Iterator[str]:
    """Serve ``app`` with uvicorn until the block ends (then shut down gracefully); yields the base URL."""
    import uvicorn

    port = port or free_port(host)
    server = uvicorn.Server(uvicorn_config(app, host, port, limits, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, name="tachy-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
