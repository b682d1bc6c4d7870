"""What needle.py, ruler.py and ppl.py share: the sweep of settings, answering a prompt under one, the tally.

A setting is a (press, ratio, attention) triple; the dense, uncompressed baseline comes first. Needle and
RULER prompts are answered through ``Engine.generate_tokens`` with the setting's GenerationConfig (plain greedy
decoding), so each answer comes with the engine's own GenerationStats: the prefill seconds and decode speed a
user of ``tachy generate --press ...`` gets, and the KV bytes held after prefill.

Perplexity scores teacher-forced tokens instead, so ppl.py prefills each window once (recording every layer's
queries), and each press/ratio compresses a *copy* of that cache with those queries (``Prefilled``). Scores
that do not depend on the ratio (SnapKV's votes, H2O's accumulated attention) are computed once (memo).
"""
from __future__ import annotations

import dataclasses
import statistics
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cache import KVCache, key_bucket
from ..decoding import GenerationConfig
from ..engine import Engine
from ..errors import InvalidArgumentError, TachyError
from ..generation import GenerationStats
from ..presses import Press, available_presses, make_press
from ..sparse import kv_read_per_token, make_attention
from ..spec import split_specs

DEFAULT_HAYSTACK = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "tinyshakespeare.txt"
DENSE = "dense"   # full attention over every cached key (else a tachy.sparse method, GenerationConfig.attention)


@dataclass(frozen=True)
class Setting:
    """One press at one ratio under one attention ("full" is the uncompressed baseline, "none" no press)."""

    press: str
    ratio: float
    attention: str = DENSE

    @property
    def label(self) -> str:
        label = self.press if self.press in ("full", "none") else f"{self.press}@{self.ratio:g}"
        return label if self.attention == DENSE else f"{label}/{self.attention}"

    def make(self) -> Press | None:
        return None if self.press in ("full", "none") else make_press(self.press, self.ratio)

    @property
    def prefills_densely(self) -> bool:
        """Whether this setting prefills its prompt as the dense baseline does: no press, and dense attention or
        a decode-time method (one that attaches after a dense prefill)."""
        if self.press not in ("full", "none"):
            return False
        return self.attention == DENSE or not make_attention(self.attention).sparse_prefill

    def config(self, max_new_tokens: int) -> GenerationConfig:
        """Plain greedy decoding under this setting; the attention is passed on where GenerationConfig has one.
        The prefix cache serves only settings that prefill densely (``answers``); the others prefill
        themselves, so their prefill_s is their own."""
        return GenerationConfig(max_new_tokens=max_new_tokens, drafter=None, press=self.make(),
                                prefix_cache=self.prefills_densely, **_attention_field(self.attention))


def _attention_field(attention: str) -> dict:
    if attention == DENSE:
        return {}
    if "attention" not in {f.name for f in dataclasses.fields(GenerationConfig)}:
        raise InvalidArgumentError(f"unknown attention {attention!r}: this build has dense attention only")
    return {"attention": attention}


def parse_list(text: str, kind=str, what: str = "value") -> list:
    try:
        items = [kind(x.strip()) for x in str(text).split(",") if x.strip()]
    except ValueError as e:
        raise InvalidArgumentError(f"bad {what} list {text!r}: {e}") from None
    if not items:
        raise InvalidArgumentError(f"empty {what} list")
    return items


def settings(presses: str, ratios: str, attentions: str = DENSE) -> list[Setting]:
    """The dense baseline, then every press at every ratio under every attention ("none": no press, for an
    attention alone); each is validated before any model loads."""
    names = split_specs(presses) or parse_list(presses, what="press")
    if "all" in names:
        names = available_presses()
    out = [Setting("full", 0.0)]
    for attention in split_specs(attentions) or parse_list(attentions, what="attention"):
        Setting("full", 0.0, attention).config(1)   # an unknown attention fails here
        for name in names:
            if name == "none":
                if attention != DENSE:
                    out.append(Setting("none", 0.0, attention))
                continue
            if not make_press(name, 0.0).evicts:   # quantization alone: its size is set by bits, not a ratio
                out.append(Setting(name, 0.0, attention))
                continue
            for ratio in parse_list(ratios, float, "ratio"):
                make_press(name, ratio)   # unknown name / ratio outside [0, 1) fail here
                out.append(Setting(name, ratio, attention))
    return out


