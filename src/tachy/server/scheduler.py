"""One worker thread owns the engine; it runs a lone request by itself and overlapping ones as a batch.

Why one thread: the engine (its model, its cached drafters with their learned state) is not thread-safe, and
on a CPU a single generation already uses every core it is given, so running two at once only slows both.
The HTTP side never waits on the model: each request is a :class:`Job` with a channel (an asyncio queue fed
through ``loop.call_soon_threadsafe``) that the async endpoint reads piece by piece.

* Batching policy (``max_batch`` > 1), tachy.batch's packed mode: each row drafts with its own drafter and
  one forward verifies every row's draft packed together. With the C forward every request is a batch row,
  alone or not, and joining prompts are prefilled in chunks inside the same forwards; waiting jobs join at
  each step while rows are free, in FIFO order, so nobody waits for another's whole generation; one decoder
  (and its cache) serves every batch. Without the C forward (the PyTorch engine, CUDA) a lone job runs on
  the engine's own speculative path, whose default drafter on a CPU, the int4 self-draft, reads its own cache
  and cannot be a row's (2.91x over plain decoding there against model-free drafts' 1.38x, README); when others
  wait, a batch starts whose rows draft model-free, each joiner prefilled alone between two steps, and a lone
  job still running when a request arrives moves into that batch between two of its steps (``Handoff``), its
  output unchanged (greedy) or still an exact sample (for a single-path request, once it has made its turn of
  ``preempt_after`` tokens, and is parked for it at once). With
  ``speculative_batching=False`` (``--batching plain``, for comparison) the batch rows decode plainly (one
  token per step) and a lone job always runs alone. Either way a job whose options need the single path (a
  search strategy, a press, sparse attention; a prediction in plain rows: ``batch.batchable``) runs alone
  and stops admission until the batch drains. Greedy output is the request's lone output in every mode;
  sampled rows are exact samples (a seeded request reproduces its lone output where its drafts are the same:
  packed rows with a drafter that runs no model, or plain rows against ``drafter="none"``).
* Fairness (``preempt_after`` tokens, batches only): FIFO admission; when every row is taken and a job waits,
  the row that has made the most tokens in its turn (at least ``preempt_after``) is parked (its K/V copied
  out, ``BatchDecoder.park``) and the job takes its cache row; parked rows resume, bit for bit, in order of
  arrival with the waiting jobs. So huge ``max_tokens`` requests share the rows in turns instead of starving
  short ones.
* Bounded queue: at most ``max_queue`` jobs wait (besides the running ones); :meth:`Scheduler.submit` raises
  :class:`QueueFull` beyond that, which the app answers with 429, instead of piling up work.
* Cancellation: a client that goes away sets ``job.cancelled``; the worker checks it between pieces (one
  target forward each), closes the engine's stream or removes the job's batch rows (which frees their KV
  cache) and moves on. A job cancelled while still waiting is skipped.
* Shutdown: :meth:`Scheduler.close` refuses new jobs, ends the waiting ones with an error, lets the running
  ones finish for up to ``grace_s`` seconds, then cancels them; their streams end with ``finish_reason="abort"``
  and an error. :meth:`Scheduler.abort` (SIGTERM) does the same without the grace: running jobs stop at their
  next forward.
* Liveness: the worker stamps the time of its last progress (a piece sent, a batch step, a job started or
  ended); :meth:`Scheduler.stalled_for` is how long it has been busy without any, which /health reports.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field

from ..batch import BatchDecoder, Row, batchable
from ..decoding import GenerationConfig
from ..engine import Engine
from ..generation import GenerationResponse, GenerationStats, Handoff
from .metrics import Metrics

log = logging.getLogger("tachy.server")


STOPPED = "the server is shutting down; this generation was stopped"


class QueueFull(Exception):
    """The wait queue is full (answered 429)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work (answered 503)."""


@dataclass
class Job:
    """One request: ``work[i] = (prompt ids, config)`` makes choice ``i`` (choices run one after the other).

    The channel receives ``("piece", index, GenerationResponse)``, ``("error", None, exception)`` and finally
    ``("end", None, None)``.
    """

    work: list[tuple[list[int], GenerationConfig]]
    loop: asyncio.AbstractEventLoop
    channel: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    aborted: bool = False     # cancelled by shutdown rather than by the client
    queued_at: float = field(default_factory=time.monotonic)

    def send(self, kind: str, index: int | None = None, payload=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.channel.put_nowait, (kind, index, payload))
        except RuntimeError:  # the request's event loop is gone: nobody is listening any more
            self.cancelled.set()


class Scheduler:
    """A FIFO of jobs and the worker thread that runs them on ``engine``."""

    def __init__(self, engine: Engine, max_queue: int = 64, metrics: Metrics | None = None, grace_s: float = 30.0,
                 max_batch: int = 1, speculative_batching: bool = True, preempt_after: int = 256,
                 batch_options: dict | None = None):
        self.engine, self.max_queue, self.grace_s, self.max_batch = engine, max_queue, grace_s, max_batch
        self.preempt_after = preempt_after
        self.speculative_batching = speculative_batching
        self.batch_options = batch_options or {}   # more BatchDecoder arguments (whole_prompt_tokens, min_chunk)
        self.metrics = metrics or Metrics()
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: list[Job] = []
        self._closed = False
        self._aborted = False
        self._progress_at = time.monotonic()
        self._batch_decoder: BatchDecoder | None = None   # kept between batches (_decoder)
        if max_batch > 1:   # built now, so that bad batch options fail here, not in the worker thread (it died)
            self._decoder()
        self._thread = threading.Thread(target=self._run, name="tachy-worker", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def running(self) -> int:
        """Requests being generated now (more than one while a batch runs)."""
        return len(self._running)

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def stalled_for(self) -> float:
        """Seconds the worker has been busy without progress (0 while idle)."""
        return time.monotonic() - self._progress_at if self._running else 0.0

    def _progress(self) -> None:
        self._progress_at = time.monotonic()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue and (self._running or self._waiting):
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting "
                                f"(max_queue={self.max_queue}); retry later")
            self._waiting.append(job)
            self.metrics.set_queue(len(self._waiting), bool(self._running))
            self._cond.notify()

    def close(self) -> None:
        """Refuse new jobs, end waiting ones, give the running one ``grace_s`` seconds, stop the worker."""
        self._refuse_new()
        self._thread.join(0.0 if self._aborted else self.grace_s)
        self._abort_running()
        self._thread.join(5.0)

    def abort(self) -> None:
        """Stop now (SIGTERM): refuse new jobs, end waiting ones, stop running ones at their next forward.
        Their streams end with an error chunk; nothing waits for a generation to finish."""
        self._aborted = True
        self._refuse_new()
        self._abort_running()

    def _refuse_new(self) -> None:
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._cond.notify_all()
        for job in waiting:
            job.send("error", None, ShuttingDown("the server is shutting down"))
            job.send("end")

    def _abort_running(self) -> None:
        for running in list(self._running):
            running.aborted = True
            running.cancelled.set()

    # -- the worker thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                job = self._waiting.popleft()
                self._running = [job]
                self._progress()
                self.metrics.set_queue(len(self._waiting), True)
                # with the C forward's rows, every request runs as a batch row, even alone: no lone path to
                # wait behind; else a lone request keeps the engine's speculative path (the int4 self-draft)
                together = self.max_batch > 1 and self._batchable(job) and (self.rows_alone or any(
                    not j.cancelled.is_set() for j in self._waiting))
            try:
                if job.cancelled.is_set():
                    job.send("end")
                elif together:
                    self._run_batch(job)
                elif (moved := self._execute(job, may_hand_off=self._may_hand_off(job))) is not None:
                    self._run_batch(job, moved)
            finally:
                with self._cond:
                    self._running = []
                    self._progress()
                    self.metrics.set_queue(len(self._waiting), False)

    @property
    def rows_alone(self) -> bool:
        """Whether a lone request runs as a batch row too: rows that draft on the C forward, whose drafters are
        the lone path's and which read joining prompts in chunks beside the running rows."""
        return self.speculative_batching and getattr(self.engine.model, "cpu_forward", None) is not None

    def _may_hand_off(self, job: Job) -> bool:
        """Whether a lone job on the engine's own path (the PyTorch forward) moves into a batch, between two
        of its steps, once another request waits (``Handoff``): so nobody waits for a whole generation there
        either. It then drafts model-free as every row (an int4 self-draft reads a lone cache)."""
        return self.max_batch > 1 and self.speculative_batching and not self.rows_alone and self._batchable(job)

    def _batchable(self, job: Job) -> bool:
        return all(batchable(config, self.speculative_batching) for _, config in job.work)

    def _joinable(self) -> bool:
        """Whether the first waiting job may join a running batch now (call with ``_cond`` held)."""
        return bool(self._waiting) and not self._closed and self._batchable(self._waiting[0])

    # -- batches -------------------------------------------------------------------------------------------
    def _run_batch(self, first: Job, moved: _Moved | None = None) -> None:
        """Run ``first`` and every batchable job that arrives meanwhile as rows of one BatchDecoder, until
        none is left (see the module docstring); ``first`` continues from ``moved`` where it was handed off."""
        decoder = self._decoder()
        state = _BatchState(self, decoder)
        state.admit(first, moved)
        try:
            if moved is not None:
                _, config = first.work[moved.index]
                decoder.adopt(moved.handoff, config, tag=(first, moved.index))
            self._batch_steps(decoder, state)
        except Exception as e:  # noqa: BLE001 - a forward, join or park failed: the batch's jobs get the error
            self._batch_decoder = None   # nothing of a failed batch carries over: the next one is new
            state.fail_all(e)            # and the worker lives on for the next request

    def _batch_steps(self, decoder: BatchDecoder, state: "_BatchState") -> None:
        """Join waiting jobs at each step boundary and step the batch until no row or job is left."""
        while True:
            with self._cond:  # join at a step boundary while rows are free, in order of arrival
                alone = self._alone_next(decoder)
                if alone:
                    self._park_for_alone(decoder)
                else:
                    self._preempt(decoder, state)
                while not alone:
                    joinable, room = self._joinable(), len(state.pending) < decoder.free
                    if room and decoder.parked and (not joinable or
                                                    decoder.parked[0].parked_at <= self._waiting[0].queued_at):
                        decoder.resume()   # a parked row's turn comes after the jobs that waited before it
                    elif joinable and (room or not state.has_newcomer()):
                        # past the free rows, one job more may wait among the pending choices: it takes the
                        # next free row before the later choices of jobs that hold rows (``take``)
                        job = self._waiting.popleft()
                        self._running.append(job)
                        state.admit(job)
                    else:
                        break
                self.metrics.set_queue(len(self._waiting), len(self._running))
            state.drop_cancelled()
            while state.pending and decoder.free:
                job, index = state.take()
                try:
                    state.dispatch(decoder.add(*job.work[index], tag=(job, index)))
                except Exception as e:  # noqa: BLE001 - a bad request fails alone
                    state.end(job, e)
            if not decoder.rows:
                if not state.pending and not decoder.parked:
                    return
                if alone and not state.pending:   # every row parked for the single-path job next in line
                    self._run_alone(decoder)
                continue
            self.metrics.record_batch_step(len(decoder.rows))
            state.dispatch(decoder.step())
            while decoder.failed:   # a row's own failure (its processor, drafter): its request ends alone
                row, error = decoder.failed.pop(0)
                state.end(row.tag[0], error)
            self._progress()

    def _decoder(self) -> BatchDecoder:
        """The batch decoder, kept from one batch to the next (dropped after a failed forward): its cache's pages
        stay mapped and its measured prompt-token cost stays learned. A new whole-window cache per batch (per
        request at concurrency 1) took 850-1,600 fresh page faults per short request inside its forwards,
        against ~0 kept (docs/server.md)."""
        if self._batch_decoder is None:
            self._batch_decoder = BatchDecoder(self.engine, self.max_batch, packed=self.speculative_batching,
                                               **self.batch_options)
        return self._batch_decoder

    def _alone_next(self, decoder: BatchDecoder) -> bool:
        """Whether the first waiting job needs the single path (a search, a press ...) and comes before every
        parked row (it waited before they were parked); call with ``_cond`` held."""
        if not self._waiting or self._closed or self._batchable(self._waiting[0]):
            return False
        return not decoder.parked or self._waiting[0].queued_at < decoder.parked[0].parked_at

    def _run_alone(self, decoder: BatchDecoder) -> None:
        """Run the single-path job first in line while every batch row is parked; they resume after it. It
        used to wait until the batch drained, every later request behind it: a 4-token beam search held a
        short chat until a 700-token generation ended."""
        with self._cond:
            if not self._alone_next(decoder):   # shutdown came meanwhile
                return
            job = self._waiting.popleft()
            self._running.append(job)
            self._progress()
            self.metrics.set_queue(len(self._waiting), True)
        try:
            if job.cancelled.is_set():
                job.send("end")
            else:
                self._execute(job)
        finally:
            with self._cond:
                self._running = [j for j in self._running if j is not job]

    def _park_for_alone(self, decoder: BatchDecoder) -> None:
        """A single-path job is next: park every row that made ``preempt_after`` tokens in its turn, so that
        the batch empties for it within a turn (``_run_alone``); 0 parks none (it waits for the batch to end)."""
        if not self.preempt_after:
            return
        while (row := decoder.preemptible(self.preempt_after)) is not None:
            decoder.park(row)
            self.metrics.preemptions += 1

    def _preempt(self, decoder: BatchDecoder, state: "_BatchState") -> None:
        """Fairness: when every row is taken and a batchable job or a parked row waits, park the row that made
        the most tokens in its turn, if it made at least ``preempt_after`` (it resumes, bit for bit, after the
        jobs and rows waiting before it was parked). So requests with huge ``max_tokens`` take turns of
        ``preempt_after`` tokens on the rows instead of holding them for their whole generation."""
        if not self.preempt_after or decoder.free > len(state.pending) or self._closed:
            return
        if not self._joinable() and not decoder.parked and not state.has_newcomer():   # a parked row waits too
            return
        row = decoder.preemptible(self.preempt_after)
        if row is not None:
            decoder.park(row)
            self.metrics.preemptions += 1

    def _stop_check(self, job: Job):
        """The engine asks this after every forward: a search (beam, MBR) commits nothing until it ends, so
        its forwards are the worker's progress, and a cancelled request stops there, not at the search's end."""
        def should_stop() -> bool:
            self._progress()
            return job.cancelled.is_set()
        return should_stop

    def _execute(self, job: Job, may_hand_off: bool = False) -> _Moved | None:
        """Run the job's choices one after the other on the engine's own path. With ``may_hand_off``, a choice
        still generating when a request that can join a batch waits is handed off (``Handoff``): the job
        moves into a batch from there (returned; this job's channel stays open)."""
        start = time.perf_counter()
        moved = None
        try:
            for index, (prompt_ids, config) in enumerate(job.work):
                last: GenerationResponse | None = None
                # asked with the tokens this choice has sent: its turn so far
                handoff = Handoff(lambda: self._hand_off_now(last.stats.generated_tokens if last else 0)) \
                    if may_hand_off else None
                for piece in self.engine.stream(prompt_ids, config, should_stop=self._stop_check(job),
                                                handoff=handoff):
                    # stats are updated in place by the engine: send a snapshot
                    last = dataclasses.replace(piece, stats=dataclasses.replace(piece.stats))
                    job.send("piece", index, last)
                    self._progress()
                    if job.cancelled.is_set():
                        break  # closing the stream frees this request's cache
                if handoff is not None and handoff.taken:
                    self.metrics.handoffs += 1
                    moved = _Moved(index, handoff, last, start)
                    return moved
                if last is not None:
                    self.metrics.record_generation(last.stats)
                if job.cancelled.is_set():
                    if job.aborted:
                        stats = last.stats if last is not None else GenerationStats()
                        job.send("piece", index, GenerationResponse("", [], [], stats, "abort"))
                        job.send("error", None, ShuttingDown(STOPPED))
                    break
        except Exception as e:  # noqa: BLE001 - every failure goes back to its request, the worker lives on
            if not isinstance(e, ValueError) and type(e).__module__.split(".")[0] != "tachy":
                log.exception("generation failed")
            job.send("error", None, e)
        finally:
            if moved is None:
                self.metrics.record_request_time(time.perf_counter() - start)
                job.send("end")
        return None

    def _hand_off_now(self, made: int) -> bool:
        """Handoff.wanted for a lone job that has made ``made`` tokens: whether the first job still waiting
        could join a batch now, or needs the single path (a search, a press) and the lone job's turn of
        ``preempt_after`` tokens is over: in the batch it is then parked for that job at once (it resumes after
        it), as a batch row would be (``_park_for_alone``), instead of making it wait for the whole generation."""
        with self._cond:
            waiting = [j for j in self._waiting if not j.cancelled.is_set()]
            if not waiting or self._closed:
                return False
            return self._batchable(waiting[0]) or 0 < self.preempt_after <= made


