"""Counters for GET /metrics in Prometheus' text format (no client library: a handful of numbers).

Written by the worker thread and the HTTP handlers, read by the scrape: one lock around plain numbers.
"""
from __future__ import annotations

import collections
import threading

from ..generation import GenerationStats


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()  # (endpoint, status)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.forwards = 0          # target forwards after prefill
        self.accepted = 0          # drafted tokens the target accepted
        self.decode_s = 0.0
        self.generations = 0
        self.busy_s = 0.0          # worker time spent on requests
        self.queue_depth = 0
        self.running = 0
        self.last_tokens_per_s = 0.0
        self.batch_steps = 0       # batched forwards (scheduler batches) and the rows they ran
        self.batch_rows = 0
        self.preemptions = 0       # batch rows parked so that a waiting request could join (fairness)
        self.handoffs = 0          # lone generations moved into a batch when a request arrived (PyTorch forward)
        self.prefix_cache = None   # the engine's PrefixCache (create_app): its counters are read at each scrape

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def set_queue(self, depth: int, running: int) -> None:
        with self._lock:
            self.queue_depth, self.running = depth, int(running)

    def record_batch_step(self, rows: int) -> None:
        with self._lock:
            self.batch_steps += 1
            self.batch_rows += rows

    def record_generation(self, stats: GenerationStats) -> None:
        with self._lock:
            self.generations += 1
            self.prompt_tokens += stats.prompt_tokens
            self.generated_tokens += stats.generated_tokens
            self.forwards += stats.forwards
            self.accepted += stats.accepted
            self.decode_s += stats.decode_s
            self.last_tokens_per_s = stats.tokens_per_s

    def record_request_time(self, seconds: float) -> None:
        with self._lock:
            self.busy_s += seconds

    def _prefix_rows(self) -> list[tuple]:
        cache = self.prefix_cache
        if cache is None:
            return []
        s = cache.stats
        return [
            ("tachy_prefix_cache_lookups_total", "counter", "prompts looked up in the prefix cache", [("", s.lookups)]),
            ("tachy_prefix_cache_hits_total", "counter", "lookups that reused at least one cached block",
             [("", s.hits)]),
            ("tachy_prefix_cache_hit_rate", "gauge", "hits / lookups", [("", round(s.hit_rate, 4))]),
            ("tachy_prefix_cache_reused_tokens_total", "counter", "prompt tokens whose K/V came from the cache",
             [("", s.reused_tokens)]),
            ("tachy_prefix_cache_looked_up_tokens_total", "counter", "prompt tokens offered to the cache",
             [("", s.looked_up_tokens)]),
            ("tachy_prefix_cache_bytes", "gauge", "K/V bytes the cache holds", [("", cache.nbytes)]),
            ("tachy_prefix_cache_evicted_blocks_total", "counter", "blocks evicted to stay within the budget",
             [("", s.evicted_blocks)]),
        ]

    def render(self) -> str:
        """The exposition text (version 0.0.4)."""
        with self._lock:
            decoded = self.generated_tokens - self.generations  # the first token of each comes from prefill
            rows = [
                ("tachy_requests_total", "counter", "HTTP requests by endpoint and status code",
                 [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())]),
                ("tachy_generations_total", "counter", "completed generations (one per choice)",
                 [("", self.generations)]),
                ("tachy_prompt_tokens_total", "counter", "prompt tokens processed", [("", self.prompt_tokens)]),
                ("tachy_generation_tokens_total", "counter", "tokens generated", [("", self.generated_tokens)]),
                ("tachy_target_forwards_total", "counter", "target model forwards after prefill",
                 [("", self.forwards)]),
                ("tachy_accepted_draft_tokens_total", "counter", "drafted tokens accepted by the target",
                 [("", self.accepted)]),
                ("tachy_decode_seconds_total", "counter", "time spent decoding", [("", round(self.decode_s, 6))]),
                ("tachy_tokens_per_second", "gauge", "decode tokens/s over all generations so far",
                 [("", round(decoded / self.decode_s, 3) if self.decode_s else 0.0)]),
                ("tachy_last_tokens_per_second", "gauge", "decode tokens/s of the last generation",
                 [("", round(self.last_tokens_per_s, 3))]),
                ("tachy_mean_accepted_tokens", "gauge",
                 "tokens committed per target forward (accepted drafts + 1), over all generations",
                 [("", round(1.0 + self.accepted / self.forwards, 4) if self.forwards else 0.0)]),
                ("tachy_queue_depth", "gauge", "requests waiting for the worker", [("", self.queue_depth)]),
                ("tachy_requests_running", "gauge", "requests being generated now", [("", self.running)]),
                ("tachy_batch_steps_total", "counter", "batched forwards (overlapping requests decoded together)",
                 [("", self.batch_steps)]),
                ("tachy_batch_rows_total", "counter", "rows over all batched forwards (mean batch = rows/steps)",
                 [("", self.batch_rows)]),
                ("tachy_preemptions_total", "counter",
                 "batch rows parked after a turn of --preempt-after tokens so that waiting requests could join",
                 [("", self.preemptions)]),
                ("tachy_handoffs_total", "counter",
                 "lone generations moved into a batch between two steps because a request arrived",
                 [("", self.handoffs)]),
            ] + self._prefix_rows()
        out = []
        for name, kind, help_text, samples in rows:
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            out += [f"{name}{labels} {value}" for labels, value in samples]
        return "\n".join(out) + "\n"
