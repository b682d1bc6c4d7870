"""Needle in a haystack: a fact ("The secret number is 48213.") hidden at a depth of a long text, then asked
for. Each (context, depth) prompt is prefilled once; every press/ratio compresses a copy and answers.

Prompt: an instruct model (with a chat template) gets the haystack and the question as the user turn and the
answer primed with "The secret number is"; a base model gets the same as plain text ending in "Answer: The
secret number is". The answer is correct when it contains the number. The prompt's last token is forwarded
after compression, so the whole answer comes from the compressed cache (as in ``Engine._prefill``).
"""
from __future__ import annotations

import random
import time

from tqdm import tqdm

from ..engine import Engine
from .sweep import Prefilled, Setting, greedy, records

QUESTION = "What is the secret number mentioned in the text above? Answer with the number only."
ANSWER = "The secret number is"
ANSWER_TOKENS = 8


class Haystack:
    """Token ids of the haystack text and the prompt frame around it, for one engine."""

    def __init__(self, engine: Engine, text: str, max_context: int):
        tok = engine.tokenizer
        self.engine = engine
        self.filler = tok.encode(text[: max_context * 8], add_special_tokens=False)
        if tok.has_chat_template:
            marker = "@@HAYSTACK@@"
            frame = tok.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True)
            before, after = frame.split(marker)
            self.head = tok.encode(before, add_special_tokens=False)
            self.tail = tok.encode("\n\n" + QUESTION + after + ANSWER, add_special_tokens=False)
        else:
            self.head = tok.encode("", add_special_tokens=True)   # BOS where the model uses one
            self.tail = tok.encode(f"\n\nQuestion: {QUESTION}\nAnswer: {ANSWER}", add_special_tokens=False)
        if len(self.filler) < max_context:
            raise ValueError(f"the haystack text has only {len(self.filler)} tokens; {max_context} needed")
        newline = [i for i, t in enumerate(self.filler[:max_context]) if "\n" in tok.decode([t])]
        self.breaks = newline or list(range(max_context))

    def prompt(self, context: int, depth: float, number: int) -> list[int]:
        """``context`` tokens: haystack with the needle at the line break nearest ``depth`` (0..1) of it."""
        needle = self.engine.tokenizer.encode(f"The secret number is {number}.\n", add_special_tokens=False)
        room = context - len(self.head) - len(self.tail) - len(needle)
        at = min((b + 1 for b in self.breaks if b < room), key=lambda b: abs(b - depth * room), default=0)
        filler = self.filler[:room]
        return self.head + filler[:at] + needle + filler[at:] + self.tail


def run_needle(engine: Engine, text: str, contexts: list[int], depths: list[float], settings: list[Setting],
               needles: int = 1, seed: int = 0, progress: bool = True) -> dict:
    """Accuracy of every setting at every (context, depth); returns the results.json dictionary."""
    hay = Haystack(engine, text, max(contexts))
    rng = random.Random(seed)
    cells = [(c, d, rng.randrange(10000, 99999)) for c in contexts for d in depths for _ in range(needles)]
    correct = {(s.label, c, d): 0 for s in settings for c in contexts for d in depths}
    kv_bytes = {(s.label, c): [] for s in settings for c in contexts}
    prefill_s = {c: [] for c in contexts}
    decode_s = {(s.label, c): [0.0, 0] for s in settings for c in contexts}   # seconds, tokens
    answers = []
    bar = tqdm(total=len(cells) * len(settings), disable=not progress, desc="needle")
    for context, depth, number in cells:
        ids = hay.prompt(context, depth, number)
        pre = Prefilled(engine, ids[:-1], ANSWER_TOKENS + 1, record=records(settings))
        prefill_s[context].append(pre.seconds)
        for s in settings:
            cache = pre.compressed(s)
            kv_bytes[(s.label, context)].append(cache.nbytes)
            start = time.perf_counter()
            answer = greedy(engine, cache, ids[-1], ANSWER_TOKENS)
            timing = decode_s[(s.label, context)]
            timing[0] += time.perf_counter() - start
            timing[1] += len(answer) + 1
            out = engine.tokenizer.decode(answer)
            ok = str(number) in out
            correct[(s.label, context, depth)] += ok
            answers.append({"setting": s.label, "context": context, "depth": depth, "number": number,
                            "answer": out, "correct": ok})
            bar.update()
    bar.close()

    def accuracy(label: str, context: int) -> float:
        return sum(correct[(label, context, d)] for d in depths) / (len(depths) * needles)

    def by_depth(label: str, context: int) -> dict:
        return {f"{d:g}": correct[(label, context, d)] / needles for d in depths}

    def mean_bytes(label: str, context: int) -> int:
        return round(sum(kv_bytes[(label, context)]) / len(kv_bytes[(label, context)]))

    def speed(label: str, context: int) -> dict:
        """The prompt's (dense, shared) prefill seconds and this setting's answer tokens per second."""
        seconds, tokens = decode_s[(label, context)]
        return {"prefill_s": sum(prefill_s[context]) / len(prefill_s[context]),
                "decode_tokens_per_s": tokens / seconds if seconds else 0.0}

    full = settings[0].label
    return {
        "model": engine.name, "task": "needle", "contexts": contexts, "depths": depths, "needles": needles,
        "baseline": {"accuracy": sum(accuracy(full, c) for c in contexts) / len(contexts),
                     "kv_bytes": round(sum(mean_bytes(full, c) for c in contexts) / len(contexts)),
                     "attention": "dense",
                     "per_context": [{"context": c, "accuracy": accuracy(full, c), "kv_bytes": mean_bytes(full, c),
                                      "depths": by_depth(full, c), **speed(full, c)} for c in contexts]},
        "runs": [{"press": s.press, "ratio": s.ratio, "attention": s.attention, "context": c,
                  "accuracy": accuracy(s.label, c), "kv_bytes": mean_bytes(s.label, c), "depths": by_depth(s.label, c),
                  **speed(s.label, c)}
                 for s in settings[1:] for c in contexts],
        "answers": answers,
    }