@dataclass
class Answer:
    """A greedy answer (up to EOS, excluded) with the engine's stats and the KV bytes held after prefill."""

    tokens: list[int]
    kv_bytes: int
    stats: GenerationStats
    kv_read: int = 0   # bytes of K/V one decoded token reads at the prompt's length (sparse.kv_read_per_token)


def answer(engine: Engine, ids: list[int], setting: Setting, max_new_tokens: int) -> Answer:
    stats, tokens, kv_bytes = GenerationStats(), [], 0
    eos = set(engine.tokenizer.eos_token_ids)
    with closing(engine.generate_tokens(ids, setting.config(max_new_tokens), stats)) as steps:
        for step in steps:
            kv_bytes = kv_bytes or stats.kv_bytes   # as of the first step: the prompt's cache after any press
            ended = [i for i, t in enumerate(step.tokens) if t in eos]
            tokens += step.tokens[: ended[0]] if ended else step.tokens
            if ended:
                break
    kept = kv_bytes / stats.kv_full_bytes if stats.kv_full_bytes else 1.0
    return Answer(tokens, kv_bytes, stats, kv_read_per_token(engine.config, setting.attention, len(ids), kept))


def answer_settings(engine: Engine, ids: list[int], settings_: list[Setting], max_new_tokens: int) -> list[Answer]:
    """Every setting's answer to one prompt. The settings that prefill densely share one prefill: the first
    (the baseline) stores its K/V in the engine's prefix cache and the others load it, which on the C forward
    gives the cold prefill's logits bit for bit (tachy.prefix_cache), and report the prefill seconds of the
    setting that actually prefilled. Decode-time methods are thus measured at 8k+ tokens for the price of one
    prefill per prompt, and their prefill seconds are the dense ones, as they are in use."""
    prefix = engine.prefix_cache
    if prefix is not None:
        prefix.clear()   # one prompt's blocks at a time: nothing carried between prompts
    out, first_prefill = [], None
    for s in settings_:
        a = answer(engine, ids, s, max_new_tokens)
        if s.prefills_densely and a.stats.cached_tokens == 0 and first_prefill is None:
            first_prefill = a.stats.prefill_s
        elif s.prefills_densely and a.stats.cached_tokens > 0 and first_prefill is not None:
            a.stats.prefill_s = first_prefill
        out.append(a)
    if prefix is not None:
        prefix.clear()
    return out


def score(expected: list[str], text: str) -> float:
    """RULER's string match: the fraction of expected strings found in the answer, ignoring case."""
    text = text.lower()
    return sum(e.lower() in text for e in expected) / len(expected)


@dataclass
class Tally:
    """What one setting scored and measured at one context, over its samples; ``groups`` splits the scores
    (by needle depth, by task)."""

    groups: dict[str, list[float]] = field(default_factory=dict)
    kv_bytes: list[int] = field(default_factory=list)
    kv_read: list[int] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)

    def add(self, group: str, value: float, a: Answer) -> None:
        self.groups.setdefault(group, []).append(value)
        self.kv_bytes.append(a.kv_bytes)
        self.kv_read.append(a.kv_read)
        self.prefill_s.append(a.stats.prefill_s)
        if a.stats.decode_s > 0:   # an answer of one token has no decode step to time
            self.decode_tps.append(a.stats.tokens_per_s)

    def summary(self, group_name: str) -> dict:
        """Accuracy (mean over samples), mean KV bytes held and read per decoded token, median prefill seconds
        and decode tokens/s."""
        scores = [v for vs in self.groups.values() for v in vs]
        return {"accuracy": sum(scores) / len(scores), "kv_bytes": round(statistics.mean(self.kv_bytes)),
                "kv_read_per_token": round(statistics.mean(self.kv_read)),
                "prefill_s": round(statistics.median(self.prefill_s), 4),
                "decode_tokens_per_s": round(statistics.median(self.decode_tps), 2) if self.decode_tps else None,
                group_name: {g: sum(vs) / len(vs) for g, vs in self.groups.items()}}


