"""RULER-style synthetic tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?"), generated locally from a seed and sized in the model's own tokens.

* ``niah_multikey``: several "special magic number for <key>" needles in the haystack; asked for one key's value
  (the others distract).
* ``niah_multivalue``: one key with several values spread over the haystack; asked for all of them.
* ``niah_multiquery``: several keys; asked for the values of a few of them at once.
* ``vt`` (variable tracking): chains ``VAR A = 12345``, ``VAR B = VAR A``, ... hidden in the haystack, with a
  distractor chain; asked which variables hold the first chain's value.
* ``cwe`` (common-word extraction): a list of words where a few appear ``common_freq`` times and the rest
  ``rare_freq`` times; asked for the most common ones. The list is the whole body (no haystack), with as many
  rare words as the context holds, so the task gets harder with length, as in RULER.

Every sample is drawn from ``random.Random(f"{seed}-{task}-{context}-{index}")``: the same seed gives the same
samples whatever other tasks or contexts are asked for. Prompts are ``context - max_new_tokens`` tokens, so
the prompt and the answer fit the context. The score is RULER's: the fraction of expected strings in the answer.
"""
from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Callable

from ..engine import Engine
from ..errors import InvalidArgumentError, UnknownNameError
from .prompts import Haystack, frame

NEEDLE_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                "I will quiz you about the numbers afterwards.\n\n")
VT_INTRO = ("Memorize and track the chains of variable assignments hidden in the following text.\n\n")
CWE_INTRO = ("Below is a comma-separated list of words. Some of the words appear much more often than others. "
             "Memorize the words that appear most often.\n\n")


@dataclass(frozen=True)
class RulerConfig:
    """The size of each task; RULER's defaults where a 135M model still has something to find."""

    keys: int = 4           # niah_multikey / niah_multiquery: needles (one key each)
    values: int = 4         # niah_multivalue: values of the one key
    queries: int = 2        # niah_multiquery: keys asked at once
    hops: int = 4           # vt: assignments after the first in each chain
    chains: int = 2         # vt: chains (the first is asked for, the others distract)
    common_words: int = 5   # cwe: words asked for
    common_freq: int = 30   # cwe: how often each common word appears
    rare_freq: int = 3      # cwe: how often each other word appears


@dataclass
class Sample:
    """One prompt of one task, with what its answer must contain."""

    task: str
    context: int
    index: int
    ids: list[int]
    expected: list[str]
    max_new_tokens: int


