"""Drafter tests run tiny torch ops (fake verify logits): one intra-op thread avoids thread-pool overhead
dwarfing them on a small shared CPU."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