def tallies(settings_: list[Setting], contexts: list[int]) -> dict[tuple[Setting, int], Tally]:
    return {(s, c): Tally() for s in settings_ for c in contexts}


def summarize(settings_: list[Setting], contexts: list[int], tally: dict[tuple[Setting, int], Tally],
              group_name: str) -> dict:
    """results.json's baseline and runs: one run per (setting, context); the baseline has one entry per
    context and, at its top level, the mean over contexts of each number (as its accuracy always was)."""
    base = [{"context": c, **tally[(settings_[0], c)].summary(group_name)} for c in contexts]
    top = {k: statistics.mean(b[k] for b in base) if all(b[k] is not None for b in base) else None
           for k in ("accuracy", "kv_bytes", "kv_read_per_token", "prefill_s", "decode_tokens_per_s")}
    top["kv_bytes"], top["kv_read_per_token"] = round(top["kv_bytes"]), round(top["kv_read_per_token"])
    baseline = {"press": "full", "ratio": 0.0, "attention": DENSE, **top, "per_context": base}
    runs = [{"press": s.press, "ratio": s.ratio, "attention": s.attention, "context": c,
             **tally[(s, c)].summary(group_name)} for s in settings_[1:] for c in contexts]
    return {"baseline": baseline, "runs": runs}


def read_text(path: str | Path | None, flag: str) -> str:
    path = Path(path) if path else DEFAULT_HAYSTACK
    if not path.is_file():
        raise TachyError(f"{path} not found; pass {flag} FILE (a plain-text file)")
    return path.read_text(encoding="utf-8", errors="replace")


class Prefilled:
    """A prompt prefilled once: the cache and, when a press needs them (``record``), the queries every layer
    saw. Without recording the prefill takes the C forward where it runs (the queries need the PyTorch one)."""

    def __init__(self, engine: Engine, ids: list[int], extra: int, record: bool = True):
        self.engine, self.ids = engine, ids
        model = engine.model
        self.cache = model.new_cache(capacity=key_bucket(len(ids) + extra), fixed=True)
        self.recorder = make_press("h2o")          # records every query of every layer
        self.memo: dict = {}
        with self.recorder.observing(self.cache) if record else nullcontext():
            engine._prefill(ids, self.cache)

    def compressed(self, setting: Setting) -> KVCache:
        """A copy of the prefilled cache compressed by ``setting``, its sparse attention attached (as the
        engine does after prefill)."""
        cache = self.cache.clone()
        press = setting.make()
        if press is not None and press.active:
            press.prepare(self.engine.model)
            press.adopt_queries(self.recorder.collected)
            press.apply(cache, self.memo)
        if setting.attention != DENSE:
            method = make_attention(setting.attention)
            if method.sparse_prefill:   # the prefill here is dense and shared by every setting
                raise InvalidArgumentError(f"{method.name} sparsifies the prefill, which this evaluation shares "
                                           f"densely across settings; evaluate it with needle or ruler")
            method.prepare(self.engine)
            method.attach(self.engine.model, cache)
        return cache


def records(settings_: list[Setting]) -> bool:
    """Whether a prefill must record queries: whenever presses are compared (their prefill as before sparse
    attention came, on the PyTorch forward), not for attentions alone."""
    return any(s.press not in ("full", "none") for s in settings_)


def greedy(engine: Engine, cache: KVCache, token: int, n: int) -> list[int]:
    """Forward ``token`` at the cache's next position, then decode greedily; return the ``n`` new tokens
    (benchmarks/press_speed.py times decoding over a ``Prefilled`` copy with it)."""
    out: list[int] = []
    eos = set(engine.tokenizer.eos_token_ids)
    for _ in range(n):
        logits = engine.model(torch.tensor([[token]], device=engine.device),
                              torch.tensor([cache.position], device=engine.device), cache)
        token = int(logits[0, -1].argmax())
        if token in eos:
            break
        out.append(token)
    return out
