"""A real uvicorn server on loopback serving the embedded model, shared by a test module."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

API_KEY = "test-key"


@pytest.fixture(scope="module")
def server(smollm, one_torch_thread):
    """Base URL of a server with an API key and room for one waiting request (so 429 is easy to reach)."""
    from tachy.server import create_app
    from tachy.server.background import serve_in_thread

    app = create_app(smollm, api_key=API_KEY, max_queue=1)
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)
