"""``tachy serve --ray``: the app on a local Ray Serve cluster (loopback, two replicas) through the openai client.

One cluster for the module (starting Ray and loading two engines is most of its time); the fault test runs
last because it kills a replica. The tests skip only where Ray is not installed or cannot start.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

pytest.importorskip("ray", reason="Ray is not installed (make test installs requirements/ray.txt)")
openai = pytest.importorskip("openai")

from tachy.server.background import free_port  # noqa: E402
from tachy.server.ray_router import rendezvous_order  # noqa: E402
from tachy.server.ray_serve import REPLICA_HEADER, EngineSpec, RayServeConfig, replica_room  # noqa: E402

from .conftest import API_KEY  # noqa: E402

# one cluster per xdist worker group: `make test` runs with --dist loadgroup so the module shares one
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

MODEL = "smollm2-135m"
CHAT = [{"role": "user", "content": "Name three rivers."}]
PROMPT = "The capital of France is"
LONG = [{"role": "user", "content": "Write a long story about a dragon who learns to swim."}]
SYSTEM = ("You are a patient geography tutor. Answer in short sentences, name real places only, and when the "
          "student asks for more, add one new item each time without repeating earlier ones. ") * 3


@pytest.fixture(scope="module")
def ray_url():
    """Base URL of a two-replica deployment on a Ray cluster started on loopback for this module."""
    import ray
    from ray import serve

    from tachy.server.ray_serve import start

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 object_store_memory=200 * 2**20, _node_ip_address="127.0.0.1")
    except Exception as e:  # noqa: BLE001 - any reason Ray cannot start here is a skip, said plainly
        pytest.skip(f"Ray cannot start on this machine: {e!r}")
    try:
        options = {"api_key": API_KEY, "max_queue": 8, "max_batch": 4}
        for attempt in (1, 2):   # on a loaded machine Serve's proxy can miss its start-up health check once
            try:
                url = start(EngineSpec(model=MODEL, threads=1), options,
                            RayServeConfig(replicas=2, port=free_port(), max_ongoing_requests=replica_room(options),
                                           health_period_s=2))
                break
            except ray.exceptions.ActorDiedError:
                if attempt == 2:
                    raise
                serve.shutdown()
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_client(ray_url):
    return openai.OpenAI(base_url=f"{ray_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def replica_ids() -> list[str]:
    import ray

    return [a["name"].rsplit("#", 1)[1] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::")]


def replica_pid(replica: str) -> int:
    import ray

    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith("SERVE_REPLICA::") and a["name"].endswith(f"#{replica}"):
            actor = ray.get_actor(a["name"], namespace=a["namespace"])
            return ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30)
    raise LookupError(replica)


def chat(client, session: str | None = None, **kw):
    """A greedy chat request; returns (replica, the parsed response or stream)."""
    kw = {"model": MODEL, "messages": CHAT, "max_tokens": 8, "temperature": 0, **kw}
    raw = client.chat.completions.with_raw_response.create(
        **kw, extra_headers={"x-session-id": session} if session else None)
    return raw.headers[REPLICA_HEADER], raw.parse()


def test_same_greedy_output_as_the_single_process_server(ray_client, client):
    """Chat and completion, streamed and not: what one process answers, through Ray."""
    want_chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    want_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)

    _, got = chat(ray_client)
    assert got.choices[0].message.content == want_chat.choices[0].message.content
    assert got.usage == want_chat.usage and got.choices[0].finish_reason == "length"
    _, stream = chat(ray_client, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        want_chat.choices[0].message.content

    got_text = ray_client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert got_text.choices[0].text == want_text.choices[0].text
    stream = ray_client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == want_text.choices[0].text


def test_a_conversation_stays_on_its_replica(ray_client):
    """Every turn of a session lands on the replica rendezvous hashing gives it, where the replica's prefix
    cache holds the earlier turns' K/V; sessions spread over both replicas."""
    ids = replica_ids()
    assert len(ids) == 2
    sessions = {}   # one session for each replica
    for i in range(64):
        sessions.setdefault(rendezvous_order(f"conversation-{i}", ids)[0], f"conversation-{i}")
    assert len(sessions) == 2
    for replica, session in sessions.items():
        messages = [{"role": "system", "content": f"{SYSTEM} (Conversation {session}.)"}, *CHAT]
        for turn in range(3):
            where, r = chat(ray_client, session, messages=messages, max_tokens=4)
            assert where == replica
            cached = r.usage.prompt_tokens_details.cached_tokens
            assert (cached == 0) if turn == 0 else (cached >= 64)   # a 64-token block or more reused
            messages += [{"role": "assistant", "content": r.choices[0].message.content},
                         {"role": "user", "content": "And one more?"}]


def test_without_a_session_the_least_loaded_replica_answers(ray_client):
    where_long, stream = chat(ray_client, messages=LONG, max_tokens=200, stream=True)
    first = next(iter(stream))   # the long request is running on its replica
    where_short, _ = chat(ray_client)
    assert first.choices and where_short != where_long
    stream.close()


def test_a_replica_killed_mid_stream_ends_its_requests_with_an_error(ray_client):
    """Kill one replica's process while it streams: its stream and its other request fail at once (no hang),
    the other replica's request completes, later requests succeed on the survivor, and Ray's replacement
    takes over the dead replica's share of conversations."""
    ids = replica_ids()
    victim_session = next(f"s{i}" for i in range(64) if rendezvous_order(f"s{i}", ids)[0] == ids[0])
    other_session = next(f"s{i}" for i in range(64) if rendezvous_order(f"s{i}", ids)[0] == ids[1])
    outcomes: dict[str, object] = {}

    def request(name: str, session: str, max_tokens: int) -> None:   # an answer or an error, never nothing
        try:
            _, r = chat(ray_client, session, messages=LONG, max_tokens=max_tokens)
            outcomes[name] = r.choices[0].finish_reason
        except openai.APIError as e:
            outcomes[name] = e

    where, stream = chat(ray_client, victim_session, messages=LONG, max_tokens=400, stream=True)
    assert where == ids[0]
    threads = [threading.Thread(target=request, args=("victim", victim_session, 300)),
               threading.Thread(target=request, args=("other", other_session, 16))]
    pieces = iter(stream)
    next(pieces)
    for t in threads:
        t.start()
    time.sleep(0.5)   # both requests are on their replicas
    os.kill(replica_pid(ids[0]), signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(openai.APIError):
        for _ in pieces:
            pass
    assert time.monotonic() - killed < 30
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert isinstance(outcomes["victim"], openai.APIError)
    assert outcomes["other"] == "length"

    for i in range(4):   # the dead replica's sessions move; nothing waits for the replacement
        _, r = chat(ray_client, victim_session if i % 2 else f"after-{i}")
        assert r.choices[0].finish_reason == "length"

    deadline = time.monotonic() + 90   # Ray replaces the dead replica, and routing finds the new one
    while time.monotonic() < deadline and not (len(replica_ids()) == 2 and ids[0] not in replica_ids()):
        time.sleep(1)
    new = [rid for rid in replica_ids() if rid not in ids]
    assert len(new) == 1, replica_ids()
    session = next(f"n{i}" for i in range(64) if rendezvous_order(f"n{i}", replica_ids())[0] == new[0])
    for _ in range(30):   # the replacement counts once the router has heard of it, which takes a moment
        where, r = chat(ray_client, session)
        if where == new[0]:
            break
        time.sleep(1)
    assert where == new[0] and r.choices[0].finish_reason == "length"
