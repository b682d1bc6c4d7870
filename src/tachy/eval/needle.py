"""Needle in a haystack: a fact ("The secret number is 48213.") hidden at a depth of a long text, then asked
for. Every setting answers every (context, depth) prompt through the engine (sweep.answer); the answer is
primed with "The secret number is" (prompts.frame) and is correct when it contains the number.
"""
from __future__ import annotations

import random

from tqdm import tqdm

from ..engine import Engine
from .prompts import Haystack, frame
from .sweep import Setting, answer_settings, summarize, tallies

QUESTION = "What is the secret number mentioned in the text above? Answer with the number only."
ANSWER = "The secret number is"
ANSWER_TOKENS = 8


def needle_prompt(engine: Engine, hay: Haystack, context: int, depth: float, number: int) -> list[int]:
    """``context`` tokens: the haystack with the needle at the line break nearest ``depth`` (0..1) of it."""
    f = frame(engine, QUESTION, ANSWER)
    needle = hay.sentence(f"The secret number is {number}.")
    return f.head + hay.body(context - len(f), [(depth, needle)]) + f.tail


def run_needle(engine: Engine, text: str, contexts: list[int], depths: list[float], settings: list[Setting],
               needles: int = 1, seed: int = 0, progress: bool = True) -> dict:
    """Accuracy, KV held, prefill time and decode speed of every setting at every (context, depth); returns
    the results.json dictionary."""
    hay = Haystack(engine, text, max(contexts))
    rng = random.Random(seed)
    cells = [(c, d, rng.randrange(10000, 99999)) for c in contexts for d in depths for _ in range(needles)]
    tally = tallies(settings, contexts)
    answers = []
    bar = tqdm(total=len(cells) * len(settings), disable=not progress, desc="needle")
    for context, depth, number in cells:
        ids = needle_prompt(engine, hay, context, depth, number)
        for s, a in zip(settings, answer_settings(engine, ids, settings, ANSWER_TOKENS)):
            out = engine.tokenizer.decode(a.tokens)
            ok = str(number) in out
            tally[(s, context)].add(f"{depth:g}", float(ok), a)
            answers.append({"setting": s.label, "context": context, "depth": depth, "number": number,
                            "answer": out, "correct": ok})
            bar.update()
    bar.close()
    return {"model": engine.name, "task": "needle", "contexts": contexts, "depths": depths, "needles": needles,
            **summarize(settings, contexts, tally, "depths"), "answers": answers}