class RulerPrompts:
    """Builds the samples of every task for one engine and one haystack text."""

    def __init__(self, engine: Engine, text: str, max_context: int, config: RulerConfig = RulerConfig()):
        self.engine, self.config = engine, config
        self.hay = Haystack(engine, text, max_context)
        # whole lower-case words (not "ercast" from "o'ercast", nor names, which are capitalised)
        words = sorted(set(re.findall(r"(?<![\w'-])[a-z]{4,9}(?![\w'-])", text[:500_000])))
        if len(words) < 100:
            raise InvalidArgumentError(f"the haystack text has only {len(words)} distinct words; 100 needed")
        self.words = words

    def sample(self, task: str, context: int, index: int, seed: int = 0) -> Sample:
        if task not in TASKS:
            raise UnknownNameError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
        rng = random.Random(f"{seed}-{task}-{context}-{index}")
        build, max_new = TASKS[task]
        try:
            ids, expected = build(self, context - max_new, rng)
        except _TooSmall as e:
            raise InvalidArgumentError(f"--context {context} is too small for task {task}: {e.what} take "
                                       f"{e.need} tokens, so it needs a context of at least {e.need + max_new} "
                                       f"tokens") from None
        return Sample(task, context, index, ids, expected, max_new)

    # -- helpers ----------------------------------------------------------------------------------------
    def _haystack_prompt(self, budget: int, intro: str, question: str, answer: str,
                         inserts: list[tuple[float, str]]) -> list[int]:
        f = frame(self.engine, question, answer, intro)
        sentences = [(d, self.hay.sentence(s)) for d, s in inserts]
        need = len(f) + sum(len(ids) for _, ids in sentences) + 32   # and a little haystack around them
        if need > budget:
            raise _TooSmall("its question, needles and some haystack", need)
        return f.head + self.hay.body(budget - len(f), sentences) + f.tail

    def _keys(self, rng: random.Random, n: int) -> list[str]:
        """``n`` distinct keys like "lantern-quiet" (two words of the haystack: rare in it as a pair)."""
        keys: list[str] = []
        while len(keys) < n:
            key = "-".join(rng.sample(self.words, 2))
            if key not in keys:
                keys.append(key)
        return keys

    # -- tasks ------------------------------------------------------------------------------------------
    def multikey(self, budget: int, rng: random.Random) -> tuple[list[int], list[str]]:
        keys, values = self._keys(rng, self.config.keys), _numbers(rng, self.config.keys)
        inserts = [(rng.random(), f"One of the special magic numbers for {k} is: {v}.") for k, v in zip(keys, values)]
        q = rng.randrange(len(keys))
        ids = self._haystack_prompt(budget, NEEDLE_INTRO,
                                    f"What is the special magic number for {keys[q]} mentioned in the text above?",
                                    f"The special magic number for {keys[q]} mentioned in the text is", inserts)
        return ids, [values[q]]

    def multivalue(self, budget: int, rng: random.Random) -> tuple[list[int], list[str]]:
        key, values = self._keys(rng, 1)[0], _numbers(rng, self.config.values)
        inserts = [(rng.random(), f"One of the special magic numbers for {key} is: {v}.") for v in values]
        ids = self._haystack_prompt(budget, NEEDLE_INTRO,
                                    f"What are all the special magic numbers for {key} mentioned in the text "
                                    f"above?", f"The special magic numbers for {key} mentioned in the text are",
                                    inserts)
        return ids, values

    def multiquery(self, budget: int, rng: random.Random) -> tuple[list[int], list[str]]:
        keys, values = self._keys(rng, self.config.keys), _numbers(rng, self.config.keys)
        inserts = [(rng.random(), f"One of the special magic numbers for {k} is: {v}.") for k, v in zip(keys, values)]
        asked = sorted(rng.sample(range(len(keys)), self.config.queries))
        names = _join([keys[i] for i in asked])
        ids = self._haystack_prompt(budget, NEEDLE_INTRO,
                                    f"What are the special magic numbers for {names} mentioned in the text above?",
                                    f"The special magic numbers for {names} mentioned in the text are", inserts)
        return ids, [values[i] for i in asked]

    def variable_tracking(self, budget: int, rng: random.Random) -> tuple[list[int], list[str]]:
        c = self.config
        names = _variables(rng, c.chains * (c.hops + 1))
        values = _numbers(rng, c.chains)
        inserts = []
        for k in range(c.chains):   # each chain in order, its statements at sorted random depths
            chain = names[k * (c.hops + 1):(k + 1) * (c.hops + 1)]
            statements = [f"VAR {chain[0]} = {values[k]}"] + [f"VAR {b} = VAR {a}" for a, b in zip(chain, chain[1:])]
            inserts += zip(sorted(rng.random() for _ in statements), statements)
        ids = self._haystack_prompt(budget, VT_INTRO,
                                    f"Which variables are assigned the value {values[0]}, directly or through "
                                    f"other variables?", f"The variables assigned the value {values[0]} are:",
                                    inserts)
        return ids, names[:c.hops + 1]

    def common_words(self, budget: int, rng: random.Random) -> tuple[list[int], list[str]]:
        c = self.config
        # every list entry (", word") is at least two tokens, so no more rare words than this can fit
        pool = _unnested(rng.sample(self.words, len(self.words)), c.common_words + budget // (2 * c.rare_freq) + 1)
        common, rare = pool[:c.common_words], pool[c.common_words:]
        f = frame(self.engine, f"What are the {c.common_words} most common words in the list above?",
                  f"The {c.common_words} most common words in the list are:", CWE_INTRO)
        shuffle = rng.random()

        def body(n: int) -> list[int]:
            words = common * c.common_freq + rare[:n] * c.rare_freq
            random.Random(f"{shuffle}-{n}").shuffle(words)
            return self.engine.tokenizer.encode(", ".join(words), add_special_tokens=False)

        room = budget - len(f)
        if len(body(0)) > room:
            raise _TooSmall("its question and the common words alone", len(body(0)) + len(f))
        lo, hi = 0, len(rare)   # the most rare words that fit (token count grows with n)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if len(body(mid)) <= room else (lo, mid - 1)
        if lo == len(rare):
            raise InvalidArgumentError(f"task cwe: the haystack text has too few distinct words ({len(self.words)}) "
                                       f"to fill {budget} tokens")
        return f.head + body(lo) + f.tail, common


class _TooSmall(Exception):
    """A task's fixed parts do not fit its budget (``sample`` names the context and the task)."""

    def __init__(self, what: str, need: int):
        super().__init__(what)
        self.what, self.need = what, need


# name -> (builder, max_new_tokens): answers are a few numbers or words, so a short budget keeps decoding cheap
TASKS: dict[str, tuple[Callable[[RulerPrompts, int, random.Random], tuple[list[int], list[str]]], int]] = {
    "niah_multikey": (RulerPrompts.multikey, 12),
    "niah_multivalue": (RulerPrompts.multivalue, 40),
    "niah_multiquery": (RulerPrompts.multiquery, 20),
    "vt": (RulerPrompts.variable_tracking, 32),
    "cwe": (RulerPrompts.common_words, 24),
}


def check_tasks(names: list[str]) -> list[str]:
    """``names`` if all are tasks ('all' for every task); an unknown one fails before any model loads."""
    if "all" in names:
        return list(TASKS)
    for name in names:
        if name not in TASKS:
            raise UnknownNameError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return names


def _numbers(rng: random.Random, n: int) -> list[str]:
    return [str(v) for v in rng.sample(range(10000, 100000), n)]


def _variables(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    return names


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _unnested(words: list[str], limit: int) -> list[str]:
    """The first ``limit`` of ``words`` that neither contain nor are contained in an earlier one: substring
    scoring must not credit "love" for "lovely"."""
    kept: list[str] = []
    for w in words:
        if len(kept) == limit:
            break
        if not any(w in k or k in w for k in kept):
            kept.append(w)
    return kept