@dataclass
class _Moved:
    """A lone job's choice handed off to a batch (``Scheduler._execute``): which, its state, its last piece
    sent and when the job started."""

    index: int
    handoff: Handoff
    last: GenerationResponse | None
    start: float


class _BatchState:
    """Bookkeeping of one batch run: each job's rows still to join (``pending``) or running, its last piece
    per choice, its start time; a job ends (``end``) when all its choices finished, failed or were cancelled."""

    def __init__(self, scheduler: Scheduler, decoder: BatchDecoder):
        self.scheduler, self.decoder = scheduler, decoder
        self.pending: collections.deque[tuple[Job, int]] = collections.deque()
        self.jobs: dict[int, tuple[Job, int, float, dict]] = {}   # id(job) -> (job, choices left, start, last)
        self.broken = False   # the decoder failed: it is dropped, its rows are not touched again

    def admit(self, job: Job, moved: _Moved | None = None) -> None:
        """Queue the job's choices for rows; with ``moved``, only those after the one it continues (which the
        caller adopts), the ones before it having ended on the engine's own path."""
        if job.cancelled.is_set() and moved is None:
            job.send("end")
            self._forget(job)
            return
        first = 0 if moved is None else moved.index
        start = time.perf_counter() if moved is None else moved.start
        lasts = {} if moved is None or moved.last is None else {first: moved.last}
        self.jobs[id(job)] = (job, len(job.work) - first, start, lasts)
        self.pending.extend((job, index) for index in range(first + (moved is not None), len(job.work)))

    def _held(self) -> collections.Counter:
        """Rows (running or parked) per job, by ``id(job)``."""
        return collections.Counter(id(row.tag[0]) for row in self.decoder.rows + self.decoder.parked)

    def has_newcomer(self) -> bool:
        """Whether a pending choice belongs to a job that holds no row yet."""
        held = self._held()
        return any(not held[id(job)] for job, _ in self.pending)

    def take(self) -> tuple[Job, int]:
        """The pending choice that gets the next free row: one of the job holding the fewest rows, the first of
        those in order of arrival. So the free rows go round the requests, a choice each: a request with
        many choices (128 prompts, or n=16) no longer holds every later request back until its last choice
        has had a row (through the server, a short chat behind 16 prompts of 1,500 tokens on 8 rows waited
        19.8 s, for all 16 to be read; now 12.1 s, for the prompts of the rows that joined before it)."""
        held = self._held()
        best = min(range(len(self.pending)), key=lambda i: held[id(self.pending[i][0])])
        choice = self.pending[best]
        del self.pending[best]
        return choice

    def dispatch(self, events: list[tuple[Row, GenerationResponse]]) -> None:
        for row, piece in events:
            job, index = row.tag
            if id(job) not in self.jobs:
                continue
            last = dataclasses.replace(piece, stats=dataclasses.replace(piece.stats))
            self.jobs[id(job)][3][index] = last
            job.send("piece", index, last)
            if piece.finish_reason is not None:
                self.scheduler.metrics.record_generation(last.stats)
                j, left, start, lasts = self.jobs[id(job)]
                self.jobs[id(job)] = (j, left - 1, start, lasts)
                if left == 1:
                    self.end(job)

    def fail_all(self, error: Exception) -> None:
        """End every job of a batch whose decoder failed with ``error`` (its state may be inconsistent, so
        nothing more is asked of it)."""
        self.broken = True
        for job, *_ in list(self.jobs.values()):
            self.end(job, error)

    def drop_cancelled(self) -> None:
        for job, *_ in list(self.jobs.values()):
            if job.cancelled.is_set():
                self.end(job, cancelled=True)

    def end(self, job: Job, error: Exception | None = None, cancelled: bool = False) -> None:
        """Remove the job's rows (their cache rows are free at once) and close its channel."""
        if id(job) not in self.jobs:
            return
        _, _, start, lasts = self.jobs.pop(id(job))
        self.pending = collections.deque(p for p in self.pending if p[0] is not job)
        rows = [] if self.broken else [r for r in self.decoder.rows + self.decoder.parked if r.tag[0] is job]
        for row in rows:
            self.decoder.remove(row)
            if cancelled:
                index = row.tag[1]
                stats = lasts[index].stats if index in lasts else dataclasses.replace(row.stats)
                self.scheduler.metrics.record_generation(stats)
                if job.aborted:
                    job.send("piece", index, GenerationResponse("", [], [], stats, "abort"))
        if job.aborted and cancelled:
            job.send("error", None, ShuttingDown(STOPPED))
        if error is not None:
            if not isinstance(error, ValueError) and type(error).__module__.split(".")[0] != "tachy":
                log.error("generation failed", exc_info=error)
            job.send("error", None, error)
        self.scheduler.metrics.record_request_time(time.perf_counter() - start)
        self._forget(job)
        job.send("end")

    def _forget(self, job: Job) -> None:
        with self.scheduler._cond:
            running = self.scheduler._running
            self.scheduler._running = [j for j in running if j is not job]
