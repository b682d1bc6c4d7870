"""`tachy eval ruler`: every setting answers the same RULER-style samples (ruler_tasks.py) at every context.

All samples are built (and checked against their context budget) before the first one runs, so a context too
small for a task fails at once. The accuracy of a run is the mean over its samples, with the same number of
samples per task, so it is also the mean of the per-task accuracies (as RULER averages its tasks).
"""
from __future__ import annotations

from tqdm import tqdm

from ..engine import Engine
from .ruler_tasks import RulerConfig, RulerPrompts, Sample
from .sweep import Setting, answer_settings, score, summarize, tallies


def build_samples(engine: Engine, text: str, contexts: list[int], tasks: list[str], samples: int, seed: int = 0,
                  config: RulerConfig = RulerConfig()) -> list[Sample]:
    prompts = RulerPrompts(engine, text, max(contexts), config)
    return [prompts.sample(t, c, i, seed) for c in contexts for t in tasks for i in range(samples)]


def run_ruler(engine: Engine, text: str, contexts: list[int], tasks: list[str], settings: list[Setting],
              samples: int = 4, seed: int = 0, progress: bool = True) -> dict:
    """Per-task accuracy, KV held, prefill time and decode speed of every setting at every context; returns
    the results.json dictionary."""
    todo = build_samples(engine, text, contexts, tasks, samples, seed)
    tally = tallies(settings, contexts)
    answers = []
    bar = tqdm(total=len(todo) * len(settings), disable=not progress, desc="ruler")
    for sample in todo:
        for s, a in zip(settings, answer_settings(engine, sample.ids, settings, sample.max_new_tokens)):
            out = engine.tokenizer.decode(a.tokens)
            value = score(sample.expected, out)
            tally[(s, sample.context)].add(sample.task, value, a)
            answers.append({"setting": s.label, "task": sample.task, "context": sample.context,
                            "index": sample.index, "prompt_tokens": len(sample.ids), "expected": sample.expected,
                            "answer": out, "score": value})
            bar.update()
    bar.close()
    return {"model": engine.name, "task": "ruler", "contexts": contexts, "tasks": tasks, "samples": samples,
            "seed": seed, **summarize(settings, contexts, tally, "tasks"), "answers": answers}
