"""The worker on a fake engine (no model): FIFO order, the bounded queue, cancellation and shutdown."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tachy import GenerationConfig, GenerationResponse, GenerationStats
from tachy.server.scheduler import Job, QueueFull, Scheduler, ShuttingDown


class FakeEngine:
    """Yields ``max_new_tokens`` one-token pieces, ``delay`` seconds apart; records which prompts ran."""

    def __init__(self, delay: float = 0.01):
        self.delay, self.ran, self.gate = delay, [], threading.Event()
        self.gate.set()

    def stream(self, prompt_ids, config, should_stop=None, handoff=None):   # handoff: never wanted here
        self.ran.append(prompt_ids[0])
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        for i in range(config.max_new_tokens):
            self.gate.wait()
            time.sleep(self.delay)
            if should_stop is not None and should_stop():   # the engine's check after each forward
                return
            stats.generated_tokens = i + 1
            last = i + 1 == config.max_new_tokens
            yield GenerationResponse("x", [7], [False], stats, "length" if last else None)


def job(prompt: int, tokens: int, loop) -> Job:
    return Job([([prompt], GenerationConfig(max_new_tokens=tokens))], loop)


async def drain(j: Job) -> list:
    items = []
    while True:
        item = await asyncio.wait_for(j.channel.get(), 10)
        if item[0] == "end":
            return items
        items.append(item)


def test_fifo_queue_limit_and_cancel():
    async def main():
        engine = FakeEngine()
        engine.gate.clear()  # the first job blocks until we let it go
        sched = Scheduler(engine, max_queue=2)
        loop = asyncio.get_running_loop()
        jobs = [job(i, 2, loop) for i in range(3)]
        sched.submit(jobs[0])
        while engine.ran != [0]:
            await asyncio.sleep(0.01)
        sched.submit(jobs[1])
        sched.submit(jobs[2])
        with pytest.raises(QueueFull):  # 1 running + 2 waiting
            sched.submit(job(9, 1, loop))
        jobs[1].cancelled.set()  # a client that left while waiting: skipped
        engine.gate.set()
        results = [await drain(j) for j in jobs]
        sched.close()
        return engine.ran, results

    ran, results = asyncio.run(main())
    assert ran == [0, 2]
    assert [len(r) for r in results] == [2, 0, 2]
    assert results[0][-1][2].finish_reason == "length"


def test_shutdown_aborts_running_and_refuses_waiting():
    async def main():
        engine = FakeEngine(delay=0.02)
        sched = Scheduler(engine, max_queue=4, grace_s=0.2)
        loop = asyncio.get_running_loop()
        running, waiting = job(0, 10_000, loop), job(1, 2, loop)
        sched.submit(running)
        sched.submit(waiting)
        await asyncio.sleep(0.1)
        await asyncio.to_thread(sched.close)
        with pytest.raises(ShuttingDown):
            sched.submit(job(2, 1, loop))
        return await drain(running), await drain(waiting)

    ran, waited = asyncio.run(main())
    assert 0 < len(ran) < 10_000 and ran[-2][2].finish_reason == "abort"
    assert ran[-1][0] == "error" and isinstance(ran[-1][2], ShuttingDown)
    assert waited[0][0] == "error" and isinstance(waited[0][2], ShuttingDown)


def test_abort_stops_running_jobs_without_grace():
    """SIGTERM's path: a long generation stops at its next piece and ends with an error, at once."""
    async def main():
        engine = FakeEngine(delay=0.02)
        sched = Scheduler(engine, max_queue=4, grace_s=60.0)
        loop = asyncio.get_running_loop()
        running = job(0, 10_000, loop)
        sched.submit(running)
        await asyncio.sleep(0.1)
        start = time.monotonic()
        sched.abort()
        items = await drain(running)
        await asyncio.to_thread(sched.close)   # the lifespan's close after an abort does not wait grace_s
        return items, time.monotonic() - start

    items, took = asyncio.run(main())
    assert took < 2.0
    assert items[-2][2].finish_reason == "abort" and isinstance(items[-1][2], ShuttingDown)


def test_stalled_for_counts_only_busy_time_without_progress():
    async def main():
        engine = FakeEngine(delay=0.0)
        sched = Scheduler(engine, max_queue=4)
        loop = asyncio.get_running_loop()
        assert sched.stalled_for() == 0.0          # idle is not stalled
        engine.gate.clear()                         # the generation hangs inside the engine
        stuck = job(0, 3, loop)
        sched.submit(stuck)
        await asyncio.sleep(0.3)
        stalled = sched.stalled_for()
        engine.gate.set()
        await drain(stuck)
        await asyncio.sleep(0.05)
        after = sched.stalled_for()
        sched.close()
        return stalled, after

    stalled, after = asyncio.run(main())
    assert stalled >= 0.25 and after == 0.0
