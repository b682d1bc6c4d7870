"""The scheduler's batches on a tiny real engine: overlapping jobs decode together and each gets what it gets
alone; a lone job keeps the single path; cancellation and shutdown end batch rows."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from tachy import GenerationConfig
from tachy.server.scheduler import Job, Scheduler, ShuttingDown
from tests.decoding.helpers import tiny_engine
from tests.server.test_scheduler import drain


def alone(engine, prompt, config):
    pieces = list(engine.stream(prompt, dataclasses.replace(config, drafter=None)))
    return "".join(p.text for p in pieces), pieces[-1].finish_reason


def submit_together(sched: Scheduler, jobs: list[Job]) -> None:
    """Queue all jobs before the worker looks (it holds the same lock), so they overlap."""
    with sched._cond:
        for j in jobs:
            sched.submit(j)


def texts(items, choices: int) -> list[tuple[str, str | None]]:
    out = [["", None] for _ in range(choices)]
    for kind, index, piece in items:
        assert kind == "piece"
        out[index][0] += piece.text
        out[index][1] = piece.finish_reason or out[index][1]
    return [tuple(x) for x in out]


def test_overlapping_jobs_batch_and_match_alone():
    engine, _ = tiny_engine(seed=1, eos=(3,))
    work = [([5 + i, 9, 11 + i], GenerationConfig(max_new_tokens=8 + 3 * i, ignore_eos=i % 2 == 0,
                                                   stop=["17"] if i == 3 else []))
            for i in range(7)]
    # drafter "none": a drafting row draws as its lone speculative run does, not as the plain one `alone` runs
    seeded = GenerationConfig(max_new_tokens=12, temperature=0.8, seed=5, ignore_eos=True, drafter="none")

    async def main():
        loop = asyncio.get_running_loop()
        sched = Scheduler(engine, max_batch=3)
        jobs = [Job([w], loop) for w in work] + [Job([([7, 7], seeded), ([8, 8], seeded)], loop)]  # n=2
        submit_together(sched, jobs)
        results = [await drain(j) for j in jobs]
        sched.close()
        return results, sched.metrics

    results, metrics = asyncio.run(main())
    for (prompt, config), items in zip(work, results):
        assert texts(items, 1) == [alone(engine, prompt, config)]
    assert texts(results[-1], 2) == [alone(engine, [7, 7], seeded), alone(engine, [8, 8], seeded)]
    assert metrics.batch_steps > 0 and metrics.batch_rows / metrics.batch_steps > 1.5
    assert metrics.generations == len(work) + 2
    assert metrics.accepted > 0   # the batch rows draft (the PyTorch forward: model-free drafts, batch.py)


def test_lone_job_and_unbatchable_job_take_the_single_path():
    engine, _ = tiny_engine(seed=1, eos=(3,))
    beam = GenerationConfig(max_new_tokens=6, strategy="beam")

    async def main():
        loop = asyncio.get_running_loop()
        sched = Scheduler(engine, max_batch=4)
        lone = Job([([5, 6], GenerationConfig(max_new_tokens=5))], loop)
        sched.submit(lone)
        first = await drain(lone)
        jobs = [Job([([5, 6], beam)], loop), Job([([5, 6], beam)], loop)]
        submit_together(sched, jobs)
        rest = [await drain(j) for j in jobs]
        sched.close()
        return first, rest, sched.metrics.batch_steps

    first, rest, steps = asyncio.run(main())
    assert steps == 0
    assert texts(first, 1)[0][0] == alone(engine, [5, 6], GenerationConfig(max_new_tokens=5))[0]
    assert texts(rest[0], 1) == texts(rest[1], 1) == [alone(engine, [5, 6], beam)]


def test_cancel_and_shutdown_end_batch_rows():
    engine, _ = tiny_engine(seed=1, eos=(3,), max_seq_len=4096)
    endless = GenerationConfig(max_new_tokens=4000, ignore_eos=True)

    async def main():
        loop = asyncio.get_running_loop()
        sched = Scheduler(engine, max_batch=4, grace_s=0.3)
        jobs = [Job([([5 + i, 6], endless)], loop) for i in range(3)]
        short = Job([([9, 9], GenerationConfig(max_new_tokens=4, ignore_eos=True))], loop)
        submit_together(sched, jobs + [short])
        done_short = await drain(short)
        jobs[0].cancelled.set()          # a client that left mid-batch
        cancelled = await drain(jobs[0])
        assert sched.running == 2
        await asyncio.to_thread(sched.close)
        return done_short, cancelled, [await drain(j) for j in jobs[1:]]

    done_short, cancelled, aborted = asyncio.run(main())
    assert texts(done_short, 1) == [alone(engine, [9, 9], GenerationConfig(max_new_tokens=4, ignore_eos=True))]
    assert cancelled and all(p.finish_reason is None for _, _, p in cancelled)
    for items in aborted:   # each aborted job: its row's "abort" piece, then the shutdown error
        assert items[-2][2].finish_reason == "abort"
        assert items[-1][0] == "error" and isinstance(items[-1][2], ShuttingDown)


def test_a_failed_batch_forward_fails_its_jobs_and_the_worker_lives_on(monkeypatch):
    from tachy.batch import BatchDecoder

    engine, _ = tiny_engine(seed=1, eos=(3,))

    def boom(self):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(BatchDecoder, "step", boom)

    async def main():
        loop = asyncio.get_running_loop()
        sched = Scheduler(engine, max_batch=4)
        config = GenerationConfig(max_new_tokens=5, ignore_eos=True)
        jobs = [Job([([5 + i, 6], config)], loop) for i in range(3)]
        submit_together(sched, jobs)
        failed = [await drain(j) for j in jobs]
        after = Job([([5, 6], config)], loop)   # alone: the engine's own path
        sched.submit(after)
        ok = await drain(after)
        sched.close()
        return failed, ok

    failed, ok = asyncio.run(main())
    for items in failed:
        assert items[-1][0] == "error" and "forward failed" in str(items[-1][2])
    assert ok[-1][2].finish_reason == "length"


def test_a_failure_between_steps_fails_the_batch_and_the_worker_lives_on(monkeypatch):
    """An exception outside the forward (here the fairness check at a step boundary, as a bug in parking or
    resuming would raise) ends the batch's jobs with the error; the worker thread goes on serving (before, it
    died and every later request hung)."""
    engine, _ = tiny_engine(seed=1, eos=(3,))
    preempt, calls = Scheduler._preempt, []

    def fails_once(self, decoder, state):
        calls.append(len(decoder.rows))
        if len(calls) == 3:
            raise RuntimeError("parking failed")
        return preempt(self, decoder, state)

    monkeypatch.setattr(Scheduler, "_preempt", fails_once)
    config = GenerationConfig(max_new_tokens=6, ignore_eos=True)

    async def main():
        loop = asyncio.get_running_loop()
        sched = Scheduler(engine, max_batch=4)
        jobs = [Job([([5 + i, 6], config)], loop) for i in range(3)]
        submit_together(sched, jobs)
        failed = [await asyncio.wait_for(drain(j), 60) for j in jobs]
        after = [Job([([7 + i, 8], config)], loop) for i in range(2)]
        submit_together(sched, after)
        ok = [await asyncio.wait_for(drain(j), 60) for j in after]
        alive = sched._thread.is_alive()
        sched.close()
        return failed, ok, alive

    failed, ok, alive = asyncio.run(main())
    for items in failed:
        assert items[-1][0] == "error" and "parking failed" in str(items[-1][2])
    assert alive
    assert [texts(items, 1) for items in ok] == [[alone(engine, [7 + i, 8], config)] for i in range(2)]


@pytest.mark.parametrize("speculative", [True, False])
def test_a_row_that_fails_ends_its_job_alone(monkeypatch, speculative):
    """A failure in one request's own per-row work (its processor, drafter, text stream) fails that request
    only: the others in the batch finish with their lone output (rows that draft, and plain rows)."""
    from tachy.batch import BatchDecoder

    engine, _ = tiny_engine(seed=1, eos=(3,))
    name = "_verified" if speculative else "_decoded"   # where a row's tokens are chosen
    chosen = getattr(BatchDecoder, name)

    def fragile(self, row, *args):
        if row.ids[0] == 99 and row.stats.generated_tokens >= 3:
            raise RuntimeError("this request's processor failed")
        return chosen(self, row, *args)

    monkeypatch.setattr(BatchDecoder, name, fragile)
    config = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    prompts = [[5, 6, 7], [99, 6, 7], [8, 9, 10]]

    async def main():
        loop = asyncio.get_running_loop()
        sched = Scheduler(engine, max_batch=3, speculative_batching=speculative)
        jobs = [Job([(p, config)], loop) for p in prompts]
        submit_together(sched, jobs)
        results = [await drain(j) for j in jobs]
        sched.close()
        return results, sched.metrics

    (first, broken, last), metrics = asyncio.run(main())
    assert metrics.batch_steps > 0
    assert broken[-1][0] == "error" and "processor failed" in str(broken[-1][2])
    assert texts(first, 1) == [alone(engine, prompts[0], config)]
    assert texts(last, 1) == [alone(engine, prompts[2], config)]


def test_a_cancelled_search_stops_between_its_forwards(monkeypatch):
    """A beam search commits nothing until it ends; cancelled (a client gone, SIGTERM) it stops at its next
    forward, not after the whole search, and the worker takes the next request."""
    import time

    engine, _ = tiny_engine(seed=1, eos=(3,))
    forward = type(engine.model).forward

    def slow(self, *args, **kwargs):   # 100 beam steps: about 2 s
        time.sleep(0.02)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(engine.model), "forward", slow)
    search = GenerationConfig(max_new_tokens=100, ignore_eos=True, strategy="beam", strategy_options={"num_beams": 2})

    async def main():
        loop = asyncio.get_running_loop()
        sched = Scheduler(engine, max_batch=4)
        job = Job([([5, 6, 7], search)], loop)
        sched.submit(job)
        await asyncio.sleep(0.3)
        job.cancelled.set()
        start = time.perf_counter()
        items = await drain(job)
        stopped_after = time.perf_counter() - start
        after = Job([([5, 6], GenerationConfig(max_new_tokens=3, ignore_eos=True))], loop)
        sched.submit(after)
        ok = await drain(after)
        sched.close()
        return items, stopped_after, ok

    items, stopped_after, ok = asyncio.run(main())
    assert stopped_after < 0.5 and not any(kind == "piece" and piece.token_ids for kind, _, piece in items)
    assert ok[-1][2].finish_reason == "length"


def test_huge_max_tokens_cannot_starve_a_short_request():
    """Every row taken by long generations: with preemption a short request joins after a turn of
    ``preempt_after`` tokens and finishes while they still run; they resume and still give their lone text.
    Without it (preempt_after=0) the short request waits for a long one to finish."""
    engine, _ = tiny_engine(seed=1, eos=(3,), max_seq_len=1024)
    longs_ = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in (200, 300)]
    short = GenerationConfig(max_new_tokens=3, ignore_eos=True)

    async def main(preempt_after):
        loop = asyncio.get_running_loop()
        sched = Scheduler(engine, max_batch=2, preempt_after=preempt_after)
        longs = [Job([([5 + i, 6], longs_[i])], loop) for i in range(2)]
        submit_together(sched, longs)
        first = await asyncio.wait_for(longs[0].channel.get(), 10)   # the long ones are running
        quick = Job([([9, 9], short)], loop)
        sched.submit(quick)
        done = await drain(quick)
        still_running = sched.running
        rest = [[first] + await drain(longs[0]), await drain(longs[1])]
        sched.close()
        return done, still_running, rest, sched.metrics.preemptions

    done, still_running, rest, preemptions = asyncio.run(main(8))
    assert texts(done, 1) == [alone(engine, [9, 9], short)]
    assert still_running == 2 and preemptions >= 1
    for i, items in enumerate(rest):
        assert texts(items, 1) == [alone(engine, [5 + i, 6], longs_[i])]
    _, still_running, _, preemptions = asyncio.run(main(0))
    assert still_running == 1 and preemptions == 0   # the shorter long job had to finish first


@pytest.mark.parametrize("packed", [False, True])
def test_a_request_with_more_choices_than_rows_does_not_hold_back_later_ones(packed):
    """Free rows go round the requests: a short request that arrives behind one with more choices than there
    are rows takes the next free row, before that request's later choices (it waited until the last of them
    had a row: 20 s behind 16 prompts of 1,500 tokens through the server). Each text is still its lone text."""
    from tests.test_batch import packed_engine

    engine = packed_engine("llama", seed=3) if packed else tiny_engine(seed=1, eos=(3,))[0]
    many = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    short = GenerationConfig(max_new_tokens=2, ignore_eos=True)
    order = []   # (job, kind, choice) in the order the worker sent them

    def recorded(job: Job, name: str) -> Job:
        send = job.send
        job.send = lambda kind, index=None, payload=None: (order.append((name, kind, index)),
                                                           send(kind, index, payload))
        return job

    async def main():
        loop = asyncio.get_running_loop()
        sched = Scheduler(engine, max_batch=2)
        big = recorded(Job([([5 + i, 6], many) for i in range(6)], loop), "big")
        quick = recorded(Job([([9, 9], short)], loop), "quick")
        submit_together(sched, [big, quick])
        results = [await drain(big), await drain(quick)]
        sched.close()
        return results

    big_items, quick_items = asyncio.run(main())
    later_choices = [i for i, (name, kind, index) in enumerate(order) if name == "big" and kind == "piece"
                     and index >= 3]
    assert order.index(("quick", "end", None)) < min(later_choices)
    assert texts(quick_items, 1) == [alone(engine, [9, 9], short)]
    assert texts(big_items, 6) == [alone(engine, [5 + i, 6], many) for i in range(6)]


@pytest.mark.parametrize("packed", [False, True])
def test_a_single_path_request_waits_a_turn_not_for_the_batch_to_end(packed):
    """A request that needs the single path (a beam search) while long generations hold the rows: they are
    parked after their turn, it runs, and they resume with their lone text. It waited for the batch to end,
    and every request behind it too (a 4-token beam search held a short chat until a 700-token generation
    ended)."""
    from tests.test_batch import packed_engine

    # long enough to outlast the search and the short request (at 100 tokens the drafting rows ended first
    # in CI once)
    engine = (packed_engine("llama", seed=3, max_seq_len=1024) if packed
              else tiny_engine(seed=1, eos=(3,), max_seq_len=1024)[0])
    long_ = GenerationConfig(max_new_tokens=600, ignore_eos=True)
    beam = GenerationConfig(max_new_tokens=4, strategy="beam", strategy_options={"num_beams": 2})
    short = GenerationConfig(max_new_tokens=3, ignore_eos=True)

    async def main():
        loop = asyncio.get_running_loop()
        sched = Scheduler(engine, max_batch=2, preempt_after=8)
        longs = [Job([([5 + i, 6], long_)], loop) for i in range(2)]
        submit_together(sched, longs)
        first = await asyncio.wait_for(longs[0].channel.get(), 10)   # the long ones are running
        search, quick = Job([([7, 7], beam)], loop), Job([([9, 9], short)], loop)
        submit_together(sched, [search, quick])
        done = [await drain(search), await drain(quick)]
        still_running = sched.running
        rest = [[first] + await drain(longs[0]), await drain(longs[1])]
        sched.close()
        return done, still_running, rest, sched.metrics.preemptions

    (searched, quick), still_running, rest, preemptions = asyncio.run(main())
    assert still_running == 2 and preemptions >= 2
    assert texts(searched, 1) == [alone(engine, [7, 7], beam)]
    assert texts(quick, 1) == [alone(engine, [9, 9], short)]
    for i, items in enumerate(rest):
        assert texts(items, 1) == [alone(engine, [5 + i, 6], long_)]


@pytest.mark.parametrize("sampled", [False, True])
def test_a_lone_generation_moves_into_a_batch_when_a_request_arrives(sampled):
    """The PyTorch forward (CUDA's) runs a lone request on the engine's own path. A request arriving meanwhile
    waited for that whole generation; now the lone one is handed off into a batch between two of its steps
    (``Handoff``), so the newcomer finishes while it still runs. The greedy one still gives its lone text,
    bit for bit through its moved K/V; a sampling one goes on with its own generator (an exact sample, its
    draws no longer its lone run's once it drafts as a row). With plain batching nothing moves: the newcomer
    waits, as before."""
    from tests.test_batch import pytorch_engine

    engine = pytorch_engine("llama", seed=1, max_seq_len=1024)   # bf16: rows give the lone bits
    long = GenerationConfig(max_new_tokens=400, ignore_eos=True,   # a stop string holds text back across the move
                            **(dict(temperature=0.9, seed=3) if sampled else dict(stop=["41 42"])))
    short = GenerationConfig(max_new_tokens=3, ignore_eos=True)

    async def main(batching):
        loop = asyncio.get_running_loop()
        sched = Scheduler(engine, max_batch=2, speculative_batching=batching == "speculative")
        lone = Job([([5, 6], long), ([7, 6], long)], loop)   # n=2: the second choice joins as a row
        sched.submit(lone)
        first = await asyncio.wait_for(lone.channel.get(), 10)   # running alone
        quick = Job([([9, 9], short)], loop)
        sched.submit(quick)
        done = await drain(quick)
        ended_before = sched.metrics.generations   # the newcomer's, and the long ones' if they ended first
        rest = [first] + await drain(lone)
        sched.close()
        return done, ended_before, rest, sched.metrics

    done, ended_before, rest, metrics = asyncio.run(main("speculative"))
    assert texts(done, 1) == [alone(engine, [9, 9], short)]
    assert ended_before == 1 and metrics.batch_steps > 0 and metrics.generations == 3 and metrics.handoffs == 1
    moved = texts(rest, 2)
    if sampled:
        assert all(len(text.split()) == 400 and reason == "length" for text, reason in moved)
    else:
        assert moved == [alone(engine, [5, 6], long), alone(engine, [7, 6], long)]
    _, ended_before, rest, metrics = asyncio.run(main("plain"))
    assert ended_before == 3 and metrics.batch_steps == metrics.handoffs == 0   # the newcomer waited for both
    if not sampled:
        assert texts(rest, 2) == moved


def test_a_search_waits_a_turn_of_a_lone_generation_not_all_of_it():
    """The PyTorch forward: a beam search (the single path) arriving while a lone generation runs. Once that
    generation has made its turn (``preempt_after`` tokens) it is handed off into a batch and parked there at
    once; the search runs, then the short request behind it, and the lone generation resumes with its lone
    text. It used to hold both until it ended; with the handoff off it still does."""
    from tests.test_batch import pytorch_engine

    engine = pytorch_engine("llama", seed=1, max_seq_len=1024)
    long = GenerationConfig(max_new_tokens=600, ignore_eos=True)
    beam = GenerationConfig(max_new_tokens=4, strategy="beam", strategy_options={"num_beams": 2})
    short = GenerationConfig(max_new_tokens=3, ignore_eos=True)

    async def main(hand_off):
        loop = asyncio.get_running_loop()
        sched = Scheduler(engine, max_batch=2, preempt_after=8)
        if not hand_off:
            sched._may_hand_off = lambda job: False
        lone = Job([([5, 6], long)], loop)
        sched.submit(lone)
        first = await asyncio.wait_for(lone.channel.get(), 10)   # running alone
        search, quick = Job([([7, 7], beam)], loop), Job([([9, 9], short)], loop)
        submit_together(sched, [search, quick])
        done = [await drain(search), await drain(quick)]
        ended_before = sched.metrics.generations
        rest = [first] + await drain(lone)
        sched.close()
        return done, ended_before, rest, sched.metrics

    (searched, quick), ended_before, rest, metrics = asyncio.run(main(True))
    assert texts(searched, 1) == [alone(engine, [7, 7], beam)]
    assert texts(quick, 1) == [alone(engine, [9, 9], short)]
    assert ended_before == 2 and metrics.handoffs == 1 and metrics.preemptions >= 1
    assert texts(rest, 1) == [alone(engine, [5, 6], long)]
    _, ended_before, _, metrics = asyncio.run(main(False))
    assert ended_before == 3 and metrics.handoffs == 0   # both waited for the whole lone generation


def test_more_long_requests_than_rows_take_turns():
    """Three long generations on two rows: the parked one gets its turn back before the others finish (parked
    rows also claim a row after a turn), and each still gives its lone text."""
    engine, _ = tiny_engine(seed=1, eos=(3,), max_seq_len=1024)
    config = GenerationConfig(max_new_tokens=120, ignore_eos=True)

    async def main():
        loop = asyncio.get_running_loop()
        sched = Scheduler(engine, max_batch=2, preempt_after=10)
        jobs = [Job([([5 + i, 6], config)], loop) for i in range(3)]
        submit_together(sched, jobs)
        results = [await drain(j) for j in jobs]
        sched.close()
        return results, sched.metrics.preemptions

    results, preemptions = asyncio.run(main())
    for i, items in enumerate(results):
        assert texts(items, 1) == [alone(engine, [5 + i, 6], config)]
    assert preemptions >= 6   # about one turn of 10 tokens in every 20 of each, not one park then a long wait


def test_the_batch_decoder_is_kept_between_batches(monkeypatch):
    """Packed batches (the C forward): one decoder serves batch after batch (its cache's pages stay mapped), and
    each request still gets its lone output; after a failed forward the next batch starts on a new one."""
    from tachy.batch import BatchDecoder
    from tests.test_batch import packed_engine

    engine = packed_engine("llama", seed=3)
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    prompts = [[5 + i, 9, 11, 5 + i, 9, 11] for i in range(4)]

    async def one(sched, prompt):
        job = Job([(prompt, config)], asyncio.get_running_loop())
        sched.submit(job)
        return await drain(job)

    async def main():
        sched = Scheduler(engine, max_batch=4)
        assert sched.rows_alone   # every request a batch row, even alone (the C forward)
        kept, results = [], []
        for prompt in prompts:   # one at a time: each request its own batch
            results.append(await one(sched, prompt))
            kept.append(sched._batch_decoder)
        step = BatchDecoder.step
        monkeypatch.setattr(BatchDecoder, "step", lambda self: (_ for _ in ()).throw(RuntimeError("forward failed")))
        failed = await one(sched, prompts[0])
        dropped = sched._batch_decoder
        monkeypatch.setattr(BatchDecoder, "step", step)
        again = await one(sched, prompts[1])
        sched.close()
        return kept, results, failed, dropped, again, sched._batch_decoder

    kept, results, failed, dropped, again, last = asyncio.run(main())
    assert kept[0] is not None and all(d is kept[0] for d in kept)
    for prompt, items in zip(prompts, results):
        tokens = [t for _, _, p in items for t in p.token_ids]
        assert tokens == [t for p in engine.stream(prompt, config) for t in p.token_ids]
    assert failed[-1][0] == "error" and "forward failed" in str(failed[-1][2])
    assert dropped is None and last is not None and last is not kept[0]
    assert [t for _, _, p in again for t in p.token_ids] == [t for _, _, p in results[1] for t in p.token_ids]


def test_the_prompt_reading_options_reach_the_batch_decoder():
    """`tachy serve --whole-prompt-tokens N --min-prompt-chunk M --prefill-share S` -> create_app -> Scheduler
    -> BatchDecoder; bad values are refused before the server starts, from the command line and from Python (a
    BatchDecoder built at the first request had raised inside the worker thread, which died: every request
    hung)."""
    from tachy.cli import build_parser
    from tachy.errors import InvalidArgumentError, TachyError
    from tachy.server.cli import app_options
    from tests.test_batch import packed_engine

    parse = lambda *flags: app_options(build_parser().parse_args(["serve", *flags]))   # noqa: E731
    options = parse("--whole-prompt-tokens", "96", "--min-prompt-chunk", "16", "--prefill-share", "2")
    assert (options["whole_prompt_tokens"], options["min_prompt_chunk"], options["prefill_share"]) == (96, 16, 2.0)
    defaults = parse()
    assert (defaults["whole_prompt_tokens"], defaults["min_prompt_chunk"], defaults["prefill_share"]) == (0, 4, 0.5)
    for flags in (["--whole-prompt-tokens", "-1"], ["--min-prompt-chunk", "0"], ["--prefill-share", "0"],
                  ["--prefill-share", "nan"]):
        with pytest.raises(TachyError):
            parse(*flags)
    engine = packed_engine("llama", seed=3)
    sched = Scheduler(engine, max_batch=2, batch_options={"whole_prompt_tokens": 96, "min_chunk": 16,
                                                          "prefill_share": 2.0})
    decoder = sched._decoder()
    sched.close()
    assert (decoder.whole_prompt_tokens, decoder.min_chunk, decoder.prefill_share) == (96, 16, 2.0)
    for options in ({"min_chunk": 0}, {"whole_prompt_tokens": -1}, {"prefill_share": 0.0}):
        with pytest.raises(InvalidArgumentError):
            Scheduler(engine, max_batch=2, batch_options=options)
