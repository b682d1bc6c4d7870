"""benchmarks/soak_test.py: its random requests cover the features, and one short round runs clean."""
from __future__ import annotations

import asyncio
import random

import pytest

from tests.benchmarks import load_script


@pytest.fixture(scope="module")
def soak():
    return load_script("soak_test")


def test_the_draws_are_seeded_and_cover_every_kind_of_request(soak):
    draws = [soak.random_request(random.Random(3), "m") for _ in range(2)]
    assert draws[0] == draws[1]
    rng = random.Random(0)
    bodies = [soak.random_request(rng, "m") for _ in range(400)]
    paths = {p for p, _ in bodies}
    assert paths == {"/v1/chat/completions", "/v1/completions"}
    for key in ("tools", "response_format", "tachy", "n", "echo", "logprobs", "stop", "temperature"):
        assert any(key in b for _, b in bodies), key
    assert {True, False} == {b["stream"] for _, b in bodies}
    assert max(len(b.get("prompt", "")) for _, b in bodies) > 2000   # long prompts too


@pytest.mark.slow
def test_a_short_round_against_the_real_server_runs_clean(soak, smollm, one_torch_thread):
    pytest.importorskip("fastapi")
    from tachy.server import create_app
    from tachy.server.background import serve_in_thread

    with serve_in_thread(create_app(smollm, max_queue=64)) as url:
        result = asyncio.run(soak.run_round(url, "smollm2-135m", random.Random(5), requests=30, concurrency=8,
                                            abort=0.3))
    outcomes = result["outcomes"]
    assert sum(outcomes.values()) == 30 and outcomes.get("200", 0) > 0 and outcomes.get("aborted", 0) > 0
    assert not [o for o in outcomes if o.startswith("5") or o == "stream server error"], outcomes
    assert result["idle_after"] and result["request_after"] == 200
