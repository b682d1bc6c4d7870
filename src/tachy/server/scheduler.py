"""One worker thread owns the engine and runs generations one at a time, first come first served.

Why one thread: the engine (its model, its cached drafters with their learned state) is not thread-safe, and
on a CPU a single generation already uses every core it is given, so running two at once only slows both.
The HTTP side never waits on the model: each request is a :class:`Job` with a channel (an asyncio queue fed
through ``loop.call_soon_threadsafe``) that the async endpoint reads piece by piece.

* Bounded queue: at most ``max_queue`` jobs wait (besides the one running); :meth:`Scheduler.submit` raises
  :class:`QueueFull` beyond that, which the app answers with 429, instead of piling up work.
* Cancellation: a client that goes away sets ``job.cancelled``; the worker checks it between pieces (one
  target forward each), closes the engine's stream (which frees the request's KV cache) and moves on. A job
  cancelled while still waiting is skipped.
* Shutdown: :meth:`Scheduler.close` refuses new jobs, ends the waiting ones with an error, lets the running
  one finish for up to ``grace_s`` seconds, then cancels it; its stream ends with ``finish_reason="abort"``.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field

from ..engine import Engine, GenerationConfig, GenerationResponse, GenerationStats
from .metrics import Metrics

log = logging.getLogger("tachy.server")


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

    def send(self, kind: str, index: int | None = None, payload=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.channel.put_nowait, (kind, index, payload))
        except RuntimeError:  # the request's event loop is gone: nobody is listening any more
            self.cancelled.set()


class Scheduler:
    """A FIFO of jobs and the worker thread that runs them on ``engine``."""

    def __init__(self, engine: Engine, max_queue: int = 64, metrics: Metrics | None = None, grace_s: float = 30.0):
        self.engine, self.max_queue, self.grace_s = engine, max_queue, grace_s
        self.metrics = metrics or Metrics()
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tachy-worker", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def busy(self) -> bool:
        return self._running is not None

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue and (self._running is not None or self._waiting):
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting "
                                f"(max_queue={self.max_queue}); retry later")
            self._waiting.append(job)
            self.metrics.set_queue(len(self._waiting), self._running is not None)
            self._cond.notify()

    def close(self) -> None:
        """Refuse new jobs, end waiting ones, give the running one ``grace_s`` seconds, stop the worker."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._cond.notify_all()
        for job in waiting:
            job.send("error", None, ShuttingDown("the server is shutting down"))
            job.send("end")
        self._thread.join(self.grace_s)
        running = self._running
        if running is not None:
            running.aborted = True
            running.cancelled.set()
        self._thread.join(5.0)

    # -- the worker thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                job = self._running = self._waiting.popleft()
                self.metrics.set_queue(len(self._waiting), True)
            try:
                if job.cancelled.is_set():
                    job.send("end")
                else:
                    self._execute(job)
            finally:
                with self._cond:
                    self._running = None
                    self.metrics.set_queue(len(self._waiting), False)

    def _execute(self, job: Job) -> None:
        start = time.perf_counter()
        try:
            for index, (prompt_ids, config) in enumerate(job.work):
                last: GenerationResponse | None = None
                for piece in self.engine.stream(prompt_ids, config):
                    # stats are updated in place by the engine: send a snapshot
                    last = dataclasses.replace(piece, stats=dataclasses.replace(piece.stats))
                    job.send("piece", index, last)
                    if job.cancelled.is_set():
                        break  # closing the stream frees this request's cache
                if last is not None:
                    self.metrics.record_generation(last.stats)
                if job.cancelled.is_set():
                    if job.aborted:
                        stats = last.stats if last is not None else GenerationStats()
                        job.send("piece", index, GenerationResponse("", [], [], stats, "abort"))
                    break
        except Exception as e:  # noqa: BLE001 - every failure goes back to its request, the worker lives on
            if not isinstance(e, ValueError) and type(e).__module__.split(".")[0] != "tachy":
                log.exception("generation failed")
            job.send("error", None, e)
        finally:
            self.metrics.record_request_time(time.perf_counter() - start)
            job.send("end")

