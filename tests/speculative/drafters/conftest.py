"""Drafter tests run tiny torch ops (fake verify logits): one intra-op thread avoids thread-pool overhead
dwarfing them on a small shared CPU."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every drafter test on one thread (the shared fixture in tests/conftest.py)."""
